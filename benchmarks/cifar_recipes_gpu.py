"""Every CIFAR-100 recipe at full model size on synthetic 32x32 data: time per step, projected epoch.

CIFAR-100 cannot be downloaded on the machines this project runs on, GPU ones included, so what
can be checked there is checked here: each recipe of ``lightning_kd/recipes/cifar100`` (teacher,
baseline, kd and every ``methods/`` overlay) is built by ``lightning-kd``'s own CLI (the teacher
checkpoint left out), trained for ``--warmup`` + ``--steps`` steps on random 3x32x32 images with
100 classes at the recipe's batch size (two views for MLKD; sample indices for CRD), and timed
from the end of the warm-up to the last step (on CUDA after ``torch.cuda.synchronize()``). The
epoch is projected as 50,000 / batch size steps, the run as ``max_epochs`` epochs of them
(data loading and validation not included: the data here is in memory).

    python benchmarks/cifar_recipes_gpu.py --device cuda --precision bf16-mixed   # about 5 min, one H100
    python benchmarks/cifar_recipes_gpu.py --quick                                 # CPU smoke run

Writes a Markdown table to ``--out`` (default: printed only) with the device named.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import MLKDTerm
from lightning_kd.cli import DistillationCLI
from lightning_kd.model_io import TwoViewBatch
from lightning_kd.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR / "cifar100"
TRAIN_IMAGES = 50_000


def recipe_names() -> list[str]:
    """``teacher``, ``baseline``, ``kd`` and every method overlay, in that order."""
    return ["teacher", "baseline", "kd", *sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))]


def recipe_configs(name: str) -> list[Path]:
    """The YAML files of a recipe: a method overlay goes on top of ``kd.yaml``."""
    if name in ("teacher", "baseline", "kd"):
        return [CONFIGS / f"{name}.yaml"]
    return [CONFIGS / "kd.yaml", CONFIGS / "methods" / f"{name}.yaml"]


def build(name: str) -> tuple[pl.LightningModule, int, int]:
    """The recipe's module (no teacher checkpoint), its batch size and its number of epochs."""
    args = [arg for config in recipe_configs(name) for arg in ("--config", str(config))]
    if name != "teacher" and name != "baseline":
        args.append("--model.init_args.teacher_checkpoint=null")
    cli = DistillationCLI(args=args, run=False)
    return cli.model, int(cli.datamodule.batch_size), int(cli.trainer.max_epochs)


def two_views(samples: list[tuple[torch.Tensor, ...]]) -> TwoViewBatch:
    """A two-view batch of random images: the strong view is the weak one plus noise."""
    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples])
    return TwoViewBatch(torch.cat([images, images + 0.1 * torch.randn_like(images)]), labels.repeat(2))


def synthetic_loader(module: pl.LightningModule, batch_size: int, batches: int) -> DataLoader:
    """Random 3x32x32 images, labels and sample indices, ``batches`` batches of ``batch_size``."""
    samples = batch_size * batches
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 100, (samples,), generator=generator)
    dataset = TensorDataset(images, labels, torch.arange(samples))
    mlkd = any(isinstance(term, MLKDTerm) for term in getattr(module, "loss_terms", {}).values())
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=two_views if mlkd else None)


class StepTimer(pl.Callback):
    """Wall time from the end of the warm-up step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.started: float | None = None
        self.seconds = float("nan")

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.started = self._now()

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.started is not None:
            self.seconds = self._now() - self.started


def measure(
    name: str, device: str, precision: str, warmup: int, steps: int, batch: int | None
) -> dict[str, Any]:
    """One recipe: seconds per step, projected epoch and run, peak GPU memory."""
    torch.manual_seed(0)
    module, batch_size, epochs = build(name)
    batch_size = batch or batch_size
    timer = StepTimer(warmup, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, synthetic_loader(module, batch_size, warmup + steps))
    per_step = timer.seconds / steps
    epoch = per_step * TRAIN_IMAGES / batch_size
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {
        "recipe": name,
        "batch": batch_size,
        "step_ms": 1e3 * per_step,
        "epoch_s": epoch,
        "run_h": epoch * epochs / 3600,
        "epochs": epochs,
        "memory_gib": memory,
    }


def table(rows: list[dict[str, Any]], device: str, precision: str, warmup: int, steps: int) -> str:
    """The Markdown table of the measured rows, with the device and settings."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    lines = [
        f"Device: {name} ({device}), precision {precision}, torch {torch.__version__}; {warmup} warm-up "
        f"and {steps} timed steps per recipe on synthetic 3x32x32 data; epoch = {TRAIN_IMAGES:,} images.",
        "",
        "| recipe | batch | ms / step | projected s / epoch | projected run (h) | peak GPU memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['batch']} | {r['step_ms']:.1f} | {r['epoch_s']:.1f} | "
            f"{r['run_h']:.2f} ({r['epochs']} epochs) | {r['memory_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure the asked recipes and print (or write) their table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32 on the CPU")
    parser.add_argument("--recipes", nargs="+", default=None, help="default: every CIFAR-100 recipe")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--quick", action="store_true", help="2 warm-up + 2 timed steps at batch 4")
    parser.add_argument("--out", default=None, help="write the table here")
    options = parser.parse_args()
    if options.quick:
        options.warmup, options.steps, options.batch_size = 2, 2, options.batch_size or 4
    precision = options.precision or ("bf16-mixed" if options.device == "cuda" else "32")
    rows = []
    for name in options.recipes or recipe_names():
        rows.append(
            measure(name, options.device, precision, options.warmup, options.steps, options.batch_size)
        )
        print(f"{name}: {rows[-1]['step_ms']:.1f} ms / step", flush=True)
        report = table(rows, options.device, precision, options.warmup, options.steps)
        if options.out:  # rewritten after every recipe: a stopped run keeps what it measured
            Path(options.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
