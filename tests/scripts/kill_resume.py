"""Fit one tiny distillation scenario with ``last.ckpt`` at every epoch end (or every step).

Run by tests/training/test_resume_after_kill.py and tests/training/test_exact_resume.py.

``kill_resume.py OUT SCENARIO --kill-at-step N``: after optimizer step N the run writes
``OUT/step.txt`` and waits, so the test can SIGKILL it there (mid-epoch). Without
``--kill-at-step`` it trains to the end (resuming from ``OUT/ckpt/last.ckpt`` with ``--resume``)
and saves the final state, the optimizer state and every step's logged metrics to ``OUT/final.pt``
(``OUT/final-rank<r>.pt`` under ``--devices 2``, 2-process gloo DDP). ``--every-step`` writes
``last.ckpt`` after every optimizer step (mid-epoch checkpoints), ``--workers N`` reads the data in N
worker processes (``--reload``: new loaders every epoch), ``--augment`` adds random transforms
(torch, NumPy and ``random``) to the training data and dropout to the student. ``--ckpt-dir DIR`` puts
the checkpoints in ``DIR`` instead, ``--cache-dir DIR`` the teacher cache (``OUT/teacher_cache``,
``OUT/view_cache`` for the ``views`` scenario: a TeacherViewCache of replayable augmented views),
``--samples N`` trains on N samples instead of 48. With the environment variable
``KILL_RESUME_SLOW_COMMIT=FILE``, the commit of each ``last.ckpt`` that replaces an earlier one (the
new file written and synced, ``os.replace`` not yet done) writes ``FILE`` and waits, so the test can
SIGKILL it there. The test also imports :func:`fit` to run the uninterrupted and the resumed fits in
its own process.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.callbacks import (  # noqa: E402
    DistillationStages,
    LossWeightSchedule,  # noqa: E402
    Stage,
    TemperatureAnnealing,  # noqa: E402
)
from lightning_kd.data import (  # noqa: E402
    ReplayableAugmentation,
    ReplayedViews,
    SignalNoise,
    SignalScale,
    SignalShift,
    ViewSampler,
    WithIndex,
)
from lightning_kd.losses import (  # noqa: E402
    CRDTerm,  # noqa: E402
    CrossEntropyTerm,
    FitNetTerm,  # noqa: E402
    KDTerm,
)
from lightning_kd.teachers import TeacherOutputCache, TeacherViewCache  # noqa: E402
from tests.helpers import RandomDataModule, small_net  # noqa: E402

SCENARIOS = ("schedules", "trainable", "ema", "crd", "stages", "cache", "views")
EPOCHS, SAMPLES, BATCH = 4, 48, 16  # 3 steps per epoch, 12 in all
SEED = 7
VIEWS = 2  # "views": the cache is filled in epochs 0 and 1 (one view per sample each), replayed after


def view_augmentation() -> ReplayableAugmentation:
    """The replayable augmentation of the "views" scenario (a function of seed, sample and view)."""
    return ReplayableAugmentation([SignalShift(2), SignalScale(0.8, 1.2), SignalNoise(0.1)], seed=SEED)


class Augmented(Dataset):
    """Random transforms that draw from the global torch, NumPy and ``random`` generators."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        x, y = self.dataset[index]
        x = x * float(np.random.uniform(0.9, 1.1)) + 0.05 * torch.randn_like(x)
        return (-x if random.random() < 0.5 else x), y


class ResumeDataModule(RandomDataModule):
    """RandomDataModule with sample indices (``indexed``), random transforms and loader workers."""

    def __init__(
        self, indexed: bool, augment: bool, workers: int, views: bool = False, samples: int = SAMPLES
    ) -> None:
        super().__init__(n=samples, batch_size=BATCH)
        self.indexed, self.augment, self.workers, self.views = indexed, augment, workers, views

    def _dataset(self) -> Dataset:
        dataset = super()._dataset()
        return WithIndex(dataset) if self.indexed else dataset

    def train_dataloader(self) -> DataLoader:
        dataset = super()._dataset()
        if self.views:  # (x_view, y, index, view, params), one view per sample and epoch
            views = ReplayedViews(dataset, view_augmentation(), VIEWS)
            sampler = ViewSampler(len(dataset), VIEWS, seed=SEED)
            return DataLoader(views, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers)
        dataset = Augmented(dataset) if self.augment else dataset
        dataset = WithIndex(dataset) if self.indexed else dataset
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.workers)


