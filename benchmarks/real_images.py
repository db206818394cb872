"""Every distillation method on real images: 2-D CNNs on the 5,000 MNIST digits the package ships.

    python benchmarks/real_images.py --processes 2            # the table (about an hour of CPU)
    python benchmarks/real_images.py --methods baseline kd --seeds 0 1 2   # a subset
    python benchmarks/real_images.py --tabulate               # the table of the runs recorded so far

Data: 3,500 training, 500 held-out and 1,000 test images (100 per class). The teacher
(ConvNet2d, two conv blocks per stage, widths 32-64-64) trains once, 30 epochs, with the random
crop (padding 2, no flip). Every method then trains the student (ConvNet2d, one block per stage,
widths 8-16-16, hidden 32: 29k parameters against 542k) for 20 epochs with 3 seeds, on the
un-augmented images: in the sizing runs, with the crop the student alone reached 97.0% and
plain KD gained +0.0 and +0.2 (two seeds), inside the seed spread; without it the student
overfits and distillation has room (see benchmarks/results/real_images.md). ``--augment-students``
restores the crop. Every run of a seed starts from the same initial weights and sees the same
batches as that seed's student alone ("baseline"), so gains are paired per seed. FSP needs the
teacher's channel counts: its row uses a wide student (the teacher's widths, one block per
stage) against that student alone. As in the CRD benchmark every method other than KD is
cross-entropy (weight 1) plus the method at the benchmark's weight (KD: 0.1 CE + 0.9 KD at
T = 4); DKD's and ReviewKD's warm-up and the init stages of AB, FT and FSP keep their fractions
of the benchmark's 240 epochs. AT and FitNet, whose benchmark weights lose to the student alone
here, also run at lower weights (``SWEEP``: rows ``at_w100``, ...). Adam 3e-3 with cosine decay,
batch 128, one thread per process.

Each finished run is appended to ``<out-dir>/records.jsonl`` (one JSON line: method, seed, test
accuracy, wall and CPU seconds per epoch) and the teacher's checkpoint is kept, so an
interrupted benchmark continues where it stopped when started again with the same
``--out-dir``. Writes benchmarks/results/real_images.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from seeds import mean_std, write_table
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
from lightning_kd.data import MNISTDigitsDataModule
from lightning_kd.models import ConvNet2d
from lightning_kd.quickstart import fit_and_test

RESULTS = Path(__file__).parent / "results" / "real_images.md"
MODELS: dict[str, dict[str, Any]] = {
    "teacher": {"widths": (32, 64, 64), "depth": 2, "hidden": 128},
    "student": {"widths": (8, 16, 16), "depth": 1, "hidden": 32},
    "wide": {"widths": (32, 64, 64), "depth": 1, "hidden": 32},  # FSP: the teacher's channel counts
}
LR = 3e-3


@dataclass(frozen=True)
class Budget:
    """Epochs of the teacher and of every student; DKD's warm-up and the init stages scale with them."""

    teacher_epochs: int = 30
    student_epochs: int = 20
    train_samples: int = 3500
    #: the crop for the students too (the teacher always trains with it); off: see the module docstring
    augment_students: bool = False

    @property
    def warmup_epochs(self) -> int:
        """DKD's and ReviewKD's warm-up: the benchmark's 20 of 240 epochs."""
        return max(2, round(20 / 240 * self.student_epochs))

    @property
    def init_epochs(self) -> int:
        """The init stage of AB, FT and FSP: the benchmark's 30 of 240 epochs."""
        return max(1, round(30 / 240 * self.student_epochs))


@dataclass
class Method:
    """A row of the table: which student, which loss terms, which callbacks."""

    student: str  # a key of MODELS
    losses: Callable[[Budget], list[LossTerm]]
    callbacks: Callable[[Budget], list[pl.Callback]] = lambda budget: []
    uses_teacher: bool = True
    staged: bool = False  # an init stage of budget.init_epochs before the student epochs


def ce(weight: float = 1.0) -> CrossEntropyTerm:
    return CrossEntropyTerm(weight=weight)


def per_stage(
    term: Callable[..., LossTerm], name: str, weights: list[float], pre: bool = False
) -> list[LossTerm]:
    """One term per stage (conv1..conv3) as the benchmark's summed losses; ``pre``: the pre-ReLU BatchNorm."""
    suffix = ".bn" if pre else ""
    return [
        term(f"conv{k}{suffix}", f"conv{k}{suffix}", name=f"{name}{k}", weight=weight)
        for k, weight in zip((1, 2, 3), weights, strict=True)
    ]


