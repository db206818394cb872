"""Fit one tiny distillation scenario with epoch-end ``last.ckpt``.

Run by tests/training/test_resume_after_kill.py.

``kill_resume.py OUT SCENARIO --kill-at-step N``: after optimizer step N the run writes
``OUT/step.txt`` and waits, so the test can SIGKILL it there (mid-epoch). Without
``--kill-at-step`` it trains to the end (resuming from ``OUT/ckpt/last.ckpt`` with ``--resume``)
and saves the final state and the last logged loss to ``OUT/final.pt``. ``--ckpt-dir DIR`` puts
the checkpoints in ``DIR`` instead. With the environment variable ``KILL_RESUME_SLOW_COMMIT=FILE``,
the commit of each ``last.ckpt`` that replaces an earlier one (the new file written and synced,
``os.replace`` not yet done) writes ``FILE`` and waits, so the test can SIGKILL it there. The test
also imports :func:`fit` to run the uninterrupted and the resumed fits in its own process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.callbacks import (  # noqa: E402
    DistillationStages,
    LossWeightSchedule,  # noqa: E402
    Stage,
    TemperatureAnnealing,  # noqa: E402
)
from lightning_kd.data import WithIndex  # noqa: E402
from lightning_kd.losses import (  # noqa: E402
    CRDTerm,  # noqa: E402
    CrossEntropyTerm,
    FitNetTerm,  # noqa: E402
    KDTerm,
)
from lightning_kd.teachers import TeacherOutputCache  # noqa: E402
from tests.helpers import RandomDataModule, small_net  # noqa: E402

SCENARIOS = ("schedules", "trainable", "ema", "crd", "stages", "cache")
EPOCHS, SAMPLES, BATCH = 4, 48, 16  # 3 steps per epoch, 12 in all
SEED = 7


class IndexedDataModule(RandomDataModule):
    def _dataset(self) -> Dataset:
        return WithIndex(super()._dataset())


class StopAtStep(pl.Callback):
    """After optimizer step ``step``: write the marker file, then wait to be killed."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(f"{trainer.global_step} {trainer.current_epoch}")
            time.sleep(120)


def wait_in_last_ckpt_commit(marker: Path) -> None:
    """Make the commit that replaces an existing ``last.ckpt`` write ``marker`` and wait to be killed."""
    replace = os.replace

    def waiting_replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "last.ckpt" and Path(target).exists():
            marker.write_text(str(source))
            time.sleep(120)
        replace(source, target)

    os.replace = waiting_replace


def _module(scenario: str, out_dir: Path) -> DistillationModule:
    optimizer = lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9)  # noqa: E731
    common: dict[str, Any] = dict(optimizer=optimizer)
    if scenario == "schedules":
        losses = [CrossEntropyTerm(), KDTerm(temperature=4.0)]
        return DistillationModule(small_net(), small_net(hidden=32), losses=losses, **common)
    if scenario == "trainable":
        return DistillationModule(small_net(), small_net(hidden=32), teacher_mode="trainable", **common)
    if scenario == "ema":
        return DistillationModule(small_net(), teacher_mode="ema", ema_decay=0.8, **common)
    if scenario == "crd":
        crd = CRDTerm("2", "2", num_samples=SAMPLES, feat_dim=8, num_negatives=8)
        return DistillationModule(
            small_net(), small_net(hidden=32), losses=[CrossEntropyTerm(), crd], **common
        )
    if scenario == "stages":
        losses = [CrossEntropyTerm(), KDTerm(weight=0.5), FitNetTerm("2", "2", weight=10.0)]
        return DistillationModule(small_net(), small_net(hidden=32), losses=losses, **common)
    if scenario == "cache":  # memory-mapped teacher outputs, filled in the first epoch
        cache = TeacherOutputCache(out_dir / "teacher_cache")
        return DistillationModule(small_net(), small_net(hidden=32), teacher_cache=cache, **common)
    raise ValueError(f"Unknown scenario {scenario!r}; choose from {SCENARIOS}.")


def _callbacks(scenario: str) -> list[pl.Callback]:
    if scenario == "schedules":
        return [
            TemperatureAnnealing(start=4.0, end=1.0, schedule="cosine"),
            LossWeightSchedule("kd", start=0.0, end=1.0, interval="epoch", total=EPOCHS - 1),
        ]
    if scenario == "stages":
        return [
            DistillationStages(
                [Stage(epochs=2, weights={"fitnet": 1.0}, trainable=["loss_terms.fitnet"]), Stage()]
            )
        ]
    return []


def fit(
    out_dir: Path,
    scenario: str,
    kill_at_step: int | None = None,
    resume: bool = False,
    ckpt_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit ``scenario`` (optionally resuming from ``last.ckpt`` in ``ckpt_dir``, default
    ``out_dir/ckpt``); return its final state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(SEED, verbose=False)
        module = _module(scenario, out_dir)
        datamodule = (IndexedDataModule if scenario in ("crd", "cache") else RandomDataModule)(
            n=SAMPLES, batch_size=BATCH
        )
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir or out_dir / "ckpt", save_last=True, every_n_epochs=1)
        callbacks = [checkpoint, *_callbacks(scenario)]
        if kill_at_step is not None:
            callbacks.append(StopAtStep(kill_at_step, out_dir / "step.txt"))
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=EPOCHS,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            callbacks=callbacks,
            default_root_dir=out_dir,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path="last" if resume else None)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
        return {"state": state, "metrics": metrics, "global_step": trainer.global_step}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("KILL_RESUME_SLOW_COMMIT"):
        wait_in_last_ckpt_commit(Path(os.environ["KILL_RESUME_SLOW_COMMIT"]))
    result = fit(args.out_dir, args.scenario, args.kill_at_step, args.resume, args.ckpt_dir)
    torch.save(result, args.out_dir / "final.pt")


if __name__ == "__main__":
    main()
