"""LossWeightSchedule: per-epoch warm-up of a term weight, unknown term names, weights that are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_kd import DistillationStages, LossWeightSchedule, Stage
from lightning_kd.cli import main
from lightning_kd.recipes import RECIPES_DIR
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


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"start": -0.5}, "start must be a finite number >= 0 .* got -0.5"),
        ({"end": float("inf")}, "end must be a finite number >= 0 .* got inf"),
        ({"end": float("nan")}, "end must be a finite number >= 0 .* got nan"),
        (
            {"schedule": "step", "gamma": -1.0, "milestones": [1]},
            r"gamma \(the step factor\) must be .* got -1.0",
        ),
    ],
)
def test_schedule_refuses_negative_or_non_finite_weights_naming_term_value_and_fix(
    options: dict, shown: str
) -> None:
    with pytest.raises(ValueError, match=rf"Loss term 'kd': LossWeightSchedule {shown}.*set a weight >= 0"):
        LossWeightSchedule("kd", **options)


def test_stage_weights_are_checked_before_training() -> None:
    with pytest.raises(
        ValueError, match=r"Loss term 'kd': Stage 1 weight must be a finite number >= 0.*got -1"
    ):
        DistillationStages([Stage(epochs=1, weights={"ce": 1.0}), Stage(weights={"kd": -1})])


def test_a_negative_weight_in_yaml_stops_the_run_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    term = "{class_path: lightning_kd.CrossEntropyTerm, init_args: {weight: -1.0}}"
    with pytest.raises(ValueError, match=r"Loss term 'ce': weight must be a finite number >= 0.*got -1.0"):
        main(
            [
                "fit",
                "--config",
                str(RECIPES_DIR / "mnist1d/baseline.yaml"),
                f"--model.init_args.losses=[{term}]",
            ]
        )
