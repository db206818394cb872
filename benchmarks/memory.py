"""Peak memory of a distillation step vs. student-only training, each variant in a fresh process.

    OMP_NUM_THREADS=1 python benchmarks/memory.py                    # CPU RSS, about a minute
    python benchmarks/memory.py --device cuda --batch-size 128 --precision bf16-mixed
    python benchmarks/memory.py --quick                              # a smoke run

The pair of the mid workload of benchmarks/step_overhead.py: ``resnet8x4`` student, ``resnet32x4``
teacher, 100 classes, 32x32 random inputs, SGD with momentum, ``DistillationModule`` under
``lightning.Trainer`` (logger, progress bar, checkpointing, validation off) for ``--steps`` steps.
Variants:

- ``student``: ``DistillationModule(student)``, cross-entropy only (no teacher is built).
- ``kd``: ``DistillationModule(student, teacher)``: frozen teacher, forward under ``no_grad``.
- ``kd_teacher_graph``: the same, but the teacher runs with autograd on (its parameters
  ``requires_grad=True`` after the optimizer is built, no ``no_grad``): what a forgotten
  ``no_grad``/``requires_grad_(False)`` costs. The loss still detaches the teacher's logits, so
  the result is identical; only the teacher's saved activations stay alive until the step ends.

Each variant runs in its own subprocess. On CPU the peak is the process's peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the start value the resident set size at
``on_train_start`` (models, optimizer, data and libraries loaded); on CUDA
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` at ``on_train_start``,
and ``memory_allocated()`` there. The estimate is "student-only peak + teacher weights + the
teacher's activations": with ``no_grad`` only the largest layer's input and output are alive at
once; with the graph, every layer output (what autograd saves, roughly) is alive at the peak.
Writes benchmarks/results/memory.md (``--out`` to change; ``--quick`` writes nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.models import create_cifar_model
from lightning_kd.module import DistillationModule

RESULTS = Path(__file__).parent / "results" / "memory.md"
VARIANTS = ("student", "kd", "kd_teacher_graph")
MIB = 2**20


def sgd(params: Any) -> torch.optim.Optimizer:
    """The CRD benchmark's optimizer (SGD 0.05, momentum 0.9, weight decay 5e-4)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def current_rss() -> int:
    """The resident set size of this process now, in bytes (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("No VmRSS line in /proc/self/status: RSS measurement needs Linux.")


class TeacherWithGraph(DistillationModule):
    """A frozen teacher that nevertheless runs with autograd on (the mistake being measured)."""

    def on_train_start(self) -> None:
        """Track gradients of the teacher from now on (after the optimizer is built without it)."""
        self.teacher.requires_grad_(True)

    def teacher_forward(self, inputs: Any) -> Any:
        """The teacher's output, without ``no_grad``."""
        return self.teacher(inputs)


class MemoryProbe(pl.Callback):
    """Memory at ``on_train_start`` and the peak after the last step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = self.peak = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the memory in use before the first step; reset the CUDA peak."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = current_rss()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the peak over the steps (on CPU: over the process's life)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def teacher_activation_bytes(teacher: nn.Module, inputs: Tensor) -> tuple[int, int]:
    """Bytes of all leaf-module outputs of one forward, and the largest leaf's input + output."""
    total, largest = 0, 0
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        nonlocal total, largest
        if isinstance(output, Tensor):
            out = output.numel() * output.element_size()
            inp = sum(a.numel() * a.element_size() for a in args if isinstance(a, Tensor))
            total += out
            largest = max(largest, inp + out)

    for module in teacher.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            teacher(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total, largest


def build(
    args: argparse.Namespace, with_teacher: bool = True
) -> tuple[nn.Module | None, nn.Module, DataLoader]:
    """Teacher (if asked), student (in the chosen layout, compiled if asked) and the random-data loader."""
    pl.seed_everything(0, verbose=False)
    teacher = create_cifar_model(args.teacher, num_classes=100) if with_teacher else None
    student = create_cifar_model(args.student, num_classes=100)
    for model in (teacher, student):
        if model is not None and args.channels_last:
            model.to(memory_format=torch.channels_last)
        if model is not None and args.compile:
            model.compile()
    n = 4 * args.batch_size
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 100, (n,)))
    return teacher, student, DataLoader(data, batch_size=args.batch_size, drop_last=True)


