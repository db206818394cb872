"""Temperature and loss-weight schedules: values, logging, and resume from a checkpoint."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import RandomDataModule, make_trainer, small_net
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import DistillationModule, LossWeightSchedule, TemperatureAnnealing
from lightning_kd.callbacks import schedule_value


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


class RecordTemperatureAndWeight(pl.Callback):
    """Records (global_step, temperature, kd weight) as the training step sees them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        kd = pl_module.loss_terms["kd"]
        # global_step already advanced: the step that just ran is global_step - 1
        self.seen.append((trainer.global_step - 1, kd.temperature, kd.weight))


def _kd_module() -> DistillationModule:
    pl.seed_everything(0, verbose=False)
    return DistillationModule(small_net(), small_net())


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


def test_temperature_without_a_temperature_term_is_an_error() -> None:
    trainer = make_trainer(callbacks=[TemperatureAnnealing(start=4.0, end=1.0)])
    with pytest.raises(ValueError, match="no loss term with a temperature"):
        trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())


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
    make_trainer(max_epochs=3, callbacks=[*_schedules(), resumed]).fit(
        _kd_module(), datamodule=datamodule, ckpt_path=tmp_path / "epoch1.ckpt"
    )
    assert first.seen + resumed.seen == uninterrupted.seen  # same formula, same position: exact
    assert [s for s, _, _ in resumed.seen] == list(range(4, 12))
