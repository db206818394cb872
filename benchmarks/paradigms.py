"""Who teaches whom, on MNIST-1D: co-trained, EMA, mutual learning and multi-teacher vs. baseline.

    python benchmarks/paradigms.py --seeds 0 1 2          # about 20 minutes per seed on one core
    python benchmarks/paradigms.py --paradigms dml --seeds 0
    python benchmarks/paradigms.py --collect seed0.log seed1.log  # tabulate runs made in parallel

The quickstart's setting (4,500 training / 500 validation / 10,000 test samples; MLP
40-256-256-10 student, 150 epochs, Adam 3e-3, cosine, batch 128). Per seed: the ConvNet1d
teacher (60 epochs, as in the quickstart) and a half-width ConvNet1d (60 epochs) for the
ensemble; every student starts from the seed's same initial weights. Rows:

- baseline: CE only; kd: 0.1 CE + 0.9 KD (T = 4) from the frozen ConvNet1d, for reference.
- cotrained: the ConvNet1d trained from scratch with the student (its CE, weight 1).
- ema: mean teacher of the student itself, decay 0.999, CE + KD (T = 4), weights 1 and 1.
- dml: two MLP peers (T = 1, CE + KL, weights 1 and 1); peer 0's accuracy.
- dml_cnn_peer: the MLP with a ConvNet1d peer, both from scratch; the MLP's accuracy.
- multi_fixed / multi_confidence: the two frozen teachers mixed with equal weights / CA-MKD
  confidence weights, 0.1 CE + 0.9 KD (T = 4).

Writes benchmarks/results/paradigms.md: test accuracy mean ± std and the gain over the
baseline, paired per seed.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import Runs, collect, mean_std, write_table

from lightning_kd import (
    CrossEntropyTerm,
    DistillationModule,
    KDTerm,
    MultiTeacherKDTerm,
    MutualLearningModule,
    TeacherEnsemble,
)
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.quickstart import fit_and_test

RESULTS = Path(__file__).parent / "results" / "paradigms.md"
TEACHER_EPOCHS, STUDENT_EPOCHS = 60, 150
optimizer = functools.partial(torch.optim.Adam, lr=3e-3)


def student(seed: int) -> MLP:
    """The seed's MLP student, the same initial weights in every row."""
    pl.seed_everything(seed + 1, verbose=False)
    return MLP(in_features=40, num_classes=10, hidden=(256, 256))


def small_cnn() -> ConvNet1d:
    """The second teacher: half the ConvNet1d's widths."""
    return ConvNet1d(num_classes=10, widths=(16, 32, 32), hidden=64)


def kd_terms(term: KDTerm | MultiTeacherKDTerm) -> list:
    return [CrossEntropyTerm(weight=0.1), term]


Builder = Callable[[int, dict[str, str]], pl.LightningModule]
PARADIGMS: dict[str, Builder] = {
    "baseline": lambda seed, ckpt: DistillationModule(student(seed), optimizer=optimizer),
    "kd": lambda seed, ckpt: DistillationModule(
        student(seed), ConvNet1d(), teacher_checkpoint=ckpt["teacher"], optimizer=optimizer
    ),
    "cotrained": lambda seed, ckpt: DistillationModule(
        student(seed), ConvNet1d(), teacher_mode="trainable", optimizer=optimizer
    ),
    "ema": lambda seed, ckpt: DistillationModule(
        student(seed),
        teacher_mode="ema",
        ema_decay=0.999,
        losses=[CrossEntropyTerm(), KDTerm(weight=1.0, temperature=4.0)],
        optimizer=optimizer,
    ),
    "dml": lambda seed, ckpt: MutualLearningModule([student(seed), student(seed + 100)], optimizer=optimizer),
    "dml_cnn_peer": lambda seed, ckpt: MutualLearningModule(
        [student(seed), ConvNet1d()], optimizer=optimizer
    ),
    "multi_fixed": lambda seed, ckpt: DistillationModule(
        student(seed),
        TeacherEnsemble([ConvNet1d(), small_cnn()], checkpoints=[ckpt["teacher"], ckpt["small"]]),
        losses=kd_terms(MultiTeacherKDTerm(weighting="fixed")),
        optimizer=optimizer,
    ),
    "multi_confidence": lambda seed, ckpt: DistillationModule(
        student(seed),
        TeacherEnsemble([ConvNet1d(), small_cnn()], checkpoints=[ckpt["teacher"], ckpt["small"]]),
        losses=kd_terms(MultiTeacherKDTerm(weighting="confidence")),
        optimizer=optimizer,
    ),
}