def ab_stages(budget: Budget) -> list[pl.Callback]:
    feature_modules = ["student.conv1", "student.conv2", "student.conv3"]
    return [
        DistillationStages(
            [
                Stage(
                    budget.init_epochs,
                    {"ab1": 0.25, "ab2": 0.5, "ab3": 1.0},
                    [*feature_modules, "loss_terms"],
                ),
                Stage(weights={"ce": 1.0}, trainable=["student"]),
            ]
        )
    ]


def ft_stages(budget: Budget) -> list[pl.Callback]:
    return [
        DistillationStages(
            [
                Stage(budget.init_epochs, {"paraphrase": 0.2}, ["loss_terms.paraphrase"]),
                Stage(weights={"ce": 1.0, "ft": 200.0}, trainable=["student", "loss_terms.ft"]),
            ]
        )
    ]


def fsp_stages(budget: Budget) -> list[pl.Callback]:
    return [
        DistillationStages(
            [
                Stage(
                    budget.init_epochs,
                    {"fsp1": 1.0, "fsp2": 1.0},
                    ["student.conv1", "student.conv2", "student.conv3"],
                ),
                Stage(weights={"ce": 1.0}, trainable=["student"]),
            ]
        )
    ]


def warmup(term: str, weight: float) -> Callable[[Budget], list[pl.Callback]]:
    def callbacks(budget: Budget) -> list[pl.Callback]:
        total = budget.warmup_epochs
        return [LossWeightSchedule(term, start=weight / total, end=weight, interval="epoch", total=total - 1)]

    return callbacks


METHODS: dict[str, Method] = {
    "baseline": Method("student", lambda b: [ce()], uses_teacher=False),
    "kd": Method("student", lambda b: [ce(0.1), KDTerm(weight=0.9, temperature=4.0)]),
    "kd_standardized": Method(
        "student", lambda b: [ce(0.1), KDTerm(weight=0.9, temperature=2.0, standardize=True)]
    ),
    "dkd": Method(
        "student", lambda b: [ce(), DKDTerm(alpha=1.0, beta=8.0, temperature=4.0)], warmup("dkd", 1.0)
    ),
    "dist": Method("student", lambda b: [ce(), DISTTerm(beta=1.0, gamma=1.0, temperature=1.0)]),
    "fitnet": Method("student", lambda b: [ce(), FitNetTerm("conv2", "conv2", weight=100.0)]),
    "at": Method("student", lambda b: [ce(), *per_stage(ATTerm, "at", [1000.0] * 3)]),
    "nst": Method("student", lambda b: [ce(), *per_stage(NSTTerm, "nst", [50.0] * 3)]),
    "ofd": Method(
        "student", lambda b: [ce(), *per_stage(OFDTerm, "ofd", [0.00025, 0.0005, 0.001], pre=True)]
    ),
    "ab": Method(
        "student",
        lambda b: [ce(), *per_stage(ABTerm, "ab", [0.25, 0.5, 1.0], pre=True)],
        ab_stages,
        staged=True,
    ),
    "ft": Method(
        "student",
        lambda b: [
            ce(),
            ParaphraserTerm("conv3", name="paraphrase", weight=0.2, rate=0.5),
            FTTerm("conv3", "conv3", weight=200.0),
        ],
        ft_stages,
        staged=True,
    ),
    "vid": Method("student", lambda b: [ce(), *per_stage(VIDTerm, "vid", [1.0] * 3)]),
    "reviewkd": Method(
        "student",
        lambda b: [
            ce(),
            ReviewKDTerm(["conv1", "conv2", "conv3"], ["conv1.bn", "conv2.bn", "conv3.bn"], weight=5.0),
        ],
        warmup("reviewkd", 5.0),
    ),
    "sp": Method("student", lambda b: [ce(), SPTerm("conv3", "conv3", weight=3000.0)]),
    "rkd": Method("student", lambda b: [ce(), RKDTerm("embedding", "embedding", weight=1.0)]),
    "pkt": Method("student", lambda b: [ce(), PKTTerm("embedding", "embedding", weight=30000.0)]),
    "cc": Method("student", lambda b: [ce(), CCTerm("embedding", "embedding", weight=100.0)]),
    "crd": Method(
        "student",
        lambda b: [
            ce(),
            CRDTerm("embedding", "embedding", num_samples=b.train_samples, num_negatives=256, weight=0.8),
        ],
    ),
    "wide_baseline": Method("wide", lambda b: [ce()], uses_teacher=False),
    "wide_fsp": Method(
        "wide",
        lambda b: [
            ce(),
            FSPTerm(["conv1", "conv2"], ["conv1", "conv2"], name="fsp1"),
            FSPTerm(["conv2", "conv3"], ["conv2", "conv3"], name="fsp2"),
        ],
        fsp_stages,
        staged=True,
    ),
}
#: the sweep of the methods whose benchmark weight loses to the student alone here (AT at 1000 per stage,
#: FitNet at 100): the same terms at lower weights (rows ``<method>_w<weight>``)
SWEEP: dict[str, Method] = {
    **{
        f"at_w{weight}": Method(
            "student", functools.partial(lambda w, b: [ce(), *per_stage(ATTerm, "at", [w] * 3)], weight)
        )
        for weight in (100, 300)
    },
    **{
        f"fitnet_w{weight}": Method(
            "student", functools.partial(lambda w, b: [ce(), FitNetTerm("conv2", "conv2", weight=w)], weight)
        )
        for weight in (10, 30)
    },
}
METHODS.update(SWEEP)
BASELINES = {"student": "baseline", "wide": "wide_baseline"}


