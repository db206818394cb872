"""The quickstart pipeline on a reduced budget, and the example script."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_kd.quickstart import main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_reduced_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budget = ["--teacher-epochs", "10", "--student-epochs", "1", "--train-samples", "1000"]
    result = main([*budget, "--out-dir", str(tmp_path), "--no-progress"])
    assert result.teacher > 0.3  # 10 classes: chance is 0.1
    assert 0.0 <= result.baseline <= 1.0 and 0.0 <= result.kd <= 1.0
    assert result.gain == pytest.approx(result.kd - result.baseline)
    printed = capsys.readouterr().out
    assert "student + Hinton KD (MLP)" in printed and f"{100 * result.teacher:6.2f}" in printed
    for name in ("teacher", "baseline", "kd"):  # a run folder each
        assert (tmp_path / name / "version_0" / "checkpoints" / f"{name}.ckpt").is_file()
    main([*budget, "--out-dir", str(tmp_path), "--no-progress"])  # again: new folders, nothing overwritten
    assert (tmp_path / "kd" / "version_1" / "checkpoints" / "kd.ckpt").is_file()


def test_custom_term_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("custom_term", ROOT / "examples" / "custom_term.py")
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(teacher_epochs=1, epochs=1, train_samples=600)
    assert {"test/acc", "test/teacher_acc", "test/agreement"} <= set(metrics)


def test_a_clean_quickstart_run_prints_no_warning(tmp_path: Path) -> None:
    budget = ["--teacher-epochs", "1", "--student-epochs", "1", "--no-progress"]  # the real data size
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning shown once, none hidden by pytest
    run = subprocess.run(
        [sys.executable, "-m", "lightning_kd.quickstart", *budget, "--out-dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    warned = [
        line
        for line in (run.stdout + run.stderr).splitlines()
        if re.search(r"\.py:\d+: |Warning|will override existing callbacks", line)
    ]
    assert warned == []
