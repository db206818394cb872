"""KNNProbe: weighted k-NN scores and the linear probe by hand, the probe on labelled loaders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_kd.callbacks import KNNProbe
from lightning_kd.callbacks.report import linear_probe_accuracy, weighted_knn_scores
from tests.helpers import RandomDataModule, make_trainer, seed_module


def test_weighted_knn_by_hand() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.2]])
    # cosines to the query: 0.995, 0.0995, 0.7741, -0.995
    # -> the 2 nearest are references 0 (class 0) and 2 (class 1)
    cos = F.cosine_similarity(query, reference)
    scores = weighted_knn_scores(query, reference, labels, num_classes=3, k=2, temperature=0.5)
    expected = torch.tensor([[math.exp(cos[0] / 0.5), math.exp(cos[2] / 0.5), 0.0]])
    assert torch.allclose(scores, expected, rtol=1e-5)
    # k larger than the reference set: everyone votes
    all_votes = weighted_knn_scores(query, reference, labels, 3, k=50, temperature=1.0)
    assert all_votes[0, 1].item() == pytest.approx(math.exp(cos[1]) + math.exp(cos[2]), rel=1e-5)
    with pytest.raises(ValueError, match="same width"):
        weighted_knn_scores(query, torch.zeros(2, 3), labels[:2], 3)
    with pytest.raises(ValueError, match="one per reference"):
        weighted_knn_scores(query, reference, labels[:2], 3)


def test_linear_probe_separates_separable_classes() -> None:
    x = torch.randn(60, 3)
    y = (x[:, 0] > 0).long()
    assert linear_probe_accuracy(x, y, x, y, num_classes=2).item() == 1.0


class BareInputs(Dataset):
    """Samples that are a bare tensor: no label anywhere."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_training_on_bare_tensors_with_a_probe_on_labelled_loaders(datamodule: RandomDataModule) -> None:
    labelled = DataLoader(TensorDataset(datamodule.x, datamodule.y), batch_size=32)
    probe = KNNProbe(
        k=5, linear_probe=True, linear_probe_steps=10, reference_dataloader=labelled, val_dataloader=labelled
    )
    module = seed_module(input_key=None)
    trainer = make_trainer(max_epochs=2, callbacks=[probe])
    bare = DataLoader(BareInputs(datamodule.x), batch_size=16)
    trainer.fit(module, bare, bare)
    metrics = trainer.callback_metrics
    for key in ("val/knn_student_acc", "val/knn_teacher_acc", "val/linear_student_acc", "val/cosine"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key
    assert int(module.loss_terms["seed"].queue_pointer) == (2 * 64) % 10
    with pytest.raises(ValueError, match="UnlabelledDataModule"):  # no labels to probe with
        make_trainer(callbacks=[KNNProbe(reference_dataloader=bare, val_dataloader=bare)]).validate(
            module, bare
        )
