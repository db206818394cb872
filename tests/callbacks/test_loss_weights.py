"""LossWeightSchedule: per-epoch warm-up of a term weight, unknown term names."""

from __future__ import annotations

import pytest

from lightning_kd import LossWeightSchedule
from tests.helpers import RandomDataModule, RecordTemperatureAndWeight, _kd_module, make_trainer


def test_loss_weight_warmup_per_epoch() -> None:
    recorder = RecordTemperatureAndWeight()
    warmup = LossWeightSchedule("kd", start=0.25, end=1.0, interval="epoch", total=3)
    trainer = make_trainer(max_epochs=5, callbacks=[warmup, recorder])
    trainer.fit(_kd_module(), datamodule=RandomDataModule(n=32, batch_size=16))
    weights_by_epoch = [recorder.seen[i][2] for i in range(0, 10, 2)]
    assert weights_by_epoch == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert trainer.callback_metrics["kd/weight_kd"].item() == pytest.approx(1.0)


def test_schedule_names_unknown_term() -> None:
    trainer = make_trainer(callbacks=[LossWeightSchedule("dkd", start=0.0, end=1.0)])
    with pytest.raises(ValueError, match=r"no loss term named 'dkd'.*\['ce', 'kd'\]"):
        trainer.fit(_kd_module(), datamodule=RandomDataModule())
