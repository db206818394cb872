"""Time per training step of DistillationModule under a Lightning Trainer vs. a hand-written loop.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                  # CPU, about 4 minutes on one core
    python benchmarks/overhead.py --device cuda --batch-size 128 --steps 50 --precision bf16-mixed
    python benchmarks/overhead.py --quick                            # a smoke run, seconds

All variants train the same ``resnet8x4`` student from the same ``resnet32x4`` teacher (the CRD
benchmark's pair, 100 classes, 32x32 inputs) on the same random tensors, batches, optimizer (SGD
0.05, momentum 0.9, weight decay 5e-4, cosine decay stepped per step) and loss (0.1 CE + 0.9 T^2 KL
at T = 4, the teacher in eval mode under ``no_grad``):

- ``hand``: a minimal PyTorch loop: teacher forward, student forward, loss, backward, step.
- ``lightning``: ``DistillationModule(student, teacher)`` (its defaults are exactly that loss) in
  ``lightning.Trainer`` with progress bar, model summary, checkpointing, validation and sanity
  checks off, and a CSVLogger (``--logger none`` for ``logger=False``). What stays on is what users
  get: logging of ``train/loss_ce``, ``train/loss_kd``, ``train/loss`` every step, the
  ``train/acc`` metric update, the finiteness check of the loss, the LR scheduler.
- ``lightning_lean``: the same with the two per-step extras that are not needed for the loss
  turned off: ``check_finite=False`` (its ``if not torch.isfinite(total)`` is a host-device sync
  on GPU) and a ``training_step`` without the ``train/acc`` metric update.

The variants run interleaved in ONE process: ``--blocks`` rounds of [hand, lightning,
lightning_lean] (order rotated every round), each ``--steps`` timed steps after ``--warmup``
steps; the table gives the median wall and CPU (process) time per step over the rounds and their
ratios to ``hand``: on a shared machine CPU time is the reliable one.
Each Lightning block is a fresh ``Trainer.fit(max_steps=warmup + steps)`` on the same module;
a callback times from the end of the last warm-up step to the end of the last step (data
loading, batch transfer, hooks, logging, optimizer and scheduler included; set-up and teardown
of ``fit`` excluded). On CUDA the clock reads follow ``torch.cuda.synchronize()``.
Writes benchmarks/results/overhead.md (``--out`` to change, ``--append`` to add a table; ``--quick``
writes nothing). The recorded file holds the default run and ``--batch-size 8 --steps 40 --append``,
where the fixed per-step cost of the Trainer is a larger share of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.models import create_cifar_model
from lightning_kd.module import DistillationModule

RESULTS = Path(__file__).parent / "results" / "overhead.md"
TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 4.0, 0.1, 0.9
VARIANTS = ("hand", "lightning", "lightning_lean")


def sgd(params: Any) -> torch.optim.Optimizer:
    """The CRD benchmark's optimizer (SGD 0.05, momentum 0.9, weight decay 5e-4)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def kd_objective(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """0.1 CE + 0.9 T^2 KL(p_teacher^T || p_student^T) at T = 4 (Hinton et al., 2015), in float32."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, targets)
    kd = F.kl_div(
        F.log_softmax(student_logits / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return CE_WEIGHT * ce + KD_WEIGHT * TEMPERATURE**2 * kd


class BenchModule(DistillationModule):
    """DistillationModule as users get it, plus the benchmark's input layout (``--channels-last``)."""

    def __init__(self, *args: Any, channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels_last = channels_last

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Inputs in channels-last layout when asked (the hand loop does the same)."""
        if self.channels_last:
            inputs, targets = batch
            return inputs.contiguous(memory_format=torch.channels_last), targets
        return batch


class LeanStep(BenchModule):
    """The recommended step: no per-step ``train/acc`` update (construct with ``check_finite=False``)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs every term and the total, as the library's step; no accuracy metric."""
        total, values = self.compute_loss(self.step_outputs(batch))
        for name, value in values.items():
            self.log(f"train/loss_{name}", value.detach())
        self.log("train/loss", total.detach(), prog_bar=True)
        return total


def clocks() -> tuple[float, float]:
    """Wall-clock and process CPU time (all threads), in seconds."""
    return time.perf_counter(), time.process_time()


class StepTimer(pl.Callback):
    """Wall and CPU time from the end of step ``start`` to the end of the last step of ``fit``."""

    def __init__(self, start: int, sync: Callable[[], None]) -> None:
        self.start, self.sync = start, sync
        self.begin = self.end = (0.0, 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Read the clocks after the warm-up and after the last step."""
        step = trainer.global_step  # optimizer steps done, this one included
        if step == self.start:
            self.sync()
            self.begin = clocks()
        elif step >= trainer.max_steps:
            self.sync()
            self.end = clocks()


def step_extras(batch_size: int, device: torch.device, sync: Callable[[], None]) -> dict[str, float]:
    """Microseconds per call of the per-step extras of ``DistillationModule.training_step``.

    ``train/acc`` as the module updates it (``metric(logits, targets)``: ``Metric.forward``,
    i.e. an update plus a batch-value compute that ``on_step=False`` never logs) vs. a plain
    ``metric.update``, and the finiteness check ``bool(torch.isfinite(total))`` (a host-device
    sync on CUDA). Process CPU time on CPU, wall time after ``synchronize`` on CUDA.
    """
    logits = torch.randn(batch_size, 100, device=device)
    targets = torch.randint(0, 100, (batch_size,), device=device)
    total = logits.logsumexp(-1).mean()
    metric = MulticlassAccuracy(num_classes=100, average="micro").to(device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    calls = {
        "train/acc as in the module: metric(logits, targets)": lambda: metric(logits, targets),
        "train/acc alternative: metric.update(logits, targets)": lambda: metric.update(logits, targets),
        "check_finite: bool(torch.isfinite(total))": lambda: bool(torch.isfinite(total)),
    }
    result = {}
    for name, call in calls.items():
        for _ in range(20):
            call()
        rounds = []
        for _ in range(5):
            sync()
            begin = clock()
            for _ in range(500):
                call()
            sync()
            rounds.append((clock() - begin) / 500 * 1e6)
        result[name] = statistics.median(rounds)
    return result


def cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` without end."""
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in NHWC layout")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher (both)")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each block")
    parser.add_argument("--blocks", type=int, default=5, help="rounds of [hand, lightning, lightning_lean]")
    parser.add_argument("--logger", choices=("csv", "none"), default="csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny batch, 2 rounds of 2 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--append", action="store_true", help="add the table to --out instead of replacing it"
    )
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.blocks = 4, 2, 1, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch.")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*validation_step.*|.*log_every_n_steps.*|.*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    pl.seed_everything(args.seed, verbose=False)
    teacher = create_cifar_model(args.teacher, num_classes=100)
    student = create_cifar_model(args.student, num_classes=100)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for model in (teacher, student):
        model.to(device=device, memory_format=memory_format)
        if args.compile:
            model.compile()  # in place: same module, same state-dict keys, same hooks
    batches = 8  # distinct batches, cycled; the data loader is shared by all variants
    data = TensorDataset(
        torch.randn(batches * args.batch_size, 3, 32, 32), torch.randint(0, 100, (batches * args.batch_size,))
    )
    loader = DataLoader(
        data, args.batch_size, shuffle=True, num_workers=0, drop_last=True, pin_memory=device.type == "cuda"
    )
    total_steps = args.blocks * (args.warmup + args.steps)

    modules = {
        "lightning": BenchModule(student, teacher, optimizer=sgd, channels_last=args.channels_last),
        "lightning_lean": LeanStep(
            student, teacher, optimizer=sgd, channels_last=args.channels_last, check_finite=False
        ),
    }
    log_dir = tempfile.mkdtemp(prefix="overhead_")

    def lightning_block(name: str) -> tuple[float, float]:
        timer = StepTimer(args.warmup, sync)
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            precision=args.precision,
            max_steps=args.warmup + args.steps,
            logger=CSVLogger(log_dir, name=name) if args.logger == "csv" else False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
        )
        trainer.fit(modules[name], train_dataloaders=loader)
        return per_step(timer.begin, timer.end)

    optimizer = sgd(student.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    batch_iter = cycle(loader)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext
    )

    def per_step(begin: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
        return (end[0] - begin[0]) / args.steps, (end[1] - begin[1]) / args.steps

    def hand_block() -> tuple[float, float]:
        teacher.eval()
        student.train()
        begin = (0.0, 0.0)
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync()
                begin = clocks()
            inputs, targets = next(batch_iter)
            inputs = inputs.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with autocast():
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                loss = kd_objective(student(inputs), teacher_logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        sync()
        return per_step(begin, clocks())

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for block in range(args.blocks):
        order = VARIANTS[block % 3 :] + VARIANTS[: block % 3]
        for name in order:
            times[name].append(hand_block() if name == "hand" else lightning_block(name))
        done = ", ".join(
            f"{n} {times[n][-1][0] * 1e3:.1f} ms ({times[n][-1][1] * 1e3:.1f} CPU)" for n in VARIANTS
        )
        print(f"round {block + 1}/{args.blocks}: {done}", flush=True)

    table = render(args, times, step_extras(args.batch_size, device, sync))
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        previous = args.out.read_text() + "\n" if args.append and args.out.exists() else ""
        args.out.write_text(previous + table)
        print(f"wrote {args.out}")


def render(
    args: argparse.Namespace, times: dict[str, list[tuple[float, float]]], extras: dict[str, float]
) -> str:
    """Markdown tables: median wall and CPU ms/step, ratios to the hand-written loop; the step's extras."""
    threads = f"torch.get_num_threads() = {torch.get_num_threads()}"
    device = f"{torch.cuda.get_device_name()} ({threads})" if args.device == "cuda" else f"cpu ({threads})"
    lines = [
        f"Time per training step, {args.teacher} -> {args.student}, 100 classes, 32x32 random inputs, "
        f"batch {args.batch_size}; device: {device}; precision {args.precision}"
        f"{', channels-last' if args.channels_last else ''}{', torch.compile' if args.compile else ''}; "
        f"logger: {args.logger}; torch {torch.__version__}, lightning {pl.__version__}. "
        f"Median over {args.blocks} interleaved rounds of {args.steps} steps (after {args.warmup} warm-up "
        "steps each). Wall: time.perf_counter; CPU: time.process_time of the process (all its threads), "
        "which other processes on a shared machine do not inflate (on CUDA it is host time only).",
        "",
        "| variant | wall ms / step | wall ratio to hand | CPU ms / step | CPU ratio to hand "
        "| CPU overhead (ms / step) | wall per round (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    hand_wall = statistics.median(t[0] for t in times["hand"])
    hand_cpu = statistics.median(t[1] for t in times["hand"])
    for name in VARIANTS:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        rounds = ", ".join(f"{t[0] * 1e3:.1f}" for t in times[name])
        lines.append(
            f"| {name} | {wall * 1e3:.1f} | {wall / hand_wall:.3f} | {cpu * 1e3:.1f} | {cpu / hand_cpu:.3f} "
            f"| {(cpu - hand_cpu) * 1e3:+.1f} | {rounds} |"
        )
    lines += ["", f"Per-step extras of the library's training step, batch {args.batch_size}:", ""]
    lines += ["| call | us / step |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in extras.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
