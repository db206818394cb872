"""benchmarks/real_images.py, tiny: the teacher once, two methods, paired gains, a resume training nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_images.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_images", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_images"] = module  # dataclasses look their module up by name
    sys.path.insert(0, str(SCRIPT.parent))  # it imports seeds.py beside it, as a run of the script does
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["real_images"]
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_tiny_run_records_every_run_tabulates_paired_gains_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script()
    budget = script.Budget(teacher_epochs=1, student_epochs=1, train_samples=96)
    out = tmp_path / "runs"
    teacher = script.run_all(["baseline", "kd"], [0], budget, out, processes=1)
    records = script.read_records(out / "records.jsonl")
    assert sorted(r["method"] for r in records) == ["baseline", "kd"]
    assert all(0 <= r["accuracy"] <= 1 and r["cpu_seconds_per_epoch"] > 0 for r in records)
    assert json.loads((out / "teacher.json").read_text())["accuracy"] == teacher

    # an interrupted run (its last line cut short) continues: finished runs and the teacher are kept
    with (out / "records.jsonl").open("a") as sink:
        sink.write('{"method": "dkd", "se')
    trained: list[str] = []
    monkeypatch.setattr(script, "fit_and_test", lambda name, *a, **k: trained.append(name))
    monkeypatch.setattr(script, "run_one", lambda job: trained.append(job[0]) or records[0])
    assert script.run_all(["baseline", "kd"], [0], budget, out, processes=1) == teacher
    assert trained == []

    by_method = {r["method"]: r for r in records}
    lines = script.table(records, teacher, budget)
    (kd_row,) = [line for line in lines if line.startswith("| kd |")]
    gain = 100 * (by_method["kd"]["accuracy"] - by_method["baseline"]["accuracy"])
    assert f"| {gain:+.2f} ± 0.00 | {int(gain > 0)}/1 |" in kd_row
    assert f"{100 * teacher:.2f}" in lines[0]
