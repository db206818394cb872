"""What exact resume costs a fit: the MNIST-1D distillation fit with and without ``ExactResume``.

    OMP_NUM_THREADS=1 python benchmarks/exact_resume_overhead.py            # 7 interleaved pairs
    OMP_NUM_THREADS=1 python benchmarks/exact_resume_overhead.py --repeats 1 --epochs 1   # smoke run

Every module of the package installs ``ExactResume`` (``lightning_kd.callbacks.exact_resume``): the
training loader becomes a ``StatefulDataLoader``, every batch is read under generators seeded for
it (their states saved and restored around the read) and every step is seeded. The pair is the
quickstart's distillation fit (``DistillationModule(MLP, ConvNet1d)`` on ``MNIST1DDataModule``,
batch 128, no validation) with the module's callbacks as they are, and with ``ExactResume`` left
out (a plain shuffled ``DataLoader``). The runs are interleaved (with, without, with, ...) in one
process and one thread; the table gives the median CPU seconds (``time.process_time``) per fit
and their ratio, with the wall seconds beside them (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_kd import DistillationModule
from lightning_kd.callbacks.exact_resume import ExactResume
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d

RESULTS = Path(__file__).parent / "results" / "exact_resume_overhead.md"


class WithoutExactResume(DistillationModule):
    """``DistillationModule`` whose fits run without ``ExactResume`` (the plain Lightning loader)."""

    def configure_callbacks(self) -> Any:
        return [c for c in super().configure_callbacks() if not isinstance(c, ExactResume)]


def timed_fit(
    module_class: type[DistillationModule], data: MNIST1DDataModule, epochs: int
) -> tuple[float, float]:
    """CPU and wall seconds of one fit (the teacher built and the seed set the same way every time)."""
    pl.seed_everything(0, verbose=False)
    module = module_class(MLP(num_classes=10), ConvNet1d(num_classes=10))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved pairs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--results", default=None, help=f"write the table here (default {RESULTS})")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = MNIST1DDataModule(batch_size=128)
    data.setup("fit")
    timed_fit(DistillationModule, data, 1)  # warm-up: imports, first-call costs
    runs: dict[str, list[tuple[float, float]]] = {"with ExactResume (default)": [], "without": []}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        runs["with ExactResume (default)"].append(timed_fit(DistillationModule, data, args.epochs))
        runs["without"].append(timed_fit(WithoutExactResume, data, args.epochs))
    cpu = {name: statistics.median(c for c, _ in times) for name, times in runs.items()}
    wall = {name: statistics.median(w for _, w in times) for name, times in runs.items()}
    baseline = cpu["without"]
    lines = [
        f"# Exact resume's cost (benchmarks/exact_resume_overhead.py)\n\n{args.epochs}-epoch MNIST-1D "
        f"distillation fits, medians of {args.repeats} interleaved pairs, one thread; load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n",
        "| fit | CPU s | CPU ratio | wall s |",
        "|---|---|---|---|",
        *(f"| {name} | {cpu[name]:.2f} | {cpu[name] / baseline:.3f}x | {wall[name]:.2f} |" for name in runs),
        "",
    ]
    text = "\n".join(lines)
    if args.results or args.repeats > 1:
        Path(args.results or RESULTS).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
