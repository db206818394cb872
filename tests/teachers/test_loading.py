"""Teacher loading: plain state dicts, benchmark files, missing checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_kd import DistillationModule
from lightning_kd.teachers import load_weights
from tests.helpers import small_net


def test_missing_teacher_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist. Train the teacher first"):
        DistillationModule(small_net(), small_net(), teacher_checkpoint=tmp_path / "nope.ckpt")


def test_plain_state_dict_is_accepted(tmp_path: Path) -> None:
    source = small_net()
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = load_weights(small_net(), tmp_path / "weights.pt")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name])


def test_crd_benchmark_teacher_file_is_accepted(tmp_path: Path) -> None:
    source = small_net()
    torch.save({"model": source.state_dict(), "epoch": 240}, tmp_path / "resnet32x4_best.pth")
    target = load_weights(small_net(), tmp_path / "resnet32x4_best.pth")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name])
