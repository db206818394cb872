"""Time per training step: hand-written PyTorch, torchdistill, bare Lightning and lightning_kd, side by side.

    pip install --no-deps --target /tmp/tdsite torchdistill==1.1.5   # torchdistill beside this environment
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/step_overhead.py --torchdistill-path /tmp/tdsite
    python benchmarks/step_overhead.py --quick                       # a smoke run, writes nothing
    python benchmarks/step_overhead.py --device cuda --precision bf16-mixed --channels-last  # GPU

Workloads (``--workload``), random inputs and labels, the same data for every variant:

- ``small``: MLP 40-256-256-10 student, MLP 40-512-512-10 teacher, batch 128: framework cost shows.
- ``mid``: ``resnet32x4`` -> ``resnet8x4`` (the CRD benchmark's pair), 100 classes, 32x32, batch 16
  on the CPU (``--batch-size`` to change); ``--channels-last`` applies to it (models and inputs).

Loss everywhere 0.1 CE + 0.9 T^2 KL at T = 4 (Hinton et al., 2015), the teacher in eval mode under
``no_grad``; Adam, lr 1e-3. Variants (``--variants``; ratios are to ``hand``, mutual learning's to
``hand_mutual``):

- ``hand``: teacher forward, student forward, loss, ``zero_grad``, backward, ``step``;
  ``hand+compile``: the same with the student's forward and the loss in one ``torch.compile``;
  ``hand+fused``: with Adam's fused kernel (``fused=True``), the module's default optimizer.
- ``torchdistill``: torchdistill's ``DistillationBox`` (``get_distillation_box``, its ``KDLoss``
  with alpha 0.1) stepped as its examples do: ``forward_process`` + ``post_forward_process``
  (backward, optimizer step) per batch of its own data loader, without the examples' per-step
  ``MetricLogger`` (a ``loss.item()``). In this process when ``torchdistill`` imports (see
  ``--torchdistill-path``); else left out, and the table says so. ``torchdistill+compile``: its
  student compiled in place (not in the CPU defaults).
- ``bare``, ``bare+log1``, ``bare+log3``: a ``LightningModule`` whose ``training_step`` computes the
  same loss, with 0, 1 or 3 ``self.log`` calls per step.
- ``ours``: ``DistillationModule(student, teacher)`` with its defaults (the same loss, Adam 1e-3,
  per-epoch cosine decay) under Lightning's default ``log_every_n_steps=50``; ``ours@log10`` with
  ``log_every_n_steps=10``; ``ours+bar`` with the progress bar on (what ``Trainer()`` gives);
  ``ours+fitnet``: plus a FitNet term (Romero et al., 2015) on a hidden layer (weight 100);
  ``ours+cache``: with an in-memory ``TeacherOutputCache`` filled by an untimed epoch before the
  rounds (batches carry their indices); ``ours+compile``: ``compile=True`` (the teacher forward,
  student forward and loss terms as one compiled function); ``ours+student.compile``: only the
  student compiled in place (``student.compile()``; the loss terms run eagerly).
  ``ours`` and its variants use the module's defaults: Adam's fused kernel and the cosine decay
  of the learning rate stepped per optimizer step (the other loops keep a constant rate).
- ``hand_mutual`` / ``mutual``: deep mutual learning of the two networks (both trained; CE + KL
  at T = 1 each, the other's logits detached) by hand and by ``MutualLearningModule``.

Lightning variants run in a fresh ``Trainer.fit`` per block, progress bar (but for ``ours+bar``),
model summary, checkpointing and validation off, a ``CSVLogger`` (``--logger none``: ``logger=False``);
a callback times from the end of the last warm-up step to the end of the last step. Every variant
has its own copies of the same initial weights and is run once untimed first (compilation, optimizer
state). Then ``--rounds`` rounds run every variant once (order rotated each round), each block
``--warmup`` untimed and ``--steps`` timed steps, all in ONE process; a block's steps are one epoch
of the loader, so epoch-end work is outside the timing. The table gives medians over rounds of wall
(``time.perf_counter``) and CPU (``time.process_time``, all threads of the process: not inflated by
other processes on a shared machine) time per step. On CUDA the clocks are read after
``torch.cuda.synchronize()``. Writes ``benchmarks/results/step_overhead.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_kd import DistillationModule, TeacherOutputCache
from lightning_kd.data import WithIndex
from lightning_kd.losses import CrossEntropyTerm, FitNetTerm, KDTerm
from lightning_kd.paradigms import MutualLearningModule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_loops.py beside it
from step_loops import (  # noqa: E402
    CE_WEIGHT,
    KD_WEIGHT,
    TEMPERATURE,
    WORKLOADS,
    BareKD,
    HandLoop,
    HandMutual,
    LightningFit,
    Setting,
    Timing,
    TorchdistillBox,
    Variant,
)

RESULTS = Path(__file__).parent / "results" / "step_overhead.md"
ALL_VARIANTS = (
    "hand",
    "hand+fused",
    "hand+compile",
    "torchdistill",
    "torchdistill+compile",
    "bare",
    "bare+log1",
    "bare+log3",
    "ours",
    "ours+bar",
    "ours@log10",
    "ours+fitnet",
    "ours+cache",
    "ours+compile",
    "ours+student.compile",
    "hand_mutual",
    "mutual",
)
DEFAULT_VARIANTS = {
    "small": tuple(name for name in ALL_VARIANTS if name != "torchdistill+compile"),
    "mid": (
        "hand",
        "hand+fused",
        "hand+compile",
        "torchdistill",
        "bare",
        "bare+log3",
        "ours",
        "ours@log10",
        "ours+fitnet",
        "ours+cache",
        "ours+compile",
        "ours+student.compile",
    ),
}
BASELINE = {"hand_mutual": "hand_mutual", "mutual": "hand_mutual"}  # every other variant: "hand"


def build(name: str, s: Setting) -> Variant:
    """The variant called ``name`` (see the module docstring), set up and ready to run."""
    if name in ("hand", "hand+fused", "hand+compile"):
        return HandLoop(s, compiled=name == "hand+compile", fused=name == "hand+fused")
    if name == "hand_mutual":
        return HandMutual(s)
    if name in ("torchdistill", "torchdistill+compile"):
        return TorchdistillBox(s, compiled=name == "torchdistill+compile")
    if name.startswith("bare"):
        log_calls = 0 if name == "bare" else int(name.removeprefix("bare+log"))
        return LightningFit(s, name, BareKD(*s.models(), log_calls=log_calls))
    if name == "mutual":
        return LightningFit(s, name, MutualLearningModule(list(s.models())))
    student, teacher = s.models()
    if name in ("ours", "ours+bar", "ours@log10"):
        module = DistillationModule(student, teacher)
        log_every = 10 if name == "ours@log10" else 50
        return LightningFit(s, name, module, progress_bar=name == "ours+bar", log_every_n_steps=log_every)
    if name == "ours+fitnet":
        terms = [
            CrossEntropyTerm("ce", weight=CE_WEIGHT),
            KDTerm("kd", weight=KD_WEIGHT, temperature=TEMPERATURE),
            FitNetTerm(*s.workload.fitnet_layers),
        ]
        return LightningFit(s, name, DistillationModule(student, teacher, losses=terms))
    if name == "ours+cache":
        module = DistillationModule(student, teacher, teacher_cache=TeacherOutputCache(None))
        return LightningFit(s, name, module, dataset=WithIndex(s.dataset), prefill=True)
    if name == "ours+compile":  # teacher, student and loss terms compiled as one step
        module = DistillationModule(student, teacher, compile={"backend": s.compile_backend})
        return LightningFit(s, name, module)
    if name == "ours+student.compile":
        student.compile(backend=s.compile_backend)  # in place: same module, same parameter names
        return LightningFit(s, name, DistillationModule(student, teacher))
    raise ValueError(f"Unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}.")


def run_workload(
    s: Setting,
    names: list[str],
    rounds: int,
    loads: list[float],
    after_round: Callable[[dict[str, list[Timing]], dict[str, str], int], None],
) -> tuple[dict[str, list[Timing]], dict[str, str]]:
    """Set up every variant, run each once untimed, then ``rounds`` interleaved rounds.

    ``after_round(times, skipped, rounds_done)`` runs after every round (the table so far is written,
    so that a run stopped by a time limit keeps its finished rounds).
    """
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            variants[name] = build(name, s)
        except ImportError as error:  # torchdistill not installed here
            skipped[name] = f"{type(error).__name__}: {error}"
            print(f"{s.workload.name}: {name} left out ({skipped[name]})", flush=True)
    for name, variant in variants.items():
        started = time.perf_counter()
        variant.prepare()
        variant.run(s.warmup, 1)
        print(f"{s.workload.name}: {name} ready ({time.perf_counter() - started:.1f} s)", flush=True)
    times: dict[str, list[Timing]] = {name: [] for name in variants}
    order = list(variants)
    for index in range(rounds):
        loads.append(os.getloadavg()[0])
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            times[name].append(variants[name].run(s.warmup, s.steps))
        done = ", ".join(f"{n} {times[n][-1][1] * 1e3:.2f}" for n in order)
        print(f"{s.workload.name} round {index + 1}/{rounds} (CPU ms/step): {done}", flush=True)
        after_round(times, skipped, index + 1)
    return times, skipped


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def render_table(
    s: Setting, times: dict[str, list[Timing]], skipped: dict[str, str], done: int, rounds: int
) -> str:
    """One markdown table: medians and best rounds, ratios to the variant's baseline and to torchdistill.

    The best (smallest) round is the least disturbed by other processes: on a busy virtual machine
    even CPU time grows when the host deschedules the guest.
    """
    median = {n: tuple(statistics.median(t[i] for t in ts) for i in (0, 1)) for n, ts in times.items()}
    best = {n: min(t[1] for t in ts) for n, ts in times.items()}
    td = median.get("torchdistill")
    lines = [
        f"### {s.workload.name}: {s.workload.describe}, batch {s.batch_size}",
        "",
        f"Device {s.device.type}, precision {s.precision}"
        f"{', channels-last' if s.channels_last else ''}; {done} interleaved rounds"
        f"{'' if done == rounds else f' (of {rounds} asked: the run stopped early)'} of {s.steps} timed "
        f"steps (after {s.warmup} untimed) per variant; logger: {s.logger}; compile backend "
        f"{s.compile_backend}.",
        "",
        "| variant | wall ms / step | CPU ms / step | CPU ratio to hand | wall ratio to hand "
        "| CPU ratio to torchdistill | best round: CPU ms / step | best round: CPU ratio to hand "
        "| CPU ms / step per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (wall, cpu) in median.items():
        baseline = BASELINE.get(name, "hand")
        base = median.get(baseline)
        rounds_cpu = ", ".join(f"{t[1] * 1e3:.2f}" for t in times[name])
        to_td = ratio(cpu, td[1]) if td and name not in BASELINE else "-"
        lines.append(
            f"| {name} | {wall * 1e3:.2f} | {cpu * 1e3:.2f} | {ratio(cpu, base and base[1])} "
            f"| {ratio(wall, base and base[0])} | {to_td} | {best[name] * 1e3:.2f} "
            f"| {ratio(best[name], best.get(baseline))} | {rounds_cpu} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {name} | left out: {why} | | | | | | | |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU model (and GPU, if any), the thread count torch uses and the number of cores."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def versions() -> str:
    td = sys.modules.get("torchdistill")
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {pl.__version__}, "
        f"torchdistill {getattr(td, '__version__', 'not imported')}"
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Without Lightning's and torchdistill's info messages and the warnings this set-up expects."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "torchdistill")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*|.*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*validation_step.*|.*log_every_n_steps.*|.*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*max_epochs.*|.*in eval mode at the start.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def run(args: argparse.Namespace, argv: list[str]) -> str:
    """Every workload's table under one header (machine, versions, load); ``--out`` after every round."""
    command = "python " + " ".join(["benchmarks/step_overhead.py", *argv])
    started = datetime.datetime.now(datetime.timezone.utc)
    loads: list[float] = []
    sections: list[str] = []

    def document(tables: list[str]) -> str:
        now = [*loads, os.getloadavg()[0]]
        header = [
            "Time per training step: a hand-written PyTorch loop, torchdistill's DistillationBox, a bare "
            "LightningModule and lightning_kd, in one process (`benchmarks/step_overhead.py`; see its "
            "docstring for the variants). CPU time (`time.process_time`) is the number to read on a "
            "shared machine; ratios are of medians over rounds, and of the best rounds.",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine()}. {versions()}. Started {started:%Y-%m-%d %H:%M} UTC; 1-minute load "
            f"average at each round's start and at the end {min(now):.2f} to {max(now):.2f} "
            f"(median {statistics.median(now):.2f}).",
            "",
        ]
        return "\n".join(header) + "\n" + "\n".join(tables)

    with tempfile.TemporaryDirectory(prefix="step_overhead_") as log_dir:
        for workload_name in args.workload:
            workload = WORKLOADS[workload_name]
            small = workload_name == "small"
            setting = Setting(
                workload,
                torch.device(args.device),
                args.precision,
                args.channels_last and not small,
                2 if args.quick else args.batch_size or workload.batch_size,
                1 if args.quick else args.warmup or (10 if small else 2),
                2 if args.quick else args.steps or (100 if small else 5),
                args.logger,
                "eager" if args.quick else args.compile_backend,
                log_dir,
            )
            names = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS[workload_name])
            rounds = 1 if args.quick else args.rounds

            def write_so_far(
                times: dict[str, list[Timing]],
                skipped: dict[str, str],
                done: int,
                setting: Setting = setting,
                rounds: int = rounds,
            ) -> None:
                if not args.quick:
                    table = render_table(setting, times, skipped, done, rounds)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(document([*sections, table]))

            times, skipped = run_workload(setting, names, rounds, loads, write_so_far)
            sections.append(render_table(setting, times, skipped, rounds, rounds))
    return document(sections)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; return the markdown written (or, with ``--quick``, printed only)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["small", "mid"])
    parser.add_argument("--variants", default=None, help="comma-separated; default: the workload's list")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--channels-last", action="store_true", help="CNN models and inputs in NHWC")
    parser.add_argument("--compile-backend", default="inductor", help="for the +compile variants")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the workload's")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (small 100, mid 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per block (small 10, mid 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logger", choices=("csv", "none"), default="csv")
    parser.add_argument(
        "--torchdistill-path", default=None, help="a folder holding the torchdistill package (pip --target)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch.")
    if args.torchdistill_path:
        sys.path.append(args.torchdistill_path)  # after this environment's torch and numpy
    with contextlib.suppress(Exception):  # absent, or built for another torch: its rows say so
        import torchdistill  # noqa: F401  (its version goes into the table)
    with quiet():
        text = run(args, argv if argv is not None else sys.argv[1:])
    print(text)
    if not args.quick:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
