"""benchmarks/cifar_recipes_gpu.py: a recipe runs on synthetic data and its row projects the epoch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cifar_recipes_gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("cifar_recipes_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_is_listed_and_mlkd_trains_on_two_views() -> None:
    bench = load()
    names = bench.recipe_names()
    assert names[:3] == ["teacher", "baseline", "kd"] and {"mlkd", "crd", "dkd"} <= set(names)
    row = bench.measure("mlkd", "cpu", "32", warmup=1, steps=1, batch=2)
    assert row["batch"] == 2 and row["epochs"] == 240 and row["step_ms"] > 0
    assert row["epoch_s"] == row["step_ms"] / 1e3 * bench.TRAIN_IMAGES / 2  # 25,000 steps of batch 2
    assert abs(row["run_h"] - row["epoch_s"] * 240 / 3600) < 1e-9
    report = bench.table([row], "cpu", "32", 1, 1)
    assert "| mlkd | 2 |" in report and "(240 epochs)" in report
