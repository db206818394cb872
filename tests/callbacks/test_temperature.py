"""TemperatureAnnealing: the temperature follows its schedule per step and is logged."""

from __future__ import annotations

import pytest

from lightning_kd import DistillationModule, TemperatureAnnealing
from tests.helpers import (
    RandomDataModule,
    RecordTemperatureAndWeight,
    _kd_module,
    make_trainer,
    small_net,
)


def test_temperature_follows_schedule_per_step_and_is_logged() -> None:
    recorder = RecordTemperatureAndWeight()
    annealing = TemperatureAnnealing(start=8.0, end=2.0, schedule="linear", interval="step")
    trainer = make_trainer(max_epochs=2, callbacks=[annealing, recorder])
    trainer.fit(_kd_module(), datamodule=RandomDataModule(n=64, batch_size=16))
    total = 8  # 4 batches x 2 epochs
    assert [step for step, _, _ in recorder.seen] == list(range(total))
    for step, temperature, _ in recorder.seen:
        assert temperature == pytest.approx(8.0 - 6.0 * step / total)
    assert trainer.callback_metrics["kd/temperature"].item() == pytest.approx(8.0 - 6.0 * 7 / total)


def test_temperature_without_a_temperature_term_is_an_error() -> None:
    trainer = make_trainer(callbacks=[TemperatureAnnealing(start=4.0, end=1.0)])
    with pytest.raises(ValueError, match="no loss term with a temperature"):
        trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"start": float("inf")}, "start must be > 0 and finite, got inf"),
        ({"start": 4.0, "end": float("nan")}, "end must be > 0 and finite, got nan"),
        ({"start": 4.0, "end": -2.0}, "end must be > 0 and finite, got -2.0"),
        ({"schedule": "step", "gamma": 0.0, "milestones": [2]}, "gamma must be > 0 and finite, got 0.0"),
    ],
)
def test_annealing_refuses_non_positive_or_non_finite_temperatures(options: dict, shown: str) -> None:
    with pytest.raises(ValueError, match=f"TemperatureAnnealing {shown}"):
        TemperatureAnnealing(**options)


def test_annealing_refuses_a_temperature_that_underflows_to_zero_naming_the_terms() -> None:
    annealing = TemperatureAnnealing(start=4.0, schedule="step", milestones=[1, 2], gamma=1e-200)
    module = _kd_module()
    annealing.apply(module, annealing.value_at(1, 10))  # 4e-200: tiny but valid
    assert module.loss_terms["kd"].temperature == pytest.approx(4e-200)
    with pytest.raises(ValueError, match=r"temperature for \['kd'\] must be > 0 and finite, got 0.0"):
        annealing.apply(module, annealing.value_at(2, 10))
