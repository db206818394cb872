"""EmbeddingMatch loss by hand."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.losses import EmbeddingMatchTerm, functional


def test_embedding_match_loss_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # cosines: 0 and 1 -> mean(1 - cos) = 0.5
    assert functional.embedding_match_loss(s, t, "cosine").item() == pytest.approx(0.5)
    # squared errors: 1, 4, 1, 1 -> mean 7/4
    assert functional.embedding_match_loss(s, t, "mse").item() == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="projection head"):
        functional.embedding_match_loss(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'cosine' or 'mse'"):
        EmbeddingMatchTerm(kind="l1")  # type: ignore[arg-type]
