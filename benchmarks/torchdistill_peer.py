"""Peer benchmark: the same Hinton-KD run with lightning_kd and with torchdistill, time per step and accuracy.

    python3 -m venv /tmp/tdenv
    /tmp/tdenv/bin/pip install -c constraints.txt -r benchmarks/requirements-torchdistill.txt
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/torchdistill_peer.py --seeds 0 1 2 \
        --td-python /tmp/tdenv/bin/python

The quickstart setting: MNIST-1D from ``MNIST1DDataModule`` (4,500 train / 500 val / 10,000 test,
batch 128); a ConvNet1d teacher trained by lightning_kd (60 epochs, Adam 1e-3, cosine) per seed;
an MLP student (256, 256) trained 150 epochs with Adam 3e-3 and cosine decay per step to 0,
loss 0.1 CE + 0.9 KD at T = 4 (Hinton et al., "Distilling the Knowledge in a Neural Network",
2015). Both frameworks get the same data tensors, the same teacher weights (a plain state dict)
and the same initial student weights (``seed + 1``); only the shuffling differs. Per seed, the two
student runs follow each other in one invocation (their order alternates between seeds), each in
one process at a time: ours in this process through ``lightning_kd.quickstart.fit_and_test``,
torchdistill's in its own virtual environment (``benchmarks/torchdistill_side.py``), which the
tests and CI never need. Writes ``benchmarks/results/torchdistill_peer.md``:

- *step* time: from the start of a training step (batch in hand) to the end of its optimizer and
  scheduler step, averaged over all steps;
- *fit* time per step: the whole training run (data loading, steps, a validation pass per epoch,
  the framework's own bookkeeping and logging) divided by the number of steps;
- test accuracy (%) of the final student.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch

from lightning_kd.data import MNIST1DDataModule
from lightning_kd.losses import CrossEntropyTerm, KDTerm
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.module import DistillationModule
from lightning_kd.quickstart import fit_and_test

SIDE = Path(__file__).with_name("torchdistill_side.py")
RESULTS = Path(__file__).parent / "results" / "torchdistill_peer.md"
TEACHER_EPOCHS, STUDENT_EPOCHS, STUDENT_LR, BATCH_SIZE = 60, 150, 3e-3, 128
CE_WEIGHT, TEMPERATURE = 0.1, 4.0


class StepTimer(pl.Callback):
    """Seconds from ``on_train_batch_start`` to ``on_train_batch_end``, summed over the run."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._started = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.seconds += time.perf_counter() - self._started
        self.steps += 1


def new_student(seed: int) -> MLP:
    """The quickstart's MLP student, initialised from ``seed + 1`` (the same weights on both sides)."""
    pl.seed_everything(seed + 1, verbose=False)
    return MLP(in_features=40, num_classes=10, hidden=(256, 256))


def train_teacher(seed: int, datamodule: MNIST1DDataModule, out_dir: Path, epochs: int) -> tuple[dict, float]:
    """The quickstart teacher for ``seed``: its plain state dict and test accuracy."""
    pl.seed_everything(seed, verbose=False)
    module = DistillationModule(ConvNet1d(num_classes=10))
    result = fit_and_test("teacher", module, datamodule, epochs, out_dir, progress=False)
    return {k: v.detach().clone() for k, v in module.student.state_dict().items()}, result.accuracy


def run_ours(
    seed: int, teacher_state: dict, datamodule: MNIST1DDataModule, out_dir: Path, epochs: int
) -> dict:
    """lightning_kd's KD student: ``DistillationModule`` fitted and tested by ``fit_and_test``."""
    teacher = ConvNet1d(num_classes=10)
    teacher.load_state_dict(teacher_state)
    module = DistillationModule(
        new_student(seed),
        teacher=teacher,
        losses=[CrossEntropyTerm(weight=CE_WEIGHT), KDTerm(weight=1 - CE_WEIGHT, temperature=TEMPERATURE)],
        optimizer=functools.partial(torch.optim.Adam, lr=STUDENT_LR),
    )
    timer = StepTimer()
    result = fit_and_test("kd", module, datamodule, epochs, out_dir, progress=False, callbacks=[timer])
    return {
        "test_accuracy": result.accuracy,
        "fit_seconds": result.seconds_per_epoch * epochs,
        "step_seconds": timer.seconds,
        "steps": timer.steps,
    }