def worker(args: argparse.Namespace) -> None:
    """Train one variant for ``--steps`` steps and print its measurements as one JSON line."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    teacher, student, loader = build(args, with_teacher=args.worker != "student")
    if args.worker == "student":
        module = DistillationModule(student, optimizer=sgd)
    elif args.worker == "kd":
        module = DistillationModule(student, teacher, optimizer=sgd)
    else:
        module = TeacherWithGraph(student, teacher, optimizer=sgd)
    probe = MemoryProbe(args.device)
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[probe],
    )
    trainer.fit(module, train_dataloaders=loader)
    print(json.dumps({"variant": args.worker, "start": probe.start, "peak": probe.peak}))


def estimates(args: argparse.Namespace) -> dict[str, int]:
    """Teacher weight bytes and its activations at ``--batch-size`` (float32, or bf16 under autocast)."""
    pl.seed_everything(0, verbose=False)
    teacher = create_cifar_model(args.teacher, num_classes=100)  # eager: the hooks see every layer
    inputs = torch.randn(args.batch_size, 3, 32, 32)
    weights = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    if args.precision == "bf16-mixed":  # conv/linear outputs are bf16 under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            all_outputs, largest = teacher_activation_bytes(teacher, inputs)
    else:
        all_outputs, largest = teacher_activation_bytes(teacher, inputs)
    return {"weights": weights, "all_outputs": all_outputs, "largest": largest}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--channels-last", action="store_true", help="models in NHWC (activations follow)")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 8, one step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps = 8, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch.")
    if args.worker:
        worker(args)
        return

    passed = [a for a in sys.argv[1:] if a != "--quick"]
    passed += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    results = {}
    for variant in VARIANTS:
        run = subprocess.run(
            [sys.executable, __file__, *passed, "--worker", variant], capture_output=True, text=True
        )
        if run.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{run.stderr[-3000:]}")
        results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        print(results[variant], flush=True)

    table = render(args, results, estimates(args))
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        print(f"wrote {args.out}")


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]], est: dict[str, int]) -> str:
    """The markdown table (MiB): start, peak, peak above start, peak above student-only, estimate."""
    what = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (ru_maxrss)"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    student_peak = results["student"]["peak"]
    expected = {
        "student": student_peak,
        "kd": student_peak + est["weights"] + est["largest"],
        "kd_teacher_graph": student_peak + est["weights"] + est["all_outputs"],
    }
    lines = [
        f"Peak memory of a training step, {args.teacher} -> {args.student}, 100 classes, 32x32 random "
        f"inputs, batch {args.batch_size}, {args.steps} steps; device: {device} "
        f"(torch.get_num_threads() = {torch.get_num_threads()}); precision {args.precision}"
        f"{', channels-last' if args.channels_last else ''}{', torch.compile' if args.compile else ''}; "
        f"measure: {what}; each variant in a fresh process; torch {torch.__version__}, "
        f"lightning {pl.__version__}.",
        "",
        f"Teacher weights {est['weights'] / MIB:.1f} MiB; one teacher forward at batch {args.batch_size}: "
        f"all layer outputs {est['all_outputs'] / MIB:.1f} MiB, largest layer input + output "
        f"{est['largest'] / MIB:.1f} MiB.",
        "",
        "| variant | at train start (MiB) | peak (MiB) | peak - start (MiB) | peak - student-only peak (MiB) "
        "| expected peak (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        start, peak = results[name]["start"], results[name]["peak"]
        lines.append(
            f"| {name} | {start / MIB:.1f} | {peak / MIB:.1f} | {(peak - start) / MIB:.1f} "
            f"| {(peak - student_peak) / MIB:+.1f} | {expected[name] / MIB:.1f} |"
        )
    lines += [
        "",
        "Expected: student: as measured; kd: student-only peak + teacher weights + largest teacher "
        "layer (input + output), an upper bound; kd_teacher_graph: student-only peak + teacher weights "
        "+ all teacher layer outputs.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
