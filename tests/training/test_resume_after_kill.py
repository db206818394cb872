"""SIGKILL a fit mid-epoch, resume from last.ckpt: the same final weights and loss as without the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from kill_resume import SCENARIOS, fit  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"
KILL_AT_STEP = 8  # the 2nd of 3 steps in epoch 2; last.ckpt holds the end of epoch 1 (step 6)


def _run_and_kill(out_dir: Path, scenario: str, kill_at_step: int = KILL_AT_STEP) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), str(out_dir), scenario, "--kill-at-step", str(kill_at_step)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    marker = out_dir / "step.txt"
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended before step {kill_at_step}:\n{process.stdout.read().decode()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run did not reach the kill step in 120 s")
        time.sleep(0.05)
    time.sleep(0.05)  # the marker is written before the sleep: let the write finish
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stdout.close()
    assert marker.read_text().split() == [str(kill_at_step), str(kill_at_step // 3)]  # 3 steps per epoch


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path: Path, scenario: str) -> None:
    reference = fit(tmp_path / "full", scenario)

    killed = tmp_path / "killed"
    killed.mkdir()
    _run_and_kill(killed, scenario)
    last = torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["epoch"] == 1  # the end of epoch 1, not the killed step
    resumed = fit(killed, scenario, resume=True)

    assert resumed["global_step"] == reference["global_step"] == 12
    assert resumed["state"].keys() == reference["state"].keys()
    for name, tensor in reference["state"].items():
        assert torch.equal(resumed["state"][name], tensor), f"{scenario}: {name} differs after resume"
    # the run did move on from the checkpoint (else equal states would prove nothing)
    saved = last["state_dict"]
    assert any(not torch.equal(saved[k], v) for k, v in reference["state"].items() if k in saved)
    for name in ("train/loss", "val/loss"):
        assert torch.equal(resumed["metrics"][name], reference["metrics"][name]), name


def test_a_cache_build_killed_in_its_first_epoch_is_resumed_not_used_half_built(tmp_path: Path) -> None:
    reference = fit(tmp_path / "full", "cache")

    killed = tmp_path / "killed"
    killed.mkdir()
    _run_and_kill(killed, "cache", kill_at_step=2)  # inside epoch 0, while the cache is being filled
    meta = json.loads((killed / "teacher_cache" / "meta.json").read_text())
    assert meta["complete"] is False  # the half-built cache says so
    assert not (killed / "ckpt" / "last.ckpt").exists()  # no epoch ended: the rerun starts afresh
    resumed = fit(killed, "cache", resume=True)

    assert json.loads((killed / "teacher_cache" / "meta.json").read_text())["complete"] is True
    for name, tensor in reference["state"].items():
        assert torch.equal(resumed["state"][name], tensor), f"cache: {name} differs after the rerun"
    for name in ("train/loss", "val/loss"):
        assert torch.equal(resumed["metrics"][name], reference["metrics"][name]), name
