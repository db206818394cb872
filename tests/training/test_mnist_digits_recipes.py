"""The mnist_digits recipes (the real-image benchmark): every one builds, hooks its layers and trains a step.

Each method overlay is instantiated by LightningCLI on top of kd.yaml without running, and one
training step's loss is computed on a random batch (the teacher checkpoint left out); teacher.yaml
then kd.yaml run for real on a few batches of the digits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_kd import DistillationModule
from lightning_kd.cli import DistillationCLI, main
from lightning_kd.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR / "mnist_digits"
OVERLAYS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_samples=64",
    "--data.init_args.val_samples=32",
    "--data.init_args.test_samples=100",
    "--data.init_args.batch_size=32",
]


def build(*configs: Path) -> DistillationModule:
    args = [arg for config in configs for arg in ("--config", str(config))]
    return DistillationCLI(args=[*args, "--model.init_args.teacher_checkpoint=null"], run=False).model


def test_every_method_of_the_benchmark_has_a_recipe() -> None:
    feature = {"fitnet", "at", "nst", "ofd", "ab", "ft", "fsp", "vid", "reviewkd"}
    relation = {"kd_standardized", "dkd", "dist", "sp", "rkd", "pkt", "cc", "crd"}
    assert set(OVERLAYS) == feature | relation


@pytest.mark.parametrize("method", OVERLAYS)  # kd.yaml itself: the fit below
def test_method_recipe_builds_and_computes_its_loss(method: str) -> None:
    module = build(CONFIGS / "kd.yaml", CONFIGS / "methods" / f"{method}.yaml")
    widths = (32, 64, 64) if method == "fsp" else (8, 16, 16)
    assert module.student.conv3.conv.out_channels == widths[2] and module.student.conv1.conv.in_channels == 1
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.arange(8))  # index: for CRD
    hooks = module._declared_hooks()
    module.feature_hooks = hooks
    if hooks is not None:
        hooks.attach(module)
    module.build_terms(batch)
    total, values = module.compute_loss(module.step_outputs(batch))
    assert torch.isfinite(total) and set(values) == set(module.loss_terms) and len(values) >= 2
    total.backward()
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)


def test_teacher_then_kd_train_on_the_digits_from_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "mnist_digits/teacher", *TINY])
    main(["fit", "--config", "mnist_digits/kd", *TINY])
    checkpoint = torch.load(tmp_path / "runs/mnist_digits/kd/latest.ckpt", weights_only=True)
    assert "student.conv1.conv.weight" in checkpoint["state_dict"]
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])  # frozen teacher left out
    logged = (tmp_path / "runs/mnist_digits/kd/version_0/metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    kd = [row.split(",")[header.index("train/loss_kd")] for row in logged[1:]]
    assert [float(v) for v in kd if v] and all(torch.isfinite(torch.tensor(float(v))) for v in kd if v)
