"""Offline quickstart: teacher, student baseline and KD student on MNIST-1D, then a table.

Run ``python -m lightning_kd.quickstart`` (``--help`` for the budget options).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_kd.cli import silence_unactionable_warnings
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.module import DistillationModule

__all__ = ["QuickstartResult", "RunResult", "fit_and_test", "main", "run_quickstart"]


@dataclass
class QuickstartResult:
    """Test accuracies (fractions) of the three runs, and the wall time in seconds."""

    teacher: float
    baseline: float
    kd: float
    seconds: float

    @property
    def gain(self) -> float:
        """KD student minus baseline student, in accuracy points (fraction)."""
        return self.kd - self.baseline

    def table(self) -> str:
        """A plain-text table of the results."""
        rows = [
            ("teacher (ConvNet1d)", f"{100 * self.teacher:6.2f}"),
            ("student baseline (MLP)", f"{100 * self.baseline:6.2f}"),
            ("student + Hinton KD (MLP)", f"{100 * self.kd:6.2f}"),
            ("gain of KD", f"{100 * self.gain:+6.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'MNIST-1D test accuracy (%)':<{width}}  {'':>6}", "-" * (width + 8)]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines) + f"\n({self.seconds:.0f} s)"


@dataclass
class RunResult:
    """One fit and test: test accuracy, checkpoint path, and seconds per training epoch."""

    accuracy: float
    checkpoint: str
    seconds_per_epoch: float


def fit_and_test(
    name: str,
    module: DistillationModule,
    datamodule: pl.LightningDataModule,
    epochs: int,
    out_dir: str | Path,
    progress: bool = True,
    callbacks: Sequence[pl.Callback] = (),
) -> RunResult:
    """Fit ``module`` for ``epochs``, then test it.

    Each call writes a run folder of its own, ``out_dir/name/version_<n>/`` (CSV logs and
    ``checkpoints/<name>.ckpt``), so no run overwrites another.
    """
    out_dir = Path(out_dir)
    checkpoint = ModelCheckpoint(filename=name)  # in the logger's run folder
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=CSVLogger(out_dir, name=name),
        callbacks=[checkpoint, *callbacks],
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,  # MNIST-1D epochs have 36 batches
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - started
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    path = checkpoint.best_model_path or checkpoint.last_model_path
    return RunResult(metrics["test/acc"], path, seconds / epochs)


def run_quickstart(
    teacher_epochs: int = 60,
    student_epochs: int = 150,
    student_lr: float = 3e-3,
    train_samples: int = 5000,
    seed: int = 0,
    out_dir: str | Path = "runs/quickstart",
    progress: bool = True,
) -> QuickstartResult:
    """Train the teacher, the student from scratch, and the student with Hinton KD.

    Both students start from the same initial weights (same seed) and see the same batches,
    so the gain is a paired comparison. KD uses the module's defaults: CE 0.1 + KD 0.9, T = 4,
    the teacher loaded from the checkpoint of its own run. Teacher: Adam 1e-3; students:
    Adam ``student_lr``; all with cosine decay over the run, batch 128.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    datamodule = MNIST1DDataModule(train_samples=train_samples)

    def student() -> nn.Module:
        pl.seed_everything(seed + 1, verbose=False)
        return MLP(in_features=40, num_classes=10, hidden=(256, 256))

    pl.seed_everything(seed, verbose=False)
    teacher_module = DistillationModule(ConvNet1d(num_classes=10))
    teacher = fit_and_test("teacher", teacher_module, datamodule, teacher_epochs, out_dir, progress)

    optimizer = functools.partial(torch.optim.Adam, lr=student_lr)
    baseline_module = DistillationModule(student(), optimizer=optimizer)
    baseline = fit_and_test("baseline", baseline_module, datamodule, student_epochs, out_dir, progress)
    kd_module = DistillationModule(
        student(),
        teacher=ConvNet1d(num_classes=10),
        teacher_checkpoint=teacher.checkpoint,
        optimizer=optimizer,
    )
    kd = fit_and_test("kd", kd_module, datamodule, student_epochs, out_dir, progress)
    return QuickstartResult(teacher.accuracy, baseline.accuracy, kd.accuracy, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> QuickstartResult:
    """Command-line entry point: run the quickstart and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--student-epochs", type=int, default=150)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument(
        "--train-samples", type=int, default=5000, help="MNIST-1D training samples (500 of them validate)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/quickstart")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args(argv)
    silence_unactionable_warnings()
    result = run_quickstart(
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        student_lr=args.student_lr,
        train_samples=args.train_samples,
        seed=args.seed,
        out_dir=args.out_dir,
        progress=not args.no_progress,
    )
    print("\n" + result.table())
    return result


if __name__ == "__main__":
    main()
