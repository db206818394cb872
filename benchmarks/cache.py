"""Epoch time of KD with a teacher-output cache vs. student-only training and KD without a cache.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/cache.py                      # both settings, ~6 min
    OMP_NUM_THREADS=1 python benchmarks/cache.py --settings mnist1d --repeats 3  # one setting

Variants, fitted side by side in one process and interleaved (student, kd, kd_cached, ...,
student, kd, ...) so that machine load hits them alike, ``--repeats`` times each:

- ``student``: the student alone with cross-entropy (no teacher);
- ``kd``: Hinton KD (0.1 CE + 0.9 KD, T = 4), teacher forward every step;
- ``kd_cached``: the same with ``TeacherOutputCache()`` in memory (full float32 logits);
- ``kd_cached_disk_topk``: the same with a memory-mapped cache on disk keeping the top-k logits.

Each fit runs ``--epochs`` epochs without validation; epoch 0 fills the cache, so the steady
state is the median time of the later epochs, and the fill epoch is reported on its own. The
ratio to ``student`` is taken within each repetition and its median is reported. Settings
(the teacher's weights are random: speed does not depend on them):

- ``mnist1d``: the quickstart pair, ConvNet1d -> MLP(256, 256), 4,500 samples, batch 128;
- ``cifar``: the CRD benchmark pair resnet32x4 -> resnet8x4 (100 classes) on random 32x32
  inputs, where the teacher forward costs about twice the student's forward and backward.

Writes benchmarks/results/cache.md with the time table and the storage per sample.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.data import MNIST1DDataModule
from lightning_kd.data.indexed import WithIndex
from lightning_kd.models import MLP, ConvNet1d, create_cifar_model
from lightning_kd.module import DistillationModule
from lightning_kd.teachers.cache import TeacherOutputCache

RESULTS = Path(__file__).parent / "results" / "cache.md"
VARIANTS = ["student", "kd", "kd_cached", "kd_cached_disk_topk"]
LABELS = {"mnist1d": ("ConvNet1d", "MLP(256, 256)"), "cifar": ("resnet32x4", "resnet8x4")}


class RandomImages(pl.LightningDataModule):
    """Random 32x32 RGB images with random labels; training batches carry the sample index."""

    def __init__(self, samples: int, num_classes: int, batch_size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(samples, 3, 32, 32, generator=generator),
            torch.randint(num_classes, (samples,), generator=generator),
        )
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(WithIndex(self.data), batch_size=self.batch_size, shuffle=True)


def setting(name: str, samples: int) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module], Any, int]:
    """(teacher factory, student factory, datamodule, top-k) of a setting."""
    if name == "mnist1d":
        data = MNIST1DDataModule(train_samples=5000, batch_size=128, return_index=True)
        return (lambda: ConvNet1d(num_classes=10)), (lambda: MLP(40, 10, hidden=(256, 256))), data, 3
    data = RandomImages(samples, num_classes=100, batch_size=64)
    return (lambda: create_cifar_model("resnet32x4")), (lambda: create_cifar_model("resnet8x4")), data, 5


class EpochTimer(pl.Callback):
    """Wall-clock seconds of every training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def run_variant(
    variant: str, teacher: nn.Module, student: nn.Module, data: Any, top_k: int, epochs: int
) -> dict:
    """Fit one variant; its epoch times and the cache's bytes per sample."""
    cache = None
    with tempfile.TemporaryDirectory() as directory:
        if variant == "kd_cached":
            cache = TeacherOutputCache()
        elif variant == "kd_cached_disk_topk":
            cache = TeacherOutputCache(directory, top_k=top_k)
        module = DistillationModule(student, None if variant == "student" else teacher, teacher_cache=cache)
        timer = EpochTimer()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, datamodule=data)
        return {"seconds": timer.seconds, "bytes": cache.bytes_per_sample if cache is not None else 0}


def parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def benchmark(name: str, repeats: int, epochs: int, samples: int) -> str:
    """Markdown section for one setting."""
    make_teacher, make_student, data, top_k = setting(name, samples)
    steady: dict[str, list[float]] = {v: [] for v in VARIANTS}
    fill: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    storage: dict[str, int] = {}
    for repeat in range(repeats):
        pl.seed_everything(repeat, verbose=False)
        teacher = make_teacher()
        initial_student = make_student().state_dict()
        for variant in VARIANTS:
            student = make_student()
            student.load_state_dict(initial_student)
            result = run_variant(variant, teacher, student, data, top_k, epochs)
            steady[variant].append(statistics.median(result["seconds"][1:]))
            fill[variant].append(result["seconds"][0])
            storage[variant] = result["bytes"]
            print(f"{name} repeat {repeat} {variant}: {[round(s, 3) for s in result['seconds']]}", flush=True)
        for variant in VARIANTS:
            ratios[variant].append(steady[variant][-1] / steady["student"][-1])
    teacher, student = make_teacher(), make_student()
    lines = [
        f"### {name}: {LABELS[name][0]} ({parameters(teacher):,} parameters) -> "
        f"{LABELS[name][1]} ({parameters(student):,}), "
        f"{len(data.train_dataloader().dataset):,} training samples",
        "",
        "| variant | s / epoch (median, epochs 1+) | ratio to student (median of repeats) | first epoch s "
        "| cache bytes / sample |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        size = str(storage[variant]) if storage[variant] else "-"
        lines.append(
            f"| {variant.replace('topk', f'top{top_k}')} | {statistics.median(steady[variant]):.3f} "
            f"| {statistics.median(ratios[variant]):.2f}x | {statistics.median(fill[variant]):.3f} | {size} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=["mnist1d", "cifar"], choices=["mnist1d", "cifar"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--cifar-samples", type=int, default=256, help="training samples of the cifar setting"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sections = [benchmark(name, args.repeats, args.epochs, args.cifar_samples) for name in args.settings]
    header = (
        "# Teacher-output cache: KD epoch time vs. student-only training\n\n"
        "`OMP_NUM_THREADS=1 nice -n 5 python benchmarks/cache.py "
        f"--repeats {args.repeats} --epochs {args.epochs}"
        f" --cifar-samples {args.cifar_samples}`"
        f" on {torch.get_num_threads()} CPU thread(s); variants interleaved within each repeat; "
        "steady-state epochs exclude epoch 0 (the cache fill). Storage per sample includes the 1-byte "
        "`filled` flag.\n\n"
    )
    args.output.write_text(header + "\n".join(sections))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
