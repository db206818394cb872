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
