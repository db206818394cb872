"""2-process CPU DDP (2 x 16) gives the loss curve of 1 process with the same global batch (1 x 32).

Frozen-teacher KD (CE 0.1 + KD 0.9, T = 4, Adam) on a tiny MLP without BatchNorm (its per-process
statistics would differ; SyncBatchNorm would be needed). The DDP loss of a step is the mean of the
two ranks' losses, and DDP averages the gradients, so both runs take the same steps: tolerance
rtol 1e-5 per step (measured: 3e-7, float32 summation order).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_curve.py"


def _load_script():  # noqa: ANN202 - a module object
    spec = importlib.util.spec_from_file_location("ddp_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("ddp_curve")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "2"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _load_script().main(out, devices=1)
    ranks = [torch.load(out / f"devices2_rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, torch.load(out / "devices1_rank0.pt", weights_only=True)


def test_global_batches_are_the_same(runs: tuple[list[dict], dict]) -> None:
    ranks, single = runs
    assert len(single["inputs"]) == 12  # 128 samples / 32 x 3 epochs
    batches = zip(ranks[0]["inputs"], ranks[1]["inputs"], single["inputs"], strict=True)
    for step, (a, b, whole) in enumerate(batches):
        assert a.shape[0] == b.shape[0] == 16 and whole.shape[0] == 32
        merged = {tuple(row.tolist()) for row in torch.cat([a, b])}
        assert merged == {tuple(row.tolist()) for row in whole}, f"step {step}: different samples"


def test_ddp_loss_curve_matches_single_process(runs: tuple[list[dict], dict]) -> None:
    ranks, single = runs
    ddp = torch.tensor(ranks[0]["losses"], dtype=torch.float64) + torch.tensor(ranks[1]["losses"])
    expected = torch.tensor(single["losses"], dtype=torch.float64)
    assert len(ddp) == len(expected) == 12
    assert expected.unique().numel() > 1  # the curve moves: a real comparison
    torch.testing.assert_close(ddp / 2, expected, rtol=1e-5, atol=0)
    for name, tensor in single["student"].items():
        torch.testing.assert_close(ranks[0]["student"][name], tensor, rtol=1e-5, atol=1e-6)


def test_frozen_teacher_is_not_wrapped_and_no_unused_parameter_search(runs: tuple[list[dict], dict]) -> None:
    ranks, single = runs
    assert not single["is_ddp"]
    for rank in ranks:
        assert rank["is_ddp"] and not rank["find_unused"]  # plain strategy="ddp"
        assert rank["teacher_params_in_ddp"] == 0  # DDP neither broadcasts nor all-reduces the teacher
        assert rank["student_params_in_ddp"] == 4  # 2 Linear layers x (weight, bias)
        assert rank["nested_ddp"] == []  # no submodule is a DDP wrapper of its own
        assert rank["teacher_unchanged"]
