"""The CIFAR-100 recipes (resnet32x4 -> resnet8x4) parse, build, hook their layers and give finite losses.

No dataset is needed: each recipe is instantiated by LightningCLI without running, and one
training step's loss is computed on a random batch (the teacher checkpoint is left out).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_kd import DistillationModule, MLKDTerm
from lightning_kd.cli import DistillationCLI
from lightning_kd.data import TwoViewBatch
from lightning_kd.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR / "cifar100"


OVERLAYS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))


def build(*configs: Path) -> DistillationModule:
    args = [arg for config in configs for arg in ("--config", str(config))]
    cli = DistillationCLI(args=[*args, "--model.init_args.teacher_checkpoint=null"], run=False)
    return cli.model


@pytest.mark.parametrize("recipe", ["teacher", "baseline"])
def test_single_model_recipes(recipe: str) -> None:
    module = build(CONFIGS / f"{recipe}.yaml")
    assert module.teacher is None and module.num_classes == 100


@pytest.mark.parametrize("method", ["kd", *OVERLAYS])
def test_method_recipe_builds_and_computes_its_loss(method: str) -> None:
    configs = [CONFIGS / "kd.yaml"] + ([CONFIGS / "methods" / f"{method}.yaml"] if method != "kd" else [])
    module = build(*configs)
    assert (
        type(module.student).__name__ == "ResNet"
        and sum(p.numel() for p in module.student.parameters()) == 1233540
    )
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,)), torch.arange(8))  # index: for CRD
    if any(isinstance(term, MLKDTerm) for term in module.loss_terms.values()):  # weak and strong views
        batch = TwoViewBatch(torch.randn(8, 3, 32, 32), torch.randint(0, 100, (4,)).repeat(2))
    hooks = module._declared_hooks()
    module.feature_hooks = hooks
    if hooks is not None:
        hooks.attach(module)
    module.build_terms(batch)
    total, values = module.compute_loss(module.step_outputs(batch))
    assert torch.isfinite(total) and set(values) == set(module.loss_terms)
    total.backward()
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)
