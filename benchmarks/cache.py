"""Epoch time of KD with a teacher-output cache vs. student-only training and KD without a cache.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/cache.py                      # both settings, ~6 min
    OMP_NUM_THREADS=1 python benchmarks/cache.py --settings mnist1d --repeats 3  # one setting
    OMP_NUM_THREADS=1 python benchmarks/cache.py --lookup                       # the per-row checks, ~20 s

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

``--lookup`` instead times the per-row checks of one lookup (batch 128, complete cache on disk):
the CRC-32 of the rows read against ``checksum.npy`` (host), and :func:`input_signature` of the
batch's inputs (on the CPU here), for MNIST-1D rows (10 float32 logits, 40 inputs) and a row with
a 64x8x8 float32 feature (CIFAR-sized 3x32x32 inputs); writes benchmarks/results/cache_lookup.md.
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
from lightning_kd.teachers.fingerprints import input_signature

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


def median_microseconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``call`` in microseconds over ``repeats`` calls (after a warm-up call)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def timed_checks(
    cache: TeacherOutputCache, indices: torch.Tensor, inputs: torch.Tensor, repeats: int
) -> list[str]:
    """Median µs of a lookup's parts and variants, and the bytes per sample (see ``lookup_cost``).

    The lookup variants alternate call by call, so that load from other jobs hits them alike.
    """
    signature = input_signature(inputs, len(indices))
    picked = {name: cache.arrays[name][indices] for name in cache._checked}
    crc = median_microseconds(lambda: cache._checksums(indices, picked), repeats)
    signing = median_microseconds(lambda: input_signature(inputs, len(indices)), repeats)
    variants: dict[str, list[float]] = {"bare": [], "first": [], "later": []}
    for _ in range(repeats):
        for variant, times in variants.items():
            cache._verified[indices] = variant != "first"  # rows not yet served in this run are verified
            start = time.perf_counter()
            cache.lookup(indices, signature if variant == "bare" else input_signature(inputs, len(indices)))
            times.append(time.perf_counter() - start)
    bare, first, later = (1e6 * statistics.median(times) for times in variants.values())
    return [f"{value:.0f}" for value in (bare, crc, signing, first, later)] + [str(cache.bytes_per_sample)]


def lookup_cost(repeats: int) -> str:
    """Markdown table: one lookup of 128 rows with and without its checksum and signature checks."""
    rows = [
        "| rows | lookup without checks µs | CRC-32 of the rows µs | input signature µs "
        "| step's lookup, rows served first µs | step's lookup, rows served before µs | bytes / sample |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = {
        "MNIST-1D: 10 logits, inputs 40": (10, {}, (40,)),
        "10 logits + feature 64x8x8, inputs 3x32x32": (10, {"layer": (64, 8, 8)}, (3, 32, 32)),
    }
    samples, batch = 4500, 128
    generator = torch.Generator().manual_seed(0)
    for label, (classes, features, input_shape) in cases.items():
        with tempfile.TemporaryDirectory() as directory:
            cache = TeacherOutputCache(directory)
            example = {path: torch.zeros(1, *shape) for path, shape in features.items()}
            cache.open("benchmark", samples, torch.zeros(1, classes), example)
            inputs = torch.randn(samples, *input_shape, generator=generator)
            for start in range(0, samples, 500):
                part = torch.arange(start, min(start + 500, samples))
                cache.store(
                    part,
                    torch.randn(len(part), classes, generator=generator),
                    {
                        path: torch.randn(len(part), *shape, generator=generator)
                        for path, shape in features.items()
                    },
                    input_signature(inputs[part], len(part)),
                )
            cache.finish_epoch()
            indices = torch.randperm(samples, generator=generator)[:batch]
            rows.append(
                f"| {label} | " + " | ".join(timed_checks(cache, indices, inputs[indices], repeats)) + " |"
            )
            cache.release()
    return "\n".join(rows) + "\n"


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
    parser.add_argument("--lookup", action="store_true", help="time the per-row checks of a lookup instead")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.lookup:
        table = lookup_cost(repeats=300)
        output = RESULTS.with_name("cache_lookup.md")
        output.write_text(
            "# Teacher-output cache: cost of the per-row checks of one lookup\n\n"
            "`OMP_NUM_THREADS=1 python benchmarks/cache.py --lookup` on "
            f"{torch.get_num_threads()} CPU thread(s): median of 300 calls, batch 128 of 4,500 samples, "
            "complete cache memory-mapped on disk (page cache warm). 'Without checks': the lookup of "
            "rows already verified, with a precomputed signature (its comparison stays on the device: a "
            "few small tensor ops). A step's lookup also computes the batch's input signature, and the "
            "first time a run serves a row it verifies the row's CRC-32s.\n\n" + table
        )
        print(output.read_text())
        return
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