def run(seeds: list[int], names: list[str], out_dir: str) -> Runs:
    """Train the seed's two teachers, then every paradigm; print one line per run."""
    datamodule = MNIST1DDataModule()
    runs: Runs = {}
    for seed in seeds:
        out = Path(out_dir) / f"seed{seed}"
        checkpoints = {}
        for name, network, teacher_seed in (("teacher", ConvNet1d, seed), ("small", small_cnn, seed + 100)):
            pl.seed_everything(teacher_seed, verbose=False)
            result = fit_and_test(name, DistillationModule(network()), datamodule, TEACHER_EPOCHS, out, False)
            checkpoints[name] = result.checkpoint
            runs.setdefault(name, {})[seed] = (result.accuracy, result.seconds_per_epoch)
            print(
                f"seed {seed} {name:16s} {100 * result.accuracy:6.2f}  {result.seconds_per_epoch:.3f} s/epoch"
            )
        for name in names:
            module = PARADIGMS[name](seed, checkpoints)
            result = fit_and_test(name, module, datamodule, STUDENT_EPOCHS, out, False)
            runs.setdefault(name, {})[seed] = (result.accuracy, result.seconds_per_epoch)
            speed = f"{result.seconds_per_epoch:.3f} s/epoch"
            print(f"seed {seed} {name:16s} {100 * result.accuracy:6.2f}  {speed}", flush=True)
    return runs


def table(runs: Runs) -> list[str]:
    """Markdown: accuracy mean ± std and the gain over the baseline, paired by seed.

    Seconds per epoch are printed per run but left out of the table: the seeds run side by
    side with other jobs, so times of different rows are not comparable.
    """

    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    lines = [
        f"MNIST-1D test accuracy (%) of the MLP student, seeds {', '.join(map(str, seeds))}; gain relative "
        "to the baseline of the same seed (mean ± std over seeds; positive seeds).",
        "",
        "| paradigm | accuracy | gain | seeds with gain > 0 |",
        "|---|---|---|---|",
    ]
    base = runs.get("baseline", {})
    for name in [n for n in ("teacher", "small", *PARADIGMS) if n in runs]:
        accuracy = [runs[name][s][0] for s in sorted(runs[name])]
        paired = sorted(set(runs[name]) & set(base))
        gain = positive = ""
        if name not in ("baseline", "teacher", "small") and paired:
            gains = [runs[name][s][0] - base[s][0] for s in paired]
            gain, positive = mean_std(gains, "+"), f"{sum(g > 0 for g in gains)} / {len(gains)}"
        label = {"teacher": "teacher (ConvNet1d)", "small": "second teacher (half-width ConvNet1d)"}.get(
            name, name
        )
        lines.append(f"| {label} | {mean_std(accuracy)} | {gain} | {positive} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--paradigms", nargs="+", default=list(PARADIGMS), choices=list(PARADIGMS))
    parser.add_argument("--out-dir", default="runs/benchmark_paradigms")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="only tabulate the runs printed in these logs"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    runs = collect(args.collect) if args.collect else run(args.seeds, args.paradigms, args.out_dir)
    lines = table(runs)
    write_table(lines, args.results)


if __name__ == "__main__":
    main()