def make_model(kind: str, seed: int | None = None) -> nn.Module:
    """A model of ``MODELS``; with a seed, the seed's initial weights (the same for every method)."""
    if seed is not None:
        pl.seed_everything(seed + 1, verbose=False)
    return ConvNet2d(**MODELS[kind])


def datamodule(budget: Budget, augment: bool) -> MNISTDigitsDataModule:
    """The fixed data of every run (the seed draws the training order, not the split)."""
    return MNISTDigitsDataModule(
        train_samples=budget.train_samples,
        augment=augment,
        return_index=True,  # the index: CRD's
    )


def train_teacher(budget: Budget, out_dir: Path) -> tuple[str, float]:
    """The teacher's checkpoint and test accuracy: trained once, reused when recorded in ``out_dir``."""
    record = out_dir / "teacher.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if Path(saved["checkpoint"]).is_file():
            return saved["checkpoint"], saved["accuracy"]
    pl.seed_everything(0, verbose=False)
    module = DistillationModule(make_model("teacher"), optimizer=functools.partial(torch.optim.Adam, lr=LR))
    data = datamodule(budget, augment=True)
    result = fit_and_test("teacher", module, data, budget.teacher_epochs, out_dir, False)
    record.write_text(json.dumps({"checkpoint": str(result.checkpoint), "accuracy": result.accuracy}))
    return str(result.checkpoint), result.accuracy


def run_one(job: tuple[str, int, str, Budget, str]) -> dict[str, Any]:
    """Train and test one method with one seed (in a worker process, one thread)."""
    name, seed, teacher_checkpoint, budget, out_dir = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    method = METHODS[name]
    module = DistillationModule(
        make_model(method.student, seed),
        teacher=make_model("teacher") if method.uses_teacher else None,
        teacher_checkpoint=teacher_checkpoint if method.uses_teacher else None,
        losses=method.losses(budget),
        optimizer=functools.partial(torch.optim.Adam, lr=LR),
    )
    epochs = budget.student_epochs + (budget.init_epochs if method.staged else 0)
    pl.seed_everything(seed, verbose=False)  # the batches' order: the same for every method of a seed
    cpu = time.process_time()
    result = fit_and_test(
        name,
        module,
        datamodule(budget, augment=budget.augment_students),
        epochs,
        Path(out_dir) / f"seed{seed}",
        False,
        method.callbacks(budget),
    )
    cpu_per_epoch = (time.process_time() - cpu) / epochs
    return {
        "method": name,
        "seed": seed,
        "accuracy": result.accuracy,
        "seconds_per_epoch": result.seconds_per_epoch,
        "cpu_seconds_per_epoch": cpu_per_epoch,
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    """The runs recorded so far (a line cut short by an interruption is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_all(names: list[str], seeds: list[int], budget: Budget, out_dir: Path, processes: int) -> float:
    """Train the teacher (once), then every (method, seed) not yet recorded; the teacher's accuracy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_checkpoint, teacher_accuracy = train_teacher(budget, out_dir)
    records = out_dir / "records.jsonl"
    done = {(r["method"], r["seed"]) for r in read_records(records)}
    # row by row (every seed of a method before the next method), so a partial table has whole rows
    jobs = [
        (n, s, teacher_checkpoint, budget, str(out_dir)) for n in names for s in seeds if (n, s) not in done
    ]
    with contextlib.ExitStack() as stack:
        results: Iterator[dict[str, Any]] = map(run_one, jobs)  # one process: in this one
        if processes > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(processes))
            results = pool.imap_unordered(run_one, jobs)
        sink = stack.enter_context(records.open("a"))
        for result in results:
            sink.write(json.dumps(result) + "\n")
            sink.flush()
            print(
                f"seed {result['seed']} {result['method']:16s} {100 * result['accuracy']:6.2f}  "
                f"{result['cpu_seconds_per_epoch']:.3f} CPU s/epoch",
                flush=True,
            )
    return teacher_accuracy


