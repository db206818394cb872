"""Data-free distillation (DAFL) on MNIST-1D: the student never sees a training signal.

    python benchmarks/data_free.py --seeds 0 1 2          # about 8 minutes per seed on one CPU core
    python benchmarks/data_free.py --collect seed0.log seed1.log  # tabulate runs made in parallel

Per seed: the quickstart teacher (ConvNet1d, 60 epochs, Adam 1e-3, cosine) on the real
training split; then the quickstart MLP student (40 -> 256 -> 256 -> 10), always from the
same initial weights, trained four ways:

- ``scratch``: on the real training split with cross-entropy (150 epochs, Adam 3e-3, cosine);
- ``kd``: on the real training split with Hinton KD (0.1 CE + 0.9 KD, T = 4), same budget;
- ``dafl``: data-free, DAFL (Chen et al., ICCV 2019): a 1-D convolutional generator trained with
  L_oh + 0.1 L_a + 5 L_ie against the frozen teacher, the student with KL(teacher || student)
  at T = 1 on the generated samples; 40 epochs of 50 batches of 256 generated samples, Adam
  3e-3 (student) and 1e-3 (generator), cosine;
- ``dafl_bn``: the same plus DeepInversion's BatchNorm-statistics prior (Yin et al., CVPR 2020)
  on the teacher's three BatchNorm layers, weight 1.

The data-free runs read only the validation (500) and test (10,000) splits, for evaluation.
Writes benchmarks/results/data_free.md.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import Runs, collect, write_table

from lightning_kd.data import MNIST1DDataModule
from lightning_kd.data.latent_noise import LatentNoiseDataModule
from lightning_kd.losses import KDTerm
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.models.generator import ConvGenerator1d
from lightning_kd.module import DistillationModule
from lightning_kd.paradigms.data_free import DataFreeDistillationModule
from lightning_kd.quickstart import fit_and_test

RESULTS = Path(__file__).parent / "results" / "data_free.md"
TEACHER_EPOCHS, STUDENT_EPOCHS, STUDENT_LR = 60, 150, 3e-3
RUNS = ("teacher", "scratch", "kd", "dafl", "dafl_bn")
RUN_LINE = re.compile(r"^seed (\d+) (\S+)\s+([\d.]+)\s+([\d.]+) s$")


def student(seed: int) -> MLP:
    """The seed's student, identical in every run of the seed."""
    pl.seed_everything(seed + 1, verbose=False)
    return MLP(in_features=40, num_classes=10, hidden=(256, 256))


def data_free_module(
    seed: int, teacher_checkpoint: str, bn_weight: float, generator_lr: float
) -> DataFreeDistillationModule:
    """DAFL (``bn_weight=0``) or DAFL + BatchNorm statistics for the seed's student."""
    model = student(seed)
    pl.seed_everything(seed + 2, verbose=False)
    return DataFreeDistillationModule(
        model,
        ConvNet1d(num_classes=10),
        ConvGenerator1d(output_shape=(1, 40), latent_dim=100),
        losses=[KDTerm("kd", weight=1.0, temperature=1.0)],
        teacher_checkpoint=teacher_checkpoint,
        one_hot_weight=1.0,
        activation_weight=0.1,
        entropy_weight=5.0,
        bn_weight=bn_weight,
        optimizer=functools.partial(torch.optim.Adam, lr=STUDENT_LR),
        generator_optimizer=functools.partial(torch.optim.Adam, lr=generator_lr),
    )


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Teacher, the two students on real data, the two data-free students; print one line per run."""
    out = Path(args.out_dir) / f"seed{seed}"
    datamodule = MNIST1DDataModule()
    results: dict[str, tuple[float, float]] = {}

    def record(name: str, module: pl.LightningModule, data: pl.LightningDataModule, epochs: int) -> str:
        started = time.perf_counter()
        result = fit_and_test(name, module, data, epochs, out, progress=False)
        results[name] = (result.accuracy, time.perf_counter() - started)
        print(f"seed {seed} {name:8s} {100 * result.accuracy:6.2f}  {results[name][1]:.0f} s", flush=True)
        return result.checkpoint

    pl.seed_everything(seed, verbose=False)
    teacher = record("teacher", DistillationModule(ConvNet1d(num_classes=10)), datamodule, TEACHER_EPOCHS)
    optimizer = functools.partial(torch.optim.Adam, lr=STUDENT_LR)
    record("scratch", DistillationModule(student(seed), optimizer=optimizer), datamodule, STUDENT_EPOCHS)
    kd = DistillationModule(
        student(seed), teacher=ConvNet1d(num_classes=10), teacher_checkpoint=teacher, optimizer=optimizer
    )
    record("kd", kd, datamodule, STUDENT_EPOCHS)
    for name, bn_weight in (("dafl", 0.0), ("dafl_bn", args.bn_weight)):
        noise = LatentNoiseDataModule(
            MNIST1DDataModule(), latent_dim=100, batch_size=256, batches_per_epoch=args.batches, seed=seed
        )
        module = data_free_module(seed, teacher, bn_weight, args.generator_lr)
        record(name, module, noise, args.epochs)
    return results


def table(runs: Runs, args: argparse.Namespace) -> list[str]:
    """Markdown: per-seed test accuracy of every run, then mean ± std."""
    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    names = [name for name in RUNS if name in runs]

    def cell(name: str, seed: int) -> str:
        return f"{100 * runs[name][seed][0]:.2f}" if seed in runs[name] else ""

    lines = [
        f"MNIST-1D test accuracy (%, 10,000 test signals), seeds {', '.join(map(str, seeds))}. "
        f"Data-free students: {args.epochs} epochs x {args.batches} batches of 256 generated samples; "
        "scratch / kd: 150 epochs on the 4,500 real training signals.",
        "",
        "| seed | " + " | ".join(names) + " | time (s) |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for seed in seeds:
        seconds = sum(runs[name][seed][1] for name in names if seed in runs[name])
        lines.append(f"| {seed} | " + " | ".join(cell(n, seed) for n in names) + f" | {seconds:.0f} |")

    def mean_std(name: str) -> str:
        values = [100 * accuracy for accuracy, _ in runs[name].values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {spread:.2f}"

    lines.append("| mean ± std | " + " | ".join(mean_std(n) for n in names) + " | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the data-free students")
    parser.add_argument("--batches", type=int, default=50, help="generated batches per data-free epoch")
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    parser.add_argument("--bn-weight", type=float, default=1.0, help="BatchNorm-prior weight of dafl_bn")
    parser.add_argument("--out-dir", default="runs/benchmark_data_free")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="only tabulate the runs printed in these logs (no training)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.collect:
        runs = collect(args.collect, RUN_LINE)
    else:
        runs = {}
        for seed in args.seeds:
            for name, result in run_seed(seed, args).items():
                runs.setdefault(name, {})[seed] = result
    lines = table(runs, args)
    write_table(lines, args.results)


if __name__ == "__main__":
    main()
