"""2-process CPU DDP: a KD fit with a frozen teacher needs no find_unused_parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_fit.py"


def run_ddp_script(out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ddp_kd_fit_with_frozen_teacher(tmp_path: Path) -> None:
    ranks = run_ddp_script(tmp_path)
    for rank in ranks:
        assert rank["is_ddp"] and not rank["find_unused"]
        assert rank["ignored"] and all(name.startswith("teacher.") for name in rank["ignored"])
        assert not rank["teacher_training"]
        assert rank["global_step"] == 8  # 128 samples / 2 processes / batch 16 x 2 epochs
        for name, tensor in rank["teacher"].items():
            assert torch.equal(tensor, rank["initial_teacher"][name]), name
    for name, tensor in ranks[0]["student"].items():  # gradients were all-reduced
        torch.testing.assert_close(tensor, ranks[1]["student"][name], rtol=0, atol=1e-6)
    # train/acc of the last epoch: over both processes' samples (counted by each process itself)
    accuracy = sum(rank["hits"] for rank in ranks) / sum(rank["seen"] for rank in ranks)
    assert sum(rank["seen"] for rank in ranks) == 128
    assert all(rank["train_acc"] == pytest.approx(accuracy, abs=1e-6) for rank in ranks)


def test_ddp_multi_stage_fit_needs_no_unused_parameter_search(tmp_path: Path) -> None:
    ranks = run_ddp_script(tmp_path, "stages")
    for rank in ranks:
        assert not rank["find_unused"]
        for name, tensor in rank["initial_student"].items():  # frozen through the init stage
            assert torch.equal(rank["student_after_epoch0"][name], tensor), name
        assert not torch.equal(rank["student"]["0.weight"], rank["initial_student"]["0.weight"])
    for name, tensor in ranks[0]["student"].items():
        torch.testing.assert_close(tensor, ranks[1]["student"][name], rtol=0, atol=1e-6)
