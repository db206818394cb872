"""Ingredient 1 of distillation: what is transferred, and the loss that transfers it."""

from lightning_kd.losses import functional
from lightning_kd.losses.attention import ATTerm, NSTTerm
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs
from lightning_kd.losses.boundary import ABTerm
from lightning_kd.losses.contrastive import ContrastMemory, CRDTerm
from lightning_kd.losses.embedding import EmbeddingMatchTerm
from lightning_kd.losses.factor import FTTerm, Paraphraser, ParaphraserTerm, Translator
from lightning_kd.losses.feature import FitNetTerm, OFDTerm, VIDTerm, make_regressor, margin_from_batchnorm
from lightning_kd.losses.fsp import FSPTerm
from lightning_kd.losses.generalized import GeneralizedDistillationTerm
from lightning_kd.losses.multi_teacher import MultiTeacherKDTerm
from lightning_kd.losses.relation import CCTerm, PKTTerm, RKDTerm, SPTerm
from lightning_kd.losses.response import CrossEntropyTerm, DISTTerm, DKDTerm, KDTerm
from lightning_kd.losses.review import ABF, ReviewKDTerm
from lightning_kd.losses.seed import SEEDTerm
from lightning_kd.losses.self_distillation import BYOTTerm
from lightning_kd.losses.transformer import AttentionMapTerm, HiddenStateTerm, ValueRelationTerm

__all__ = [
    "ABF",
    "ABTerm",
    "ATTerm",
    "AttentionMapTerm",
    "BYOTTerm",
    "CCTerm",
    "ContrastMemory",
    "CRDTerm",
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "EmbeddingMatchTerm",
    "FitNetTerm",
    "FTTerm",
    "FSPTerm",
    "HiddenStateTerm",
    "GeneralizedDistillationTerm",
    "KDTerm",
    "LayerPairTerm",
    "LossTerm",
    "MultiTeacherKDTerm",
    "NSTTerm",
    "OFDTerm",
    "Paraphraser",
    "ParaphraserTerm",
    "PKTTerm",
    "ReviewKDTerm",
    "RKDTerm",
    "SEEDTerm",
    "SPTerm",
    "StepOutputs",
    "Translator",
    "ValueRelationTerm",
    "VIDTerm",
    "functional",
    "make_regressor",
    "margin_from_batchnorm",
]
