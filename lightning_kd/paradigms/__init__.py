"""Who teaches whom: training set-ups beyond one frozen teacher and one student."""

from lightning_kd.paradigms.mutual import MutualLearningModule

__all__ = ["MutualLearningModule"]
