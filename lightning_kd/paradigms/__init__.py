"""Who teaches whom: training set-ups beyond one frozen teacher and one student."""

from lightning_kd.paradigms.chain import ChainLink, LinkResult, run_chain
from lightning_kd.paradigms.data_free import DataFreeDistillationModule
from lightning_kd.paradigms.embedding import EmbeddingDistillationModule, embedding_of
from lightning_kd.paradigms.mutual import MutualLearningModule

__all__ = [
    "ChainLink",
    "DataFreeDistillationModule",
    "EmbeddingDistillationModule",
    "LinkResult",
    "MutualLearningModule",
    "embedding_of",
    "run_chain",
]
