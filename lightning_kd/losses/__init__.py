"""Ingredient 1 of distillation: what is transferred, and the loss that transfers it.

One file per method (``kd.py``, ``fitnet.py``, ``crd.py``, ...), each holding its ``*_loss``
function and its loss term; :mod:`lightning_kd.losses.functional` indexes the functions.
"""

from lightning_kd.losses import functional
from lightning_kd.losses.ab import ABTerm
from lightning_kd.losses.adapters import make_regressor
from lightning_kd.losses.at import ATTerm
from lightning_kd.losses.base import LayerListTerm, LayerPairTerm, LossTerm, StepOutputs
from lightning_kd.losses.byot import BYOTTerm
from lightning_kd.losses.cc import CCTerm
from lightning_kd.losses.crd import ContrastMemory, CRDTerm
from lightning_kd.losses.cross_entropy import CrossEntropyTerm
from lightning_kd.losses.ctkd import CTKDTerm, InstanceTemperature
from lightning_kd.losses.dist import DISTTerm
from lightning_kd.losses.dkd import DKDTerm
from lightning_kd.losses.embedding import EmbeddingMatchTerm
from lightning_kd.losses.fitnet import FitNetTerm
from lightning_kd.losses.fsp import FSPTerm
from lightning_kd.losses.ft import FTTerm, Paraphraser, ParaphraserTerm, Translator
from lightning_kd.losses.kd import KDTerm
from lightning_kd.losses.lupi import GeneralizedDistillationTerm
from lightning_kd.losses.mlkd import MLKDTerm
from lightning_kd.losses.multi_teacher import MultiTeacherKDTerm
from lightning_kd.losses.nst import NSTTerm
from lightning_kd.losses.ofd import OFDTerm, margin_from_batchnorm
from lightning_kd.losses.pkt import PKTTerm
from lightning_kd.losses.reviewkd import ABF, ReviewKDTerm
from lightning_kd.losses.rkd import RKDTerm
from lightning_kd.losses.seed import SEEDTerm
from lightning_kd.losses.sp import SPTerm
from lightning_kd.losses.token_cross_entropy import TokenCrossEntropyTerm
from lightning_kd.losses.token_divergence import TokenDivergenceTerm
from lightning_kd.losses.transformer import AttentionMapTerm, HiddenStateTerm, ValueRelationTerm
from lightning_kd.losses.uld import AlignedTokenOutputs, ULDTerm
from lightning_kd.losses.vid import VIDTerm

__all__ = [
    "ABF",
    "ABTerm",
    "ATTerm",
    "AlignedTokenOutputs",
    "AttentionMapTerm",
    "BYOTTerm",
    "CCTerm",
    "ContrastMemory",
    "CRDTerm",
    "CrossEntropyTerm",
    "CTKDTerm",
    "DISTTerm",
    "DKDTerm",
    "EmbeddingMatchTerm",
    "FitNetTerm",
    "FTTerm",
    "FSPTerm",
    "HiddenStateTerm",
    "InstanceTemperature",
    "GeneralizedDistillationTerm",
    "KDTerm",
    "LayerListTerm",
    "LayerPairTerm",
    "LossTerm",
    "MLKDTerm",
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
    "TokenCrossEntropyTerm",
    "TokenDivergenceTerm",
    "Translator",
    "ULDTerm",
    "ValueRelationTerm",
    "VIDTerm",
    "functional",
    "make_regressor",
    "margin_from_batchnorm",
]
