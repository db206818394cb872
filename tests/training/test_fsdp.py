"""DistillationFSDPStrategy: student and teacher in separate FSDP units, a frozen teacher left out.

FSDP cannot run on CPU in torch 2.14 ("FSDP needs a non-CPU accelerator device"), so on CPU the
wrap policy and the strategy's set-up are checked without wrapping; the fit itself runs only
where CUDA is available (``tests/scripts/fsdp_fit.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_kd import DistillationModule
from lightning_kd.losses import CrossEntropyTerm, FitNetTerm, KDTerm
from lightning_kd.strategies import DistillationFSDPStrategy, distillation_wrap_policy
from tests.helpers import small_net

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fsdp_fit.py"


def make_module(teacher_mode: str = "frozen") -> DistillationModule:
    terms = [CrossEntropyTerm(), KDTerm(), FitNetTerm("0", "0", weight=1.0)]
    if teacher_mode == "trainable":
        terms.append(CrossEntropyTerm("teacher_ce", model="teacher"))
    teacher = None if teacher_mode == "ema" else small_net(hidden=24)
    module = DistillationModule(small_net(), teacher, losses=terms, teacher_mode=teacher_mode)
    module.build_terms((torch.randn(4, 8), torch.randint(0, 4, (4,))))  # the FitNet regressor (trainable)
    return module


def flat_groups(module: nn.Module, units: set[nn.Module], ignored: set[nn.Module]) -> list[list[bool]]:
    """``requires_grad`` of the parameters each FSDP unit (and the root) would flatten together."""
    groups: dict[nn.Module, list[bool]] = {}

    def visit(current: nn.Module, owner: nn.Module) -> None:
        if current in ignored:
            return
        owner = current if current in units else owner
        groups.setdefault(owner, []).extend(p.requires_grad for p in current.parameters(recurse=False))
        for child in current.children():
            visit(child, owner)

    visit(module, module)
    return [group for group in groups.values() if group]


def policy_units(module: DistillationModule, ignored: set[nn.Module], **kwargs: object) -> set[nn.Module]:
    return set(distillation_wrap_policy(module, **kwargs)._run_policy(module, ignored, {}))


def test_policy_makes_student_and_teacher_units() -> None:
    module = make_module()
    assert policy_units(module, set()) == {module.student, module.teacher}
    ignored = set(module.teacher.modules())
    assert policy_units(module, ignored, wrap_teacher=False) == {module.student}
    linears = policy_units(module, set(), layer_classes=[nn.Linear])
    assert {module.student, module.teacher, module.student[0], module.teacher[3]} <= linears


@pytest.mark.parametrize("wrap_teacher", [True, False])
def test_no_unit_mixes_frozen_and_trainable_parameters(wrap_teacher: bool) -> None:
    module = make_module()
    ignored = set() if wrap_teacher else set(module.teacher.modules())
    groups = flat_groups(module, policy_units(module, ignored, wrap_teacher=wrap_teacher), ignored)
    assert all(len(set(group)) == 1 for group in groups), groups
    assert [False] * 6 in groups if wrap_teacher else all(all(group) for group in groups)
    # without the policy, one flat parameter would hold both: the check can fail
    assert any(len(set(group)) == 2 for group in flat_groups(module, set(), set()))


def setup_kwargs(
    module: DistillationModule, monkeypatch: pytest.MonkeyPatch, **kwargs: object
) -> DistillationFSDPStrategy:
    """Run the strategy's setup up to wrapping (FSDPStrategy.setup, which needs a GPU, is recorded)."""
    monkeypatch.setattr(FSDPStrategy, "setup", lambda self, trainer: None)
    strategy = DistillationFSDPStrategy(**kwargs)
    strategy.setup(SimpleNamespace(lightning_module=module))
    return strategy


def test_strategy_leaves_a_frozen_teacher_out(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make_module()
    strategy = setup_kwargs(module, monkeypatch, sharding_strategy="SHARD_GRAD_OP")
    assert strategy.kwargs["ignored_modules"] == [module.teacher]
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    units = set(strategy.kwargs["auto_wrap_policy"]._run_policy(module, set(module.teacher.modules()), {}))
    assert units == {module.student}


@pytest.mark.parametrize(("teacher_mode", "shard_teacher"), [("frozen", True), ("trainable", False)])
def test_strategy_wraps_a_sharded_or_trained_teacher_on_its_own(
    teacher_mode: str, shard_teacher: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = make_module(teacher_mode)
    strategy = setup_kwargs(module, monkeypatch, shard_teacher=shard_teacher)
    assert strategy.kwargs["ignored_modules"] == []
    units = set(strategy.kwargs["auto_wrap_policy"]._run_policy(module, set(), {}))
    assert units == {module.student, module.teacher}


def test_strategy_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="strategy='ddp'"):
        setup_kwargs(make_module("ema"), monkeypatch)
    with pytest.raises(ValueError, match="needs a module with a `student`"):
        setup_kwargs(nn.Linear(2, 2), monkeypatch)
    with pytest.raises(ValueError, match=r"sets \['auto_wrap_policy'\] itself"):
        DistillationFSDPStrategy(auto_wrap_policy={nn.Linear})
    with pytest.raises(ValueError, match="use_orig_params=False"):
        DistillationFSDPStrategy(use_orig_params=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a GPU (torch raises on CPU)")
@pytest.mark.parametrize("mode", ["frozen", "sharded", "trainable"])
def test_fsdp_fit_on_gpus(mode: str, tmp_path: Path) -> None:
    devices = min(2, torch.cuda.device_count())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), str(tmp_path), mode, "gpu", str(devices)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(devices):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["global_step"] == 4 // devices
        for name, flattened in saved["units"].items():
            assert len({requires_grad for _, requires_grad in flattened}) <= 1, (name, flattened)
        teacher_units = [name for name in saved["units"] if name.endswith("teacher")]
        assert len(teacher_units) == (0 if mode == "frozen" else 1)  # ignored, or a unit of its own
        assert saved["teacher_unchanged"] == (mode != "trainable")
