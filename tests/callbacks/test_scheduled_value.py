"""Schedule values (linear, cosine, step), bad schedules, and exact resume of scheduled callbacks."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import LossWeightSchedule, TemperatureAnnealing
from lightning_kd.callbacks import schedule_value
from tests.helpers import RandomDataModule, RecordTemperatureAndWeight, _kd_module, make_trainer


@pytest.mark.parametrize(
    ("schedule", "elapsed", "expected"),
    [
        ("constant", 7, 8.0),
        ("linear", 0, 8.0),
        ("linear", 5, 5.0),  # halfway between 8 and 2
        ("linear", 10, 2.0),
        ("linear", 15, 2.0),  # stays at the end value
        ("cosine", 5, 5.0),  # cos(pi/2) = 0 -> midpoint
        ("cosine", 10, 2.0),
        ("exponential", 5, 4.0),  # 8 * (2/8)^0.5
        ("exponential", 10, 2.0),
    ],
)
def test_schedule_values(schedule: str, elapsed: int, expected: float) -> None:
    assert schedule_value(schedule, 8.0, 2.0, elapsed, 10) == pytest.approx(expected)


def test_cosine_quarter_point() -> None:
    expected = 2.0 + 6.0 * (1 + math.cos(math.pi / 4)) / 2
    assert schedule_value("cosine", 8.0, 2.0, 25, 100) == pytest.approx(expected)


def test_step_schedule_multiplies_at_milestones() -> None:
    values = [schedule_value("step", 8.0, None, t, 100, milestones=[3, 6], gamma=0.5) for t in range(8)]
    assert values == [8.0, 8.0, 8.0, 4.0, 4.0, 4.0, 2.0, 2.0]


def test_bad_schedules_are_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown schedule 'warp'"):
        TemperatureAnnealing(start=4.0, end=1.0, schedule="warp")
    with pytest.raises(ValueError, match="must be > 0"):
        TemperatureAnnealing(start=0.0, end=1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        TemperatureAnnealing(start=4.0, end=-1.0)
    with pytest.raises(ValueError, match="needs `end`"):
        LossWeightSchedule("kd", start=0.0, end=None, schedule="linear")
    with pytest.raises(ValueError, match="interval"):
        TemperatureAnnealing(start=4.0, end=1.0, interval="batch")


def _schedules() -> list[pl.Callback]:
    return [
        TemperatureAnnealing(start=8.0, end=1.0, schedule="cosine", interval="step", total=12),
        LossWeightSchedule("kd", start=0.1, end=0.9, schedule="linear", interval="epoch", total=3),
    ]


def test_schedules_resume_from_checkpoint_exactly(tmp_path: Any) -> None:
    datamodule = RandomDataModule(n=64, batch_size=16)

    uninterrupted = RecordTemperatureAndWeight()
    make_trainer(max_epochs=3, callbacks=[*_schedules(), uninterrupted]).fit(
        _kd_module(), datamodule=datamodule
    )

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="epoch1")
    first = RecordTemperatureAndWeight()
    trainer = make_trainer(
        max_epochs=1, callbacks=[*_schedules(), first, checkpoint], enable_checkpointing=True
    )
    trainer.fit(_kd_module(), datamodule=datamodule)
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    states = [s for key, s in saved["callbacks"].items() if key.startswith("TemperatureAnnealing")]
    assert states and states[0]["current"] == pytest.approx(first.seen[-1][1])

    resumed = RecordTemperatureAndWeight()
    with pytest.warns(UserWarning, match="Resumed with another run length"):  # the LR schedule re-plans
        make_trainer(max_epochs=3, callbacks=[*_schedules(), resumed]).fit(
            _kd_module(), datamodule=datamodule, ckpt_path=tmp_path / "epoch1.ckpt"
        )
    assert first.seen + resumed.seen == uninterrupted.seen  # same formula, same position: exact
    assert [s for s, _, _ in resumed.seen] == list(range(4, 12))