class StopAtStep(pl.Callback):
    """After optimizer step ``step``: write the marker file (rank 0), then wait to be killed."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if trainer.global_rank == 0:
                self.marker.write_text(f"{trainer.global_step} {trainer.current_epoch}")
            time.sleep(120)


class RecordMetrics(pl.Callback):
    """Every step's and every epoch end's logged metrics, by ``(global_step, where)``."""

    def __init__(self) -> None:
        self.records: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def _take(self, trainer: pl.Trainer, where: str) -> None:
        metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
        self.records[(trainer.global_step, where)] = metrics

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._take(trainer, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._take(trainer, "epoch")


class TeacherSteps(pl.Callback):
    """The global steps (counted before the step) of the training batches on which the teacher ran."""

    def __init__(self, teacher: nn.Module) -> None:
        self.steps: list[int] = []
        self._step: int | None = None
        teacher.register_forward_hook(self._record)

    def _record(self, *_: Any) -> None:
        if self._step is not None:
            self.steps.append(self._step)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step = None


def wait_in_last_ckpt_commit(marker: Path) -> None:
    """Make the commit that replaces an existing ``last.ckpt`` write ``marker`` and wait to be killed."""
    replace = os.replace

    def waiting_replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "last.ckpt" and Path(target).exists():
            marker.write_text(str(source))
            time.sleep(120)
        replace(source, target)

    os.replace = waiting_replace


def _student(dropout: bool) -> nn.Module:
    student = small_net()
    if dropout:  # layer "2" (read by FitNet and CRD) stays the hidden activation
        student[2] = nn.Sequential(nn.ReLU(), nn.Dropout(0.2))
    return student


def _module(
    scenario: str, out_dir: Path, dropout: bool = False, cache_dir: Path | None = None
) -> DistillationModule:
    optimizer = lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9)  # noqa: E731
    common: dict[str, Any] = dict(optimizer=optimizer)
    if scenario == "schedules":
        losses = [CrossEntropyTerm(), KDTerm(temperature=4.0)]
        return DistillationModule(_student(dropout), small_net(hidden=32), losses=losses, **common)
    if scenario == "trainable":
        return DistillationModule(_student(dropout), small_net(hidden=32), teacher_mode="trainable", **common)
    if scenario == "ema":
        return DistillationModule(_student(dropout), teacher_mode="ema", ema_decay=0.8, **common)
    if scenario == "crd":
        crd = CRDTerm("2", "2", num_samples=SAMPLES, feat_dim=8, num_negatives=8)
        return DistillationModule(
            _student(dropout), small_net(hidden=32), losses=[CrossEntropyTerm(), crd], **common
        )
    if scenario == "stages":
        losses = [CrossEntropyTerm(), KDTerm(weight=0.5), FitNetTerm("2", "2", weight=10.0)]
        return DistillationModule(_student(dropout), small_net(hidden=32), losses=losses, **common)
    if scenario == "cache":  # memory-mapped top-2 float16 teacher outputs, filled in the first epoch
        cache = TeacherOutputCache(cache_dir or out_dir / "teacher_cache", top_k=2, dtype="float16")
        return DistillationModule(_student(dropout), small_net(hidden=32), teacher_cache=cache, **common)
    if scenario == "views":  # top-2 float16 soft labels of replayed views, filled in the first epochs
        views = TeacherViewCache(cache_dir or out_dir / "view_cache", views=VIEWS, top_k=2, dtype="float16")
        losses = [CrossEntropyTerm(weight=0.1), KDTerm(weight=0.9, temperature=4.0)]
        return DistillationModule(
            _student(dropout), small_net(hidden=32), losses=losses, teacher_cache=views, **common
        )
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
    every_step: bool = False,
    workers: int = 0,
    augment: bool = False,
    devices: int = 1,
    reload: bool = False,
    cache_dir: Path | None = None,
    samples: int = SAMPLES,
) -> dict[str, Any]:
    """Fit ``scenario`` (optionally resuming from ``last.ckpt`` in ``ckpt_dir``, default
    ``out_dir/ckpt``; a teacher cache in ``cache_dir``, default in ``out_dir``); return its final state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(SEED, verbose=False)
        module = _module(scenario, out_dir, dropout=augment, cache_dir=cache_dir)
        views = scenario == "views"
        indexed = scenario in ("crd", "cache")
        datamodule = ResumeDataModule(indexed, augment, workers, views=views, samples=samples)
        every = dict(every_n_train_steps=1, save_top_k=0) if every_step else dict(every_n_epochs=1)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir or out_dir / "ckpt", save_last=True, **every)
        recorder = RecordMetrics()
        callbacks = [checkpoint, recorder, *_callbacks(scenario)]
        teacher_steps = TeacherSteps(module.teacher) if module.teacher is not None else None
        callbacks += [teacher_steps] if teacher_steps is not None else []
        if kill_at_step is not None:
            callbacks.append(StopAtStep(kill_at_step, out_dir / "step.txt"))
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_epochs=EPOCHS,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            reload_dataloaders_every_n_epochs=1 if reload else 0,
            callbacks=callbacks,
            default_root_dir=out_dir,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path="last" if resume else None)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
        optimizer = trainer.optimizers[0].state_dict()
        return {
            "state": state,
            "metrics": metrics,
            "records": recorder.records,
            "optimizer": optimizer,
            "global_step": trainer.global_step,
            "rank": trainer.global_rank,
            "teacher_steps": teacher_steps.steps if teacher_steps is not None else None,
        }
    finally:
        torch.set_num_threads(threads)


