"""Distil with a loss term of your own, from plain Python (no YAML).

The term below matches the student's last hidden layer to the teacher's 128-d embedding
through a trainable linear adapter (a FitNets-style hint with cosine distance). It shows the
three things a term does: declare the layers it reads (the module hooks them for you), own
its trainable parts (they join the optimizer), and return a scalar.

    python examples/custom_term.py
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Adam

from lightning_kd import CrossEntropyTerm, DistillationModule, KDTerm, LossTerm, StepOutputs
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d


class CosineHint(LossTerm):
    """``1 - cos(adapter(student_feature), teacher_feature)``, averaged over the batch."""

    def __init__(self, student_layer: str, teacher_layer: str, student_dim: int, teacher_dim: int) -> None:
        super().__init__(name="hint", weight=1.0)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.adapter = nn.Linear(student_dim, teacher_dim)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The student layer whose output is matched."""
        return (self.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """The teacher layer it is matched to."""
        return (self.teacher_layer,)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """Cosine distance after the adapter."""
        student = self.adapter(outputs.student_features[self.student_layer].flatten(1))
        teacher = outputs.teacher_features[self.teacher_layer].flatten(1)
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def main(teacher_epochs: int = 60, epochs: int = 150, train_samples: int = 5000) -> dict[str, float]:
    """Train a teacher, then a student with CE + KD + the cosine hint; return test metrics."""
    datamodule = MNIST1DDataModule(train_samples=train_samples)
    pl.seed_everything(0)
    teacher = ConvNet1d(num_classes=10)
    pl.Trainer(max_epochs=teacher_epochs, logger=False, enable_checkpointing=False).fit(
        DistillationModule(teacher), datamodule=datamodule
    )

    student = MLP(in_features=40, num_classes=10, hidden=(256, 256))
    losses = [
        CrossEntropyTerm(weight=0.1),
        KDTerm(weight=0.9, temperature=4.0),
        CosineHint("features.4", "embedding", student_dim=256, teacher_dim=128),  # after the 2nd ReLU
    ]
    module = DistillationModule(student, teacher, losses=losses, optimizer=partial(Adam, lr=3e-3))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    (metrics,) = trainer.test(module, datamodule=datamodule)
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--train-samples", type=int, default=5000)
    args = parser.parse_args()
    main(args.teacher_epochs, args.epochs, args.train_samples)