def run_torchdistill(td_python: str, bundle: Path, out: Path) -> dict:
    """torchdistill's KD student, trained by ``torchdistill_side.py`` in its own environment."""
    subprocess.run([td_python, str(SIDE), "--bundle", str(bundle), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def write_bundle(
    seed: int, datamodule: MNIST1DDataModule, teacher_state: dict, path: Path, epochs: int
) -> None:
    """Everything the torchdistill side needs: data tensors, teacher weights, initial student weights."""
    splits = {split: list(datamodule.datasets[split].tensors) for split in ("train", "val", "test")}
    config = {
        "seed": seed,
        "epochs": epochs,
        "lr": STUDENT_LR,
        "batch_size": BATCH_SIZE,
        "temperature": TEMPERATURE,
        "ce_weight": CE_WEIGHT,
    }
    student_init = new_student(seed).state_dict()
    torch.save({**splits, "teacher": teacher_state, "student_init": student_init, "config": config}, path)


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (std only for two or more values)."""
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(rows: list[dict], teacher_epochs: int, epochs: int, td_version: str) -> str:
    """Markdown: one row per seed and framework, then the means and the torchdistill / ours ratios."""
    lines = [
        "# torchdistill peer benchmark: Hinton KD on MNIST-1D",
        "",
        f"Quickstart setting: MLP (256, 256) student, ConvNet1d teacher trained by lightning_kd "
        f"({teacher_epochs} epochs), {epochs} student epochs, Adam {STUDENT_LR:g} with per-step cosine "
        f"decay, batch {BATCH_SIZE}, {CE_WEIGHT:g} CE + {1 - CE_WEIGHT:g} KD at T = {TEMPERATURE:g}; "
        "both frameworks start from the same student and teacher weights and the same data. "
        "CPU, `OMP_NUM_THREADS=1`, one process at a time, the two runs of a seed back to back "
        "(their order alternating between seeds).",
        "",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, torchdistill {td_version}.",
        "",
        "| seed | framework | teacher acc. (%) | student test acc. (%) | step (ms) | fit time / step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name in ("lightning_kd", "torchdistill"):
            run = row[name]
            step, fit = 1000 * run["step_seconds"] / run["steps"], 1000 * run["fit_seconds"] / run["steps"]
            lines.append(
                f"| {row['seed']} | {name} | {100 * row['teacher']:.2f} | {100 * run['test_accuracy']:.2f} | "
                f"{step:.2f} | {fit:.2f} |"
            )
    lines += ["", "| framework | student test acc. (%) | step (ms) | fit time / step (ms) |"]
    lines += ["|---|---|---|---|"]
    for name in ("lightning_kd", "torchdistill"):
        runs = [row[name] for row in rows]
        acc = mean_std([r["test_accuracy"] for r in runs], 100)
        step = mean_std([r["step_seconds"] / r["steps"] for r in runs], 1000)
        fit = mean_std([r["fit_seconds"] / r["steps"] for r in runs], 1000)
        lines.append(f"| {name} | {acc} | {step} | {fit} |")
    step_ratio = [r["lightning_kd"]["step_seconds"] / r["torchdistill"]["step_seconds"] for r in rows]
    fit_ratio = [r["lightning_kd"]["fit_seconds"] / r["torchdistill"]["fit_seconds"] for r in rows]
    gap = [r["lightning_kd"]["test_accuracy"] - r["torchdistill"]["test_accuracy"] for r in rows]
    lines += [
        "",
        f"lightning_kd / torchdistill time ratio (paired per seed): step {mean_std(step_ratio)}, "
        f"fit {mean_std(fit_ratio)}; accuracy difference lightning_kd - torchdistill: "
        f"{mean_std(gap, 100)} points.",
        "",
        "*step*: from the start of a training step (batch in hand) to the end of the optimizer and "
        "scheduler step. *fit time / step*: the whole training run (data loading, a validation pass per "
        "epoch, bookkeeping, logging) divided by the number of steps. The test accuracy is that of the "
        "final student.",
        "",
        "Reproduce: see `python benchmarks/torchdistill_peer.py --help` (needs the torchdistill "
        "environment of `benchmarks/requirements-torchdistill.txt`).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the paired benchmark for each seed and write the results table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    parser.add_argument("--epochs", type=int, default=STUDENT_EPOCHS, help="student epochs (both frameworks)")
    parser.add_argument(
        "--td-python", default="/tmp/tdenv/bin/python", help="python of the environment that has torchdistill"
    )
    parser.add_argument("--out-dir", default=None, help="logs and bundles (default: a temporary folder)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file for the table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    td_version = subprocess.run(
        [args.td_python, "-c", "import torchdistill; print(torchdistill.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(args.out_dir or tmp)
        for index, seed in enumerate(args.seeds):
            out_dir = out_root / f"seed{seed}"
            out_dir.mkdir(parents=True, exist_ok=True)
            datamodule = MNIST1DDataModule(train_samples=5000, batch_size=BATCH_SIZE)
            datamodule.setup()
            teacher_state, teacher_acc = train_teacher(seed, datamodule, out_dir, args.teacher_epochs)
            bundle = out_dir / "bundle.pt"
            write_bundle(seed, datamodule, teacher_state, bundle, args.epochs)
            row: dict[str, Any] = {"seed": seed, "teacher": teacher_acc}
            order = ("lightning_kd", "torchdistill") if index % 2 == 0 else ("torchdistill", "lightning_kd")
            for name in order:
                if name == "lightning_kd":
                    row[name] = run_ours(seed, teacher_state, datamodule, out_dir, args.epochs)
                else:
                    row[name] = run_torchdistill(args.td_python, bundle, out_dir / "torchdistill.json")
                run = row[name]
                print(
                    f"seed {seed} {name}: test acc {100 * run['test_accuracy']:.2f}%, "
                    f"step {1000 * run['step_seconds'] / run['steps']:.2f} ms, "
                    f"fit/step {1000 * run['fit_seconds'] / run['steps']:.2f} ms",
                    flush=True,
                )
            rows.append(row)
    Path(args.results).write_text(table(rows, args.teacher_epochs, args.epochs, td_version))
    print(Path(args.results).read_text())
    return rows


if __name__ == "__main__":
    main()
