"""benchmarks/lm_distillation.py: a --quick run trains every model, pairs a seed's runs, reuses records."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_distillation.py"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_distillation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_pairs_the_runs_of_a_seed_and_reports_their_gains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    results = script.RESULTS.read_text() if script.RESULTS.exists() else None
    args = ["--quick", "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    text = script.main(args)
    assert (script.RESULTS.read_text() if script.RESULTS.exists() else None) == results  # --quick writes none
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs/records").glob("*.json")}
    assert set(records) == {"teacher", "seed0-alone", "seed0-forward_kl", "seed0-jsd"}
    teacher, alone = records["teacher"], records["seed0-alone"]
    assert teacher["steps"] == 3 and alone["steps"] == 3 and teacher["teacher_checkpoint"] is None
    assert teacher["parameters"] == 30_176 and alone["parameters"] == 12_016  # (1, 32, 2) and (1, 16, 2)
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in text.splitlines()
        if line.startswith("| ")
    }
    for divergence in ("forward_kl", "jsd"):
        kd = records[f"seed0-{divergence}"]
        # paired: the same student start and the same batches as the student alone, the trained teacher
        assert kd["start_weights"] == alone["start_weights"] and kd["first_batch"] == alone["first_batch"]
        assert kd["teacher_checkpoint"] == teacher["checkpoint"] and kd["steps"] == 3
        assert kd["teacher_test_perplexity"] == pytest.approx(teacher["test_perplexity"], rel=1e-5)
        gain = alone["test_perplexity"] - kd["test_perplexity"]
        assert rows[divergence][0].strip() == f"{gain:+.2f}"
        assert (
            rows[f"student, 0.5 CE + 0.5 {divergence}"][2].strip()
            == f"{kd['test_perplexity']:.2f} (one seed)"
        )
    assert rows["teacher (CE)"][2].strip() == f"{teacher['test_perplexity']:.2f}"
    assert rows["teacher (CE)"][3].strip() == f"{teacher['val_perplexity']:.2f}"
    # before any distilled student has a record: the students alone, and no empty gains table
    partial = script.table([alone], None, ["forward_kl"]).splitlines()
    assert partial[-1] == "No distilled student has a record yet: no paired gains."
    assert not [line for line in partial if line.startswith("| divergence")]
    # the docs page includes the results under an h2 section: no h1 or h2 of its own
    assert not [line for line in text.splitlines() if line.startswith(("# ", "## "))]
    # a second run reuses the records of the same settings instead of training again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs/records").glob("*.json")}
    assert script.main(args) == text
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # --report tabulates the records there are, training nothing
    assert script.main([*args, "--report"]).split("Versions:")[1] == text.split("Versions:")[1]
    # a teacher record is reused when only the students' settings change
    other_steps, other_lr = (
        script.dataclasses.replace(script.QUICK, **c) for c in ({"steps": 2}, {"lr": 1e-3})
    )
    assert script.same_settings(teacher, other_steps) and not script.same_settings(alone, other_steps)
    assert not script.same_settings(teacher, other_lr)
    # --teacher reuses a trained teacher (and its record, for the table) instead of training one
    reuse = ["--quick", "--out-dir", str(tmp_path / "reuse"), "--cache-dir", str(tmp_path / "cache")]
    reused = script.main([*reuse, "--teacher", teacher["checkpoint"], "--divergences", "jsd", "--steps", "2"])
    assert {p.stem for p in (tmp_path / "reuse/records").glob("*.json")} == {"seed0-alone", "seed0-jsd"}
    kd = json.loads((tmp_path / "reuse/records/seed0-jsd.json").read_text())
    assert kd["teacher_checkpoint"] == teacher["checkpoint"] and kd["steps"] == 2
    assert [line for line in reused.splitlines() if line.startswith("| teacher")] == [
        line for line in text.splitlines() if line.startswith("| teacher")
    ]
