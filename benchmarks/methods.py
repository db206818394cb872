"""Every distillation method on MNIST-1D under one budget and several seeds.

    python benchmarks/methods.py --seeds 0 1 2            # about an hour on 2 CPU cores
    python benchmarks/methods.py --methods kd sp --seeds 0  # a subset
    python benchmarks/methods.py --collect seed0.log seed1.log  # tabulate runs made in parallel

The setting is the quickstart's (4,500 training / 500 validation / 10,000 test samples,
ConvNet1d teacher trained 60 epochs per seed, students 150 epochs, Adam 3e-3, cosine,
batch 128). Two students: the quickstart's MLP (vector features: response and relation
methods, FitNet) and a small 1-D CNN (feature maps: AT, NST, FitNet on maps). As in the
CRD benchmark, every method other than KD is cross-entropy (weight 1) plus the method at
the benchmark's default weight; KD is 0.1 CE + 0.9 KD at T = 4. Each student run of a seed
starts from the same initial weights as that seed's baseline. Writes
benchmarks/results/methods.md: test accuracy mean ± std, gain over the same student's
baseline (paired per seed), and training time per epoch relative to that baseline.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import Runs, collect, mean_std, write_table
from torch import nn

from lightning_kd import (
    ABTerm,
    ATTerm,
    CCTerm,
    CRDTerm,
    CrossEntropyTerm,
    DistillationModule,
    DistillationStages,
    DISTTerm,
    DKDTerm,
    FitNetTerm,
    FSPTerm,
    FTTerm,
    KDTerm,
    LossTerm,
    LossWeightSchedule,
    NSTTerm,
    OFDTerm,
    ParaphraserTerm,
    PKTTerm,
    ReviewKDTerm,
    RKDTerm,
    SPTerm,
    Stage,
    VIDTerm,
)
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.quickstart import fit_and_test

RESULTS = Path(__file__).parent / "results" / "methods.md"
TEACHER_EPOCHS, STUDENT_EPOCHS, STUDENT_LR = 60, 150, 3e-3
# DKD warms its weight up over 20 of the benchmark's 240 epochs, staged methods have a 30-epoch
# init stage: the same fractions of ours.
DKD_WARMUP_EPOCHS = round(20 / 240 * STUDENT_EPOCHS)
INIT_EPOCHS = round(30 / 240 * STUDENT_EPOCHS)


@dataclass
class Method:
    """A row of the table: which student, which loss terms, which callbacks."""

    student: str  # "mlp", "cnn", or "cnn_wide" (the teacher's conv widths, for FSP)
    losses: Callable[[], list[LossTerm]]
    callbacks: Callable[[], list[pl.Callback]] = list
    uses_teacher: bool = True
    init_epochs: int = 0  # an init stage before the STUDENT_EPOCHS of the main stage


def ce(weight: float = 1.0) -> CrossEntropyTerm:
    return CrossEntropyTerm(weight=weight)


# student layers: MLP "features.4" = second hidden layer after ReLU (N, 256);
# CNN "conv3" = last conv block (N, 32, 10). Teacher: "embedding" (N, 128), "conv3" (N, 64, 10).
METHODS: dict[str, Method] = {
    "baseline": Method("mlp", lambda: [ce()], uses_teacher=False),
    "kd": Method("mlp", lambda: [ce(0.1), KDTerm(weight=0.9, temperature=4.0)]),
    "kd_standardized": Method(
        "mlp", lambda: [ce(0.1), KDTerm(weight=0.9, temperature=2.0, standardize=True)]
    ),
    "dkd": Method(
        "mlp",
        lambda: [ce(), DKDTerm(alpha=1.0, beta=8.0, temperature=4.0)],
        lambda: [
            LossWeightSchedule(
                "dkd", start=1 / DKD_WARMUP_EPOCHS, end=1.0, interval="epoch", total=DKD_WARMUP_EPOCHS - 1
            )
        ],
    ),
    "dist": Method("mlp", lambda: [ce(), DISTTerm(beta=1.0, gamma=1.0, temperature=1.0)]),
    "fitnet": Method("mlp", lambda: [ce(), FitNetTerm("features.4", "embedding", weight=100.0)]),
    "sp": Method("mlp", lambda: [ce(), SPTerm("features.4", "embedding", weight=3000.0)]),
    "rkd": Method("mlp", lambda: [ce(), RKDTerm("features.4", "embedding", weight=1.0)]),
    "pkt": Method("mlp", lambda: [ce(), PKTTerm("features.4", "embedding", weight=30000.0)]),
    "cc": Method("mlp", lambda: [ce(), CCTerm("features.4", "embedding", weight=100.0)]),
    "vid": Method("mlp", lambda: [ce(), VIDTerm("features.4", "embedding", weight=1.0)]),
    "crd": Method(
        "mlp",
        lambda: [ce(), CRDTerm("features.4", "embedding", num_samples=4500, num_negatives=256, weight=0.8)],
    ),
    "cnn_baseline": Method("cnn", lambda: [ce()], uses_teacher=False),
    "cnn_kd": Method("cnn", lambda: [ce(0.1), KDTerm(weight=0.9, temperature=4.0)]),
    "cnn_fitnet": Method("cnn", lambda: [ce(), FitNetTerm("conv3", "conv3", weight=100.0)]),
    "cnn_at": Method("cnn", lambda: [ce(), ATTerm("conv3", "conv3", weight=1000.0)]),
    "cnn_nst": Method("cnn", lambda: [ce(), NSTTerm("conv3", "conv3", weight=50.0)]),
    "cnn_ofd": Method("cnn", lambda: [ce(), OFDTerm("conv3.1", "conv3.1")]),
    "cnn_ab": Method(
        "cnn",
        lambda: [ce(), ABTerm("conv3.1", "conv3.1")],
        lambda: [
            DistillationStages(
                [
                    Stage(
                        INIT_EPOCHS,
                        {"ab": 1.0},
                        ["student.conv1", "student.conv2", "student.conv3", "loss_terms.ab"],
                    ),
                    Stage(weights={"ce": 1.0}, trainable=["student"]),
                ]
            )
        ],
        init_epochs=INIT_EPOCHS,
    ),
    "cnn_ft": Method(
        "cnn",
        lambda: [ce(), ParaphraserTerm("conv3"), FTTerm("conv3", "conv3", weight=200.0)],
        lambda: [
            DistillationStages(
                [
                    Stage(INIT_EPOCHS, {"paraphrase": 1.0}, ["loss_terms.paraphrase"]),
                    Stage(weights={"ce": 1.0, "ft": 200.0}, trainable=["student", "loss_terms.ft"]),
                ]
            )
        ],
        init_epochs=INIT_EPOCHS,
    ),
    "cnn_reviewkd": Method(
        "cnn",
        lambda: [ce(), ReviewKDTerm(["conv1", "conv2", "conv3"], ["conv1.1", "conv2.1", "conv3.1"])],
        lambda: [
            LossWeightSchedule("reviewkd", start=0.0, end=1.0, interval="epoch", total=DKD_WARMUP_EPOCHS)
        ],
    ),
    "wide_baseline": Method("cnn_wide", lambda: [ce()], uses_teacher=False),
    "wide_fsp": Method(
        "cnn_wide",
        lambda: [ce(), FSPTerm(["conv2", "conv3"], ["conv2", "conv3"])],
        lambda: [
            DistillationStages([Stage(INIT_EPOCHS, {"fsp": 1.0}, ["student"]), Stage(weights={"ce": 1.0})])
        ],
        init_epochs=INIT_EPOCHS,
    ),
}


def make_student(kind: str, seed: int) -> nn.Module:
    """The seed's student, identical across the methods of one seed."""
    pl.seed_everything(seed + 1, verbose=False)
    if kind == "mlp":
        return MLP(in_features=40, num_classes=10, hidden=(256, 256))
    if kind == "cnn_wide":
        return ConvNet1d(num_classes=10, widths=(32, 64, 64), hidden=16)
    return ConvNet1d(num_classes=10, widths=(16, 32, 32), hidden=64)


