"""The co-trained, EMA, mutual-learning and multi-teacher recipes fit a few steps from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_kd import DistillationModule, MutualLearningModule
from lightning_kd.cli import main
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import TINY_MNIST1D_FIT

CONFIGS = RECIPES_DIR / "mnist1d"


SMALL = TINY_MNIST1D_FIT


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose runs/ holds both (briefly) trained teachers."""
    root = tmp_path_factory.mktemp("paradigms")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for teacher in ("teacher", "teacher_small"):
            main(["fit", "--config", str(CONFIGS / f"{teacher}.yaml"), *SMALL])
    return root


def _fit(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    monkeypatch.chdir(workdir)
    main(["fit", "--config", str(CONFIGS / "paradigms" / f"{name}.yaml"), *SMALL])
    path = workdir / f"runs/mnist1d/{name}/latest.ckpt"
    return torch.load(path, weights_only=True)["state_dict"]


def test_cotrained_teacher_is_saved_with_the_student(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _fit("cotrained", workdir, monkeypatch)
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("student.") for k in state)
    header = (workdir / "runs/mnist1d/cotrained/version_0/metrics.csv").read_text().splitlines()[0]
    assert "train/loss_teacher_ce" in header and "val/teacher_acc" in header


def test_ema_recipe_saves_and_reloads_its_teacher(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _fit("ema", workdir, monkeypatch)
    restored = DistillationModule.load_from_checkpoint(workdir / "runs/mnist1d/ema/latest.ckpt")
    assert restored.teacher_mode == "ema"
    for name, value in restored.teacher.state_dict().items():
        assert torch.equal(value, state[f"teacher.{name}"]), name


def test_dml_recipe_logs_both_peers_and_reloads(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _fit("dml", workdir, monkeypatch)
    header = (workdir / "runs/mnist1d/dml/version_0/metrics.csv").read_text().splitlines()[0]
    for column in ("val/acc_peer0", "val/acc_peer1", "val/acc_ensemble", "train/loss_peer1"):
        assert column in header, column
    restored = MutualLearningModule.load_from_checkpoint(workdir / "runs/mnist1d/dml/latest.ckpt")
    assert len(restored.peers) == 2
    assert torch.equal(restored.peers[1].classifier.weight, state["peers.1.classifier.weight"])


def test_multi_teacher_recipe_logs_each_teacher(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _fit("multi_teacher", workdir, monkeypatch)
    assert not any(k.startswith("teacher.") for k in state)  # frozen teachers come from their files
    header = (workdir / "runs/mnist1d/multi_teacher/version_0/metrics.csv").read_text().splitlines()[0]
    for column in ("val/teacher0_acc", "val/teacher1_acc", "val/teacher_acc", "train/loss_kd"):
        assert column in header, column
