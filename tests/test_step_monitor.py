"""StepMonitor: the first non-finite step and its values, found exactly, folded or not."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.step_monitor import StepMonitor


def record_steps(monitor: StepMonitor, steps: int, bad: dict[int, float]) -> None:
    """Record ``steps`` steps of (term, total) = (step, step + 0.5), the total replaced at ``bad`` steps."""
    for step in range(steps):
        total = bad.get(step, step + 0.5)
        monitor.record(step, {"term": torch.tensor(float(step)), "total": torch.tensor(total)})


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("window_limit", [64, 4, 1])
@pytest.mark.parametrize("bad", [{2: math.nan}, {7: math.inf, 9: math.nan}, {9: -math.inf}])
def test_the_first_non_finite_step_and_its_values_are_exact_with_or_without_folding(
    window_limit: int, bad: dict[int, float]
) -> None:
    monitor = StepMonitor(check_finite=True)
    monitor.window_limit = window_limit  # 4 and 1: the early records are folded on the device
    record_steps(monitor, 10, bad)
    reading = monitor.read()
    first = min(bad)
    assert reading.first_bad == first
    assert reading.bad_values["term"] == float(first)
    assert same(reading.bad_values["total"], bad[first])
    assert reading.values["term"] == 9.0 and same(reading.values["total"], bad.get(9, 9.5))
    assert reading.last_step == 9


@pytest.mark.parametrize("window_limit", [64, 3])
def test_finite_records_report_the_latest_values_and_no_bad_step(window_limit: int) -> None:
    monitor = StepMonitor(check_finite=True)
    monitor.window_limit = window_limit
    record_steps(monitor, 10, {})
    reading = monitor.read()
    assert reading.first_bad is None and reading.bad_values == {}
    assert reading.values == {"term": 9.0, "total": 9.5}
    assert monitor.read().values == {"term": 9.0, "total": 9.5}  # read again: still the latest


def test_a_bad_step_before_a_reading_is_reported_after_it_only_once_the_records_go_on() -> None:
    monitor = StepMonitor(check_finite=True)
    record_steps(monitor, 3, {})
    assert monitor.read().first_bad is None
    monitor.record(3, {"term": torch.tensor(3.0), "total": torch.tensor(math.nan)})
    monitor.record(4, {"term": torch.tensor(4.0), "total": torch.tensor(4.5)})
    assert monitor.read().first_bad == 3


def test_without_check_finite_nothing_is_flagged() -> None:
    monitor = StepMonitor(check_finite=False)
    record_steps(monitor, 5, {1: math.nan})
    reading = monitor.read()
    assert reading.first_bad is None
    assert reading.values == {"term": 4.0, "total": 4.5}


def test_only_the_totals_are_checked() -> None:
    monitor = StepMonitor(check_finite=True)
    monitor.record(0, {"term": torch.tensor(math.nan), "total": torch.tensor(1.0)})
    assert monitor.read().first_bad is None  # a NaN term that the total does not carry is not flagged
    monitor.record(1, {"term": torch.tensor(math.nan), "total": torch.tensor(1.0)}, checked=2)
    assert monitor.read().first_bad == 1
