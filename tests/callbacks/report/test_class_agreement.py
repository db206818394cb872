"""ClassChanges: per-class agreement and gains computed by hand."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.callbacks import ClassChanges


def _one_hot_logits(predictions: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def test_class_changes_by_hand() -> None:
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    student = _one_hot_logits([0, 2, 1, 1, 2, 0])  # per class: 1/2, 2/2, 1/2
    teacher = _one_hot_logits([0, 1, 1, 1, 2, 2])  # per class: 1/2, 2/2, 2/2
    changes = ClassChanges.compute(student, targets, 3, teacher, torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(changes.accuracy, torch.tensor([0.5, 1.0, 0.5]))
    torch.testing.assert_close(changes.teacher_accuracy, torch.tensor([0.5, 1.0, 1.0]))
    # grouped by the teacher's class: class 0 {0} -> 1/1; class 1 {1, 2, 3} -> 2/3; class 2 {4, 5} -> 1/2
    torch.testing.assert_close(changes.agreement, torch.tensor([1.0, 2 / 3, 0.5]))
    torch.testing.assert_close(changes.gain, torch.tensor([0.5, 0.0, -0.5]))
    assert changes.samples.tolist() == [2, 2, 2]
    assert (changes.gained, changes.lost) == ([0], [2])
    metrics = changes.metrics()
    assert metrics["gain/class_2"] == pytest.approx(-0.5) and metrics["class_changes/gained"] == 1.0
    assert metrics["agreement/class_1"] == pytest.approx(2 / 3)
    table = changes.table()
    assert "| 0 | 2 | 0.0 | 50.0 | +50.0 | 50.0 | 100.0 |" in table and "Lost (gain < 0 pts): [2]" in table
    tolerant = ClassChanges.compute(
        student, targets, 3, teacher, torch.tensor([0.0, 1.0, 1.0]), tolerance=0.5
    )
    assert (tolerant.gained, tolerant.lost) == ([], [])
    with pytest.raises(ValueError, match="one accuracy per class"):
        ClassChanges.compute(student, targets, 3, teacher, torch.tensor([0.0, 1.0]))
