"""python_docs/gkd and python_docs/seqkd fit a few steps from YAML with tiny overrides.

The overrides of test_python_docs_recipes.py, prompts of 8 tokens in blocks of 32, 6 new tokens, and
an untrained teacher (teacher_checkpoint=null: loading the teacher run is tested with kd.yaml, and
both recipes name the same checkpoint as kd.yaml); gkd's student starts from the baseline run only
in the test of that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main
from tests.training.test_python_docs_recipes import CONFIGS, size, small


def test_the_recipes_load_the_teacher_run_of_kd_yaml() -> None:
    def settings(name: str) -> dict:
        return yaml.safe_load((CONFIGS / name).read_text())

    kd = settings("kd.yaml")["model"]["init_args"]
    gkd = settings("gkd.yaml")["model"]["init_args"]
    seqkd = settings("seqkd.yaml")["data"]["init_args"]
    assert gkd["teacher_checkpoint"] == seqkd["teacher_checkpoint"] == kd["teacher_checkpoint"]
    assert gkd["teacher"] == seqkd["teacher"] == kd["teacher"] and gkd["student"] == kd["student"]
    baseline = settings("baseline.yaml")["trainer"]["logger"]["init_args"]
    assert gkd["student_checkpoint"] == f"{baseline['save_dir']}/{baseline['name']}/latest.ckpt"


def tiny(cache: Path, data: str = "--data.init_args.") -> list[str]:
    """The overrides of ``small`` with the data's arguments under ``data``, and 8-token prompts."""
    return [arg.replace("--data.init_args.", data) for arg in small(cache)] + [f"{data}prompt_length=8"]


def test_gkd_recipe_generates_on_policy_and_logs_generation_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path
    args = [
        "--model.init_args.lmbda=1.0",
        "--model.init_args.max_new_tokens=6",
        "--model.init_args.teacher_checkpoint=null",
        "--model.init_args.student_checkpoint=null",
    ]
    teacher = size("teacher", 1, 32, 2)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "gkd.yaml"),
            *tiny(workdir / "cache"),
            *size("student", 1, 16, 2),
            *teacher,
            *args,
        ]
    )
    lines = (workdir / "runs/python_docs/gkd/version_0/metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for column in ("train/loss_kd", "train/generation_seconds", "train/on_policy_batches", "val/perplexity"):
        assert column in header, column
    batches = [row.split(",")[header.index("train/on_policy_batches")] for row in lines[1:]]
    assert [float(value) for value in batches if value] == [1.0, 1.0]  # lmbda 1: both steps generated


def test_seqkd_recipe_generates_once_then_trains_on_the_completions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path
    data = tiny(workdir / "cache", "--data.init_args.text.init_args.") + [
        "--data.init_args.teacher_checkpoint=null",
        "--data.init_args.max_new_tokens=6",
        "--data.init_args.max_prompts=24",
        "--data.init_args.generation_batch_size=16",
        *[
            arg.replace("--model.init_args.teacher", "--data.init_args.teacher")
            for arg in size("teacher", 1, 32, 2)
        ],
    ]
    main(["generate", "--config", str(CONFIGS / "seqkd.yaml"), *data])
    assert "completions in runs/python_docs/seqkd_completions" in capsys.readouterr().out
    folder = workdir / "runs/python_docs/seqkd_completions"
    written = {path.name: path.stat().st_mtime_ns for path in folder.glob("batch-*.pt")}
    assert written and (folder / "manifest.json").is_file()
    main(["fit", "--config", str(CONFIGS / "seqkd.yaml"), *data])
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("batch-*.pt")} == written  # not redone
    header = (workdir / "runs/python_docs/seqkd/version_0/metrics.csv").read_text().splitlines()[0]
    assert "train/loss_ce" in header and "val/perplexity" in header
    assert torch.load(workdir / "runs/python_docs/seqkd/latest.ckpt", weights_only=True)["state_dict"]
    # another generation setting: the folder is refused, with what differs
    with pytest.raises(ValueError, match="generated with another generation"):
        main(
            ["generate", "--config", str(CONFIGS / "seqkd.yaml"), *data, "--data.init_args.max_new_tokens=5"]
        )


def test_generate_names_the_recipes_that_have_a_generation_pass(capsys: pytest.CaptureFixture[str]) -> None:
    main(["generate", "--help"])
    assert "usage: lightning-kd generate --config RECIPE" in capsys.readouterr().out
    with pytest.raises(
        SystemExit, match=r"\(PythonDocsText\) has no generation pass; use a recipe whose data"
    ):
        main(["generate", "--config", str(CONFIGS / "baseline.yaml")])


def test_gkd_recipe_starts_the_student_from_the_baseline_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    student = size("student", 1, 16, 2)
    steps = ["--trainer.max_steps=10", "--trainer.limit_train_batches=10"]  # enough to move from the start
    main(["fit", "--config", str(CONFIGS / "baseline.yaml"), *small(tmp_path / "cache"), *student, *steps])
    baseline = tmp_path / "runs/python_docs/baseline/latest.ckpt"

    def val_perplexity(recipe: str, *args: str) -> float:
        data = tiny(tmp_path / "cache") if recipe == "gkd.yaml" else small(tmp_path / "cache")
        main(["validate", "--config", str(CONFIGS / recipe), *data, *student, *args])
        runs = sorted((tmp_path / "runs/python_docs" / recipe.removesuffix(".yaml")).glob("version_*"))
        lines = (runs[-1] / "metrics.csv").read_text().splitlines()
        return float(lines[1].split(",")[lines[0].split(",").index("val/perplexity")])

    on_policy = ["--model.init_args.teacher_checkpoint=null", *size("teacher", 1, 32, 2)]
    fresh = "--model.init_args.student_checkpoint=null"
    started = val_perplexity("gkd.yaml", *on_policy, f"--model.init_args.student_checkpoint={baseline}")
    assert started == pytest.approx(val_perplexity("baseline.yaml", f"--ckpt_path={baseline}"), rel=1e-6)
    assert started != pytest.approx(
        val_perplexity("gkd.yaml", *on_policy, fresh), rel=1e-3
    )  # not a fresh student (0.5% apart)
    # the recipe's own relative start path: the run's checkpoint records it apart
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "gkd.yaml"),
            *tiny(tmp_path / "cache"),
            *student,
            *on_policy,
        ]
    )
    saved = torch.load(tmp_path / "runs/python_docs/gkd/latest.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["student_checkpoint"] is None
    assert saved["student_start"] == str(baseline.resolve())
