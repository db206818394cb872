"""FSP: the loss against numpy with pooling, bad shapes, a detached teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_kd import (
    FSPTerm,
)
from lightning_kd.losses import StepOutputs
from lightning_kd.losses.functional import fsp_loss


def reference_fsp(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """G[n, i, j] = mean over positions of second[n, i] * first[n, j]."""
    n, c1 = first.shape[:2]
    c2 = second.shape[1]
    f = first.reshape(n, c1, -1)
    s = second.reshape(n, c2, -1)
    return np.einsum("nip,njp->nij", s, f) / f.shape[-1]


def test_fsp_loss_matches_numpy_with_pooling() -> None:
    rng = np.random.default_rng(0)
    s1, s2 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 2, 2))
    t1, t2 = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 5, 2, 2))
    s1_pooled = s1.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 average pooling
    expected = ((reference_fsp(s1_pooled, s2) - reference_fsp(t1, t2)) ** 2).mean()
    got = fsp_loss(*(torch.tensor(a, dtype=torch.float32) for a in (s1, s2, t1, t2)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    same = torch.tensor(t1, dtype=torch.float32), torch.tensor(t2, dtype=torch.float32)
    assert fsp_loss(*same, *same).item() == 0.0


def test_fsp_channel_mismatch_and_bad_ranks() -> None:
    with pytest.raises(ValueError, match=r"same channel counts"):
        fsp_loss(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 4, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="four"):
        fsp_loss(torch.randn(2, 3), torch.randn(2, 5, 4), torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="two student and two teacher layers"):
        FSPTerm(["a"], ["b", "c"])


def test_fsp_term_detaches_the_teacher() -> None:
    term = FSPTerm(["a", "b"], ["c", "d"])
    student = {k: torch.randn(2, 3, 4, requires_grad=True) for k in "ab"}
    teacher = {k: torch.randn(2, 3, 4, requires_grad=True) for k in "cd"}
    term(StepOutputs(torch.zeros(2, 2), student_features=student, teacher_features=teacher)).backward()
    assert all(t.grad is not None for t in student.values())
    assert all(t.grad is None for t in teacher.values())
