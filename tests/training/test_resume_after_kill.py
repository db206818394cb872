"""SIGKILL a fit mid-epoch, resume from last.ckpt: the same final weights and loss as without the kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lightning_kd.checkpoint_io import AtomicCheckpointIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from kill_resume import SCENARIOS, fit, run_and_kill  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"
KILL_AT_STEP = 8  # the 2nd of 3 steps in epoch 2; last.ckpt holds the end of epoch 1 (step 6)


#: scenarios run with 2 loader workers and random transforms (and dropout in the student)
WORKERS_AND_AUGMENTATION = {"ema"}


def _run_and_kill(out_dir: Path, scenario: str, kill_at_step: int = KILL_AT_STEP) -> None:
    options = ["--workers", "2", "--augment"] if scenario in WORKERS_AND_AUGMENTATION else []
    killed_at = run_and_kill(out_dir, scenario, kill_at_step, *options)
    assert killed_at == (kill_at_step, kill_at_step // 3)  # 3 steps per epoch


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path: Path, scenario: str) -> None:
    flags = dict(workers=2, augment=True) if scenario in WORKERS_AND_AUGMENTATION else {}
    reference = fit(tmp_path / "full", scenario, **flags)

    killed = tmp_path / "killed"
    killed.mkdir()
    _run_and_kill(killed, scenario)
    last = torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["epoch"] == 1  # the end of epoch 1, not the killed step
    resumed = fit(killed, scenario, resume=True, **flags)

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


def _other_filesystem_than(path: Path) -> Path | None:
    """A fresh folder in /dev/shm when it is a filesystem other than ``path``'s, else ``None``."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == path.stat().st_dev:
        return None
    return Path(tempfile.mkdtemp(prefix="lightning-kd-test-", dir=shm))


def test_a_kill_during_the_commit_of_last_ckpt_keeps_the_previous_one(tmp_path: Path) -> None:
    temp_dir = tmp_path / "tmp"  # the run's TMPDIR, on another filesystem than its checkpoints
    temp_dir.mkdir()
    ckpt_dir = _other_filesystem_than(temp_dir)
    if ckpt_dir is None:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    try:
        marker = tmp_path / "committing.txt"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "TMPDIR": str(temp_dir),
            "KILL_RESUME_SLOW_COMMIT": str(marker),
        }
        command = [
            sys.executable,
            str(SCRIPT),
            str(tmp_path / "run"),
            "schedules",
            "--ckpt-dir",
            str(ckpt_dir),
        ]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(f"the run ended before the commit:\n{process.stdout.read().decode()}")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("the run did not reach the second last.ckpt commit in 120 s")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        process.stdout.close()

        # killed with the end of epoch 1 written and synced beside last.ckpt, not yet renamed over it
        (written,) = [p for p in ckpt_dir.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
        assert str(written) == marker.read_text()
        assert torch.load(written, weights_only=False)["global_step"] == 6  # complete, but not committed
        last = AtomicCheckpointIO().load_checkpoint(ckpt_dir / "last.ckpt")  # checked against its CRCs
        assert last["global_step"] == 3 and last["epoch"] == 0  # the previous last.ckpt, intact
        # no checkpoint bytes went to (or were left in) the system temp dir (imported libraries make folders)
        assert [p for p in temp_dir.rglob("*") if p.is_file()] == []

        # `ckpt_path="last"` ignores the temporary file; the resumed run's first save removes it
        reference = fit(tmp_path / "full", "schedules")
        resumed = fit(tmp_path / "run", "schedules", resume=True, ckpt_dir=ckpt_dir)
        assert not [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]
        assert resumed["global_step"] == reference["global_step"] == 12
        for name, tensor in reference["state"].items():
            assert torch.equal(resumed["state"][name], tensor), f"{name} differs after resume"
    finally:
        shutil.rmtree(ckpt_dir)
