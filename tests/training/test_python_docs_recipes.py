"""The offline language-model recipes (python_docs/teacher, baseline, kd) fit a few steps from YAML.

Tiny overrides: a few steps, one-layer GPT-2s, 40 documents of the pydoc topics and the ``json``
package's docstrings, a 512-token tokenizer cached in a temporary folder.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from lightning_kd import CausalLMDistillationModule
from lightning_kd.cli import main
from lightning_kd.models import tiny_gpt2
from lightning_kd.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR / "python_docs"
JSON_PACKAGE = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def size(role: str, n_layer: int, n_embd: int, n_head: int) -> list[str]:
    """Overrides of the GPT-2 config of ``role`` (student or teacher)."""
    prefix = f"--model.init_args.{role}.init_args.config.init_args."
    return [f"{prefix}n_layer={n_layer}", f"{prefix}n_embd={n_embd}", f"{prefix}n_head={n_head}"]


def small(cache: Path) -> list[str]:
    return [
        "--trainer.max_steps=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.stdlib={JSON_PACKAGE}",
        "--data.init_args.max_documents=40",
        "--data.init_args.vocab_size=512",
        "--data.init_args.block_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.2",
        "--data.init_args.test_fraction=0.2",
        f"--data.init_args.cache_dir={cache}",
    ]


TEACHER, STUDENT = size("student", 1, 32, 2), size("student", 1, 16, 2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose runs/ holds a (briefly) trained teacher of teacher.yaml."""
    root = tmp_path_factory.mktemp("python_docs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *small(root / "cache"), *TEACHER])
    return root


def test_recipes_train_the_example_sizes() -> None:
    """Without overrides the recipes build the 2.59M teacher and the 0.37M student at 4,096 tokens."""
    from lightning_kd.cli import DistillationCLI

    args = ["--model.init_args.teacher_checkpoint=null"]
    kd = DistillationCLI(args=["--config", str(CONFIGS / "kd.yaml"), *args], run=False).model
    baseline = DistillationCLI(args=["--config", str(CONFIGS / "baseline.yaml")], run=False).model
    teacher = DistillationCLI(args=["--config", str(CONFIGS / "teacher.yaml")], run=False).model

    def parameters(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())  # the tied head counted once

    def gpt2(layers: int, width: int, vocab: int = 4096, positions: int = 128) -> int:
        """Embeddings + per block (attention 4d^2 + 4d, MLP 8d^2 + 5d, two layer norms 4d) + final norm."""
        return (vocab + positions) * width + layers * (12 * width**2 + 13 * width) + 2 * width

    assert parameters(teacher.student) == parameters(kd.teacher) == gpt2(4, 192) == 2_590_848
    assert parameters(baseline.student) == parameters(kd.student) == gpt2(2, 64) == 370_432
    assert parameters(kd.student) == parameters(tiny_gpt2(4096, "student", n_positions=128))
    assert parameters(kd.teacher) == parameters(tiny_gpt2(4096, "teacher", n_positions=128))
    assert teacher.teacher is None and baseline.teacher is None
    assert {name: term.weight for name, term in kd.loss_terms.items()} == {"ce": 0.5, "kd": 0.5}
    assert kd.loss_terms["kd"].divergence == "forward_kl" and kd.loss_terms["kd"].temperature == 1.0
    assert kd.student.config.n_positions == kd.teacher.config.n_positions == 128
    # the sizing study's schedule: linear warm-up from 1% over 100 optimizer steps, then constant
    for module in (teacher, baseline, kd):
        optimizer = torch.optim.AdamW(module.student.parameters(), lr=0.002)
        scheduler = module.lr_scheduler_factory(optimizer)
        assert module.lr_scheduler_interval == "step"
        rates = []
        for _ in range(150):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert rates[0] == pytest.approx(2e-5) and rates[50] == pytest.approx(2e-5 + 50 * 1.98e-5)
        assert rates[100] == rates[149] == pytest.approx(0.002)


def test_baseline_recipe_fits(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    main(["fit", "--config", str(CONFIGS / "baseline.yaml"), *small(workdir / "cache"), *STUDENT])
    header = (workdir / "runs/python_docs/baseline/version_0/metrics.csv").read_text().splitlines()[0]
    assert "train/loss_ce" in header and "val/perplexity" in header and "train/loss_kd" not in header


def test_kd_recipe_loads_the_teacher_run_as_its_frozen_teacher(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "kd.yaml"),
            *small(workdir / "cache"),
            *STUDENT,
            *size("teacher", 1, 32, 2),
        ]
    )
    header = (workdir / "runs/python_docs/kd/version_0/metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss_ce", "train/loss_kd", "val/perplexity", "val/teacher_perplexity"):
        assert column in header, column
    kd = workdir / "runs/python_docs/kd/latest.ckpt"
    assert not any(key.startswith("teacher.") for key in torch.load(kd, weights_only=True)["state_dict"])
    # the teacher run trained its network as `student.`: the distillation run's teacher holds exactly it
    trained = torch.load(workdir / "runs/python_docs/teacher/latest.ckpt", weights_only=True)["state_dict"]
    restored = CausalLMDistillationModule.load_from_checkpoint(kd)
    teacher = restored.teacher.state_dict()
    assert set(teacher) == {key.removeprefix("student.") for key in trained if key.startswith("student.")}
    for name, value in teacher.items():
        assert torch.equal(value, trained[f"student.{name}"]), name
    assert restored.teacher.lm_head.weight is restored.teacher.transformer.wte.weight  # still tied
    assert not any(p.requires_grad for p in restored.teacher.parameters())