def run_methods(seeds: list[int], names: list[str], out_dir: str) -> Runs:
    """Train the seed's teacher, then every method's student; print one line per run."""
    datamodule = MNIST1DDataModule(return_index=True)  # CRD's memory bank reads the sample index
    optimizer = functools.partial(torch.optim.Adam, lr=STUDENT_LR)
    runs: Runs = {name: {} for name in names}
    for seed in seeds:
        out = Path(out_dir) / f"seed{seed}"
        pl.seed_everything(seed, verbose=False)
        teacher = fit_and_test(
            "teacher", DistillationModule(ConvNet1d()), datamodule, TEACHER_EPOCHS, out, False
        )
        for name in names:
            method = METHODS[name]
            module = DistillationModule(
                make_student(method.student, seed),
                teacher=ConvNet1d() if method.uses_teacher else None,
                teacher_checkpoint=teacher.checkpoint if method.uses_teacher else None,
                losses=method.losses(),
                optimizer=optimizer,
            )
            epochs = STUDENT_EPOCHS + method.init_epochs
            result = fit_and_test(name, module, datamodule, epochs, out, False, method.callbacks())
            runs[name][seed] = (result.accuracy, result.seconds_per_epoch)
            speed = f"{result.seconds_per_epoch:.3f} s/epoch"
            print(f"seed {seed} {name:16s} {100 * result.accuracy:6.2f}  {speed}", flush=True)
    return runs


def table(runs: Runs) -> list[str]:
    """Markdown: accuracy mean ± std, gain over the same student's baseline (paired by seed), time."""

    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    lines = [
        f"MNIST-1D test accuracy (%), seeds {', '.join(map(str, seeds))}; gain and time per epoch "
        "relative to the same student's baseline of the same seeds.",
        "",
        "| method | student | accuracy | gain | time / epoch |",
        "|---|---|---|---|---|",
    ]
    for name in [n for n in METHODS if n in runs]:
        student = METHODS[name].student
        baseline = {"mlp": "baseline", "cnn": "cnn_baseline", "cnn_wide": "wide_baseline"}[student]
        accuracy = [runs[name][s][0] for s in sorted(runs[name])]
        gain, time = "", ""
        if name == baseline:
            time = f"1.00x ({statistics.mean(v[1] for v in runs[name].values()):.2f} s)"
        elif baseline in runs:
            paired = sorted(set(runs[name]) & set(runs[baseline]))
            gain = mean_std([runs[name][s][0] - runs[baseline][s][0] for s in paired])
            ratio = statistics.mean(runs[name][s][1] for s in paired) / statistics.mean(
                runs[baseline][s][1] for s in paired
            )
            time = f"{ratio:.2f}x"
        lines.append(f"| {name} | {student} | {mean_std(accuracy)} | {gain} | {time} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out-dir", default="runs/benchmark_methods")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="only tabulate the runs printed in these logs (no training)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    runs = collect(args.collect) if args.collect else run_methods(args.seeds, args.methods, args.out_dir)
    lines = table(runs)
    write_table(lines, args.results)


if __name__ == "__main__":
    main()