def command(out_dir: Path, scenario: str, *options: str) -> list[str]:
    """The command line that runs this script."""
    return [sys.executable, str(Path(__file__).resolve()), str(out_dir), scenario, *options]


def quiet_environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_and_kill(out_dir: Path, scenario: str, kill_at_step: int, *options: str) -> tuple[int, int]:
    """Run the script until it reaches ``kill_at_step``, SIGKILL it (all its processes, DDP's too).

    Returns the ``(global_step, epoch)`` the run was killed at.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    args = command(out_dir, scenario, "--kill-at-step", str(kill_at_step), *options)
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=quiet_environment(),
        start_new_session=True,
    )
    marker = out_dir / "step.txt"
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(
                    f"the run ended before step {kill_at_step}:\n{process.stdout.read().decode()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not reach step {kill_at_step} in 120 s")
            time.sleep(0.05)
        time.sleep(0.05)  # the marker is written before the sleep: let the write finish
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and every process it started (DDP, workers)
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    step, epoch = marker.read_text().split()
    return int(step), int(epoch)


def run(out_dir: Path, scenario: str, *options: str) -> None:
    """Run the script to the end in a subprocess (a DDP fit must be its own program)."""
    result = subprocess.run(
        command(out_dir, scenario, *options),
        capture_output=True,
        text=True,
        env=quiet_environment(),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    parser.add_argument("--every-step", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--reload", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("KILL_RESUME_SLOW_COMMIT"):
        wait_in_last_ckpt_commit(Path(os.environ["KILL_RESUME_SLOW_COMMIT"]))
    result = fit(
        args.out_dir,
        args.scenario,
        args.kill_at_step,
        args.resume,
        args.ckpt_dir,
        args.every_step,
        args.workers,
        args.augment,
        args.devices,
        args.reload,
        args.cache_dir,
        args.samples,
    )
    name = "final.pt" if args.devices == 1 else f"final-rank{result['rank']}.pt"
    torch.save(result, args.out_dir / name)


if __name__ == "__main__":
    main()