def table(records: list[dict[str, Any]], teacher_accuracy: float | None, budget: Budget) -> list[str]:
    """Markdown: accuracy mean ± std, paired gain over the same student alone, CPU time per epoch."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        runs.setdefault(record["method"], {})[record["seed"]] = record
    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    teacher = f"{100 * teacher_accuracy:.2f}" if teacher_accuracy is not None else "not recorded"
    lines = [
        f"Real MNIST digits ({budget.train_samples} training images, 1,000 test images), test accuracy "
        f"(%), seeds {', '.join(map(str, seeds))}. Teacher ConvNet2d {MODELS['teacher']} "
        f"({budget.teacher_epochs} epochs, random crop with padding 2, no flip): {teacher}. Students "
        f"{budget.student_epochs} epochs (staged methods: init epochs on top), "
        f"{'with the crop' if budget.augment_students else 'un-augmented'}; gain: paired per seed against "
        "the same student alone; time: CPU seconds per epoch (one thread) relative to the student alone.",
        "",
        "| method | student | accuracy | gain | seeds gaining | CPU time / epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name in [n for n in METHODS if n in runs]:
        student = METHODS[name].student
        baseline = BASELINES[student]
        accuracy = [runs[name][s]["accuracy"] for s in sorted(runs[name])]
        gain, wins, time_cell = "", "", ""
        if name == baseline:
            seconds = statistics.mean(r["cpu_seconds_per_epoch"] for r in runs[name].values())
            time_cell = f"1.00x ({seconds:.2f} s)"
        elif baseline in runs:
            paired = sorted(set(runs[name]) & set(runs[baseline]))
            if paired:
                diffs = [runs[name][s]["accuracy"] - runs[baseline][s]["accuracy"] for s in paired]
                gain = mean_std(diffs, sign="+")
                wins = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
                ratio = statistics.mean(
                    runs[name][s]["cpu_seconds_per_epoch"] for s in paired
                ) / statistics.mean(runs[baseline][s]["cpu_seconds_per_epoch"] for s in paired)
                time_cell = f"{ratio:.2f}x"
        lines.append(f"| {name} | {student} | {mean_std(accuracy)} | {gain} | {wins} | {time_cell} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--processes", type=int, default=1, help="runs trained at once, one thread each")
    parser.add_argument("--teacher-epochs", type=int, default=Budget.teacher_epochs)
    parser.add_argument("--student-epochs", type=int, default=Budget.student_epochs)
    parser.add_argument("--train-samples", type=int, default=Budget.train_samples)
    parser.add_argument(
        "--augment-students", action="store_true", help="the teacher's crop for the students too"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmark_real_images"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--tabulate", action="store_true", help="only tabulate the runs recorded in --out-dir"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    budget = Budget(args.teacher_epochs, args.student_epochs, args.train_samples, args.augment_students)
    if args.tabulate:
        saved = args.out_dir / "teacher.json"
        teacher_accuracy = json.loads(saved.read_text())["accuracy"] if saved.is_file() else None
    else:
        teacher_accuracy = run_all(args.methods, args.seeds, budget, args.out_dir, args.processes)
    write_table(table(read_records(args.out_dir / "records.jsonl"), teacher_accuracy, budget), args.results)


if __name__ == "__main__":
    main()
