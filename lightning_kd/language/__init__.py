"""Distilling causal language models: supervised, on-policy and sequence-level; completion-only labels."""

from lightning_kd.language.causal_lm import CausalLMDistillationModule, default_causal_lm_losses
from lightning_kd.language.completion import IGNORE_INDEX, CompletionOnlyCollator, completion_only_labels
from lightning_kd.language.cross_tokenizer import CrossTokenizerDistillationModule
from lightning_kd.language.generation import GenerationSettings
from lightning_kd.language.metrics import TokenPerplexity
from lightning_kd.language.on_policy import OnPolicyDistillationModule
from lightning_kd.language.sequence_kd import SequenceKDData, generate_teacher_completions
from lightning_kd.language.stored_teacher import StoredTeacher, TokenStoreDistillationModule
from lightning_kd.language.token_codec import TopKCodec
from lightning_kd.language.token_mean import TokenMeanGradients
from lightning_kd.language.token_store import TopKTokenStore, fill_token_store
from lightning_kd.language.tokenizer_alignment import CrossTokenizerCollator, aligned_positions, token_anchors
from lightning_kd.language.vocabulary import shared_vocabulary

__all__ = [
    "IGNORE_INDEX",
    "CausalLMDistillationModule",
    "CompletionOnlyCollator",
    "CrossTokenizerCollator",
    "CrossTokenizerDistillationModule",
    "GenerationSettings",
    "OnPolicyDistillationModule",
    "SequenceKDData",
    "TokenMeanGradients",
    "StoredTeacher",
    "TokenPerplexity",
    "TokenStoreDistillationModule",
    "TopKCodec",
    "TopKTokenStore",
    "aligned_positions",
    "completion_only_labels",
    "default_causal_lm_losses",
    "fill_token_store",
    "generate_teacher_completions",
    "shared_vocabulary",
    "token_anchors",
]
