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
import copy
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset, default_collate

from lightning_kd import DistillationModule, TeacherOutputCache
from lightning_kd.data import WithIndex
from lightning_kd.losses import CrossEntropyTerm, FitNetTerm, KDTerm
from lightning_kd.models import MLP, create_cifar_model
from lightning_kd.paradigms import MutualLearningModule


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


RESULTS = Path(__file__).parent / "results" / "step_overhead.md"
TEMPERATURE, CE_WEIGHT, KD_WEIGHT, LR = 4.0, 0.1, 0.9, 1e-3
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


@dataclass
class Workload:
    """A student/teacher pair, its input shape and the layers of the FitNet variant."""

    name: str
    describe: str
    student: Callable[[], nn.Module]
    teacher: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    fitnet_layers: tuple[str, str]


WORKLOADS = {
    "small": Workload(
        "small",
        "MLP 40-256-256-10 student, MLP 40-512-512-10 teacher, 40 random features, 10 classes",
        lambda: MLP(40, 10, (256, 256)),
        lambda: MLP(40, 10, (512, 512)),
        (40,),
        10,
        128,
        ("features.4", "features.4"),  # the last hidden ReLU of each
    ),
    "mid": Workload(
        "mid",
        "resnet32x4 -> resnet8x4, 100 classes, 3x32x32 random inputs",
        lambda: create_cifar_model("resnet8x4", num_classes=100),
        lambda: create_cifar_model("resnet32x4", num_classes=100),
        (3, 32, 32),
        100,
        16,
        ("layer2", "layer2"),  # the CIFAR-100 FitNet recipe's hint layer
    ),
}


@dataclass
class Setting:
    """What every variant of one workload shares: device, data, initial weights, block lengths."""

    workload: Workload
    device: torch.device
    precision: str
    channels_last: bool
    batch_size: int
    warmup: int
    steps: int
    logger: str
    compile_backend: str
    log_dir: str
    dataset: Dataset = field(init=False)
    student: nn.Module = field(init=False)
    teacher: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        samples = (self.warmup + self.steps) * self.batch_size  # one epoch per block
        self.dataset = TensorDataset(
            torch.randn(samples, *self.workload.input_shape),
            torch.randint(0, self.workload.num_classes, (samples,)),
        )
        self.student, self.teacher = self.workload.student(), self.workload.teacher()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def models(self) -> tuple[nn.Module, nn.Module]:
        """Fresh copies of the initial student and teacher, on the device, in the chosen layout."""
        return tuple(
            copy.deepcopy(m).to(device=self.device, memory_format=self.memory_format)
            for m in (self.student, self.teacher)
        )

    def collate(self, samples: list[Any]) -> Any:
        """The default collation, inputs in channels-last layout when asked (kept by ``.to(device)``)."""
        batch = default_collate(samples)
        if self.channels_last:
            batch[0] = batch[0].contiguous(memory_format=torch.channels_last)
        return batch

    def loader(self, dataset: Dataset | None = None) -> DataLoader:
        """A shuffling loader over ``dataset`` (default: the benchmark's), one block's batches long."""
        return DataLoader(
            dataset if dataset is not None else self.dataset,
            self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=0,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        inputs = inputs.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return inputs, targets.to(self.device, non_blocking=True)


def kd_objective(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """0.1 CE + 0.9 T^2 KL(p_teacher^T || p_student^T) at T = 4 (Hinton et al., 2015), in float32."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    kd = F.kl_div(
        F.log_softmax(student_logits / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return CE_WEIGHT * F.cross_entropy(student_logits, targets) + KD_WEIGHT * TEMPERATURE**2 * kd


def mutual_objective(logits: list[Tensor], targets: Tensor) -> Tensor:
    """Deep mutual learning at T = 1 (Zhang et al., 2018): per peer CE + mean KL to the detached others."""
    total = logits[0].new_zeros(())
    for k, own in enumerate(logits):
        own = own.float()
        mimicry = sum(
            F.kl_div(
                F.log_softmax(own, dim=-1),
                F.log_softmax(other.detach().float(), dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            for j, other in enumerate(logits)
            if j != k
        )
        total = total + F.cross_entropy(own, targets) + mimicry / (len(logits) - 1)
    return total


Timing = tuple[float, float]  # wall and CPU seconds per step


class Variant:
    """One way of running the training step; :meth:`run` returns the per-step times of one block."""

    def prepare(self) -> None:
        """Untimed work before the first block (the cache variant fills its cache)."""

    def run(self, warmup: int, steps: int) -> Timing:
        raise NotImplementedError


class HandLoop(Variant):
    """The hand-written KD loop (``compiled``: student forward and loss under one ``torch.compile``;
    ``fused``: Adam's fused kernel, the module's default optimizer)."""

    def __init__(self, setting: Setting, compiled: bool = False, fused: bool = False) -> None:
        self.setting = setting
        self.student, self.teacher = setting.models()
        self.teacher.eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=LR, fused=fused or None)
        student = self.student

        def student_loss(inputs: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
            return kd_objective(student(inputs), teacher_logits, targets)

        self.student_loss = (
            torch.compile(student_loss, backend=setting.compile_backend) if compiled else student_loss
        )

    def run(self, warmup: int, steps: int) -> Timing:
        s = self.setting
        self.student.train()
        batches = iter(s.loader())
        begin = clocks()
        for step in range(warmup + steps):
            if step == warmup:
                s.sync()
                begin = clocks()
            inputs, targets = s.to_device(*next(batches))
            with s.autocast():
                with torch.no_grad():
                    teacher_logits = self.teacher(inputs)
                loss = self.student_loss(inputs, teacher_logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        s.sync()
        return per_step(begin, clocks(), steps)


class HandMutual(Variant):
    """Deep mutual learning of the student and the teacher network by hand, one Adam over both."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.peers = nn.ModuleList(setting.models())
        self.optimizer = torch.optim.Adam(self.peers.parameters(), lr=LR)

    def run(self, warmup: int, steps: int) -> Timing:
        s = self.setting
        self.peers.train()
        batches = iter(s.loader())
        begin = clocks()
        for step in range(warmup + steps):
            if step == warmup:
                s.sync()
                begin = clocks()
            inputs, targets = s.to_device(*next(batches))
            with s.autocast():
                loss = mutual_objective([peer(inputs) for peer in self.peers], targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        s.sync()
        return per_step(begin, clocks(), steps)


class TorchdistillBox(Variant):
    """torchdistill's ``DistillationBox`` with its ``KDLoss``, stepped as in its examples."""

    def __init__(self, setting: Setting, compiled: bool = False) -> None:
        try:
            from torchdistill.core.distillation import get_distillation_box
        except Exception as error:  # absent, or built for another torch
            raise ImportError(f"torchdistill does not import here ({error})") from error

        self.setting = setting
        student, teacher = setting.models()
        if compiled:
            student.compile(backend=setting.compile_backend)
        teacher.eval()  # the box switches only the student to train mode
        config = {
            "num_epochs": 1_000_000,
            "train_data_loader": {
                "dataset_id": "train",
                "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                "kwargs": {
                    "batch_size": setting.batch_size,
                    "num_workers": 0,
                    "drop_last": True,
                    "pin_memory": setting.device.type == "cuda",
                },
            },
            "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
            "student": {"forward_proc": "forward_batch_only"},
            "optimizer": {"key": "Adam", "kwargs": {"lr": LR}},
            "criterion": {
                "key": "WeightedSumLoss",
                "kwargs": {
                    "sub_terms": {
                        "kd": {
                            "criterion": {
                                "key": "KDLoss",
                                "kwargs": {
                                    "student_module_path": ".",
                                    "student_module_io": "output",
                                    "teacher_module_path": ".",
                                    "teacher_module_io": "output",
                                    "temperature": TEMPERATURE,
                                    "alpha": CE_WEIGHT,
                                    "reduction": "batchmean",
                                },
                            },
                            "weight": 1.0,
                        }
                    }
                },
            },
        }
        self.box = get_distillation_box(
            teacher,
            student,
            {"train": setting.dataset},
            config,
            device=setting.device,
            device_ids=None,
            distributed=False,
            lr_factor=1,
        )
        self.epoch = 0

    def run(self, warmup: int, steps: int) -> Timing:
        s, box = self.setting, self.box
        box.pre_epoch_process(epoch=self.epoch)
        self.epoch += 1
        batches = iter(box.train_data_loader)
        begin = clocks()
        for step in range(warmup + steps):
            if step == warmup:
                s.sync()
                begin = clocks()
            inputs, targets, supp_dict = next(batches)
            inputs, targets = s.to_device(inputs, targets)
            with s.autocast():
                loss = box.forward_process(inputs, targets, supp_dict)
            box.post_forward_process(loss=loss)
        s.sync()
        return per_step(begin, clocks(), steps)


class BareKD(pl.LightningModule):
    """The same KD step as a plain ``LightningModule``, with ``log_calls`` (0, 1 or 3) ``self.log`` calls."""

    def __init__(self, student: nn.Module, teacher: nn.Module, log_calls: int) -> None:
        super().__init__()
        self.student, self.teacher, self.log_calls = student, teacher.requires_grad_(False), log_calls

    def train(self, mode: bool = True) -> BareKD:
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch[0], batch[1]
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        total = kd_objective(self.student(inputs), teacher_logits, targets)
        if self.log_calls >= 1:
            self.log("train/loss", total.detach(), prog_bar=True)
        if self.log_calls >= 3:  # two more scalars, as the per-term losses would be
            self.log("train/loss_a", total.detach())
            self.log("train/loss_b", total.detach())
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=LR)


class LayoutCheck(pl.Callback):
    """Stops a channels-last run whose first batch reached the device in another layout."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and not batch[0].is_contiguous(memory_format=torch.channels_last):
            raise RuntimeError("--channels-last: the batch reached the device in another memory layout.")


class LightningFit(Variant):
    """A LightningModule trained by a fresh ``Trainer.fit`` of ``warmup + steps`` steps per block."""

    def __init__(
        self,
        setting: Setting,
        name: str,
        module: pl.LightningModule,
        progress_bar: bool = False,
        log_every_n_steps: int = 50,
        dataset: Dataset | None = None,
        prefill: bool = False,
    ) -> None:
        self.setting, self.name, self.module = setting, name, module
        self.progress_bar, self.log_every_n_steps = progress_bar, log_every_n_steps
        self.dataset, self.prefill = dataset, prefill
        self.callbacks: list[pl.Callback] = [LayoutCheck()] if setting.channels_last else []

    def prepare(self) -> None:
        """With ``prefill``: one untimed epoch, so that a teacher cache holds every sample."""
        if self.prefill:
            s = self.setting
            self.fit(s.warmup + s.steps, [])

    def fit(self, max_steps: int, callbacks: list[pl.Callback]) -> None:
        s = self.setting
        trainer = pl.Trainer(
            accelerator=s.device.type,
            devices=1,
            precision=s.precision,
            max_steps=max_steps,
            logger=CSVLogger(s.log_dir, name=self.name) if s.logger == "csv" else False,
            log_every_n_steps=self.log_every_n_steps,
            enable_progress_bar=self.progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[*self.callbacks, *callbacks],
        )
        trainer.fit(self.module, train_dataloaders=s.loader(self.dataset))

    def run(self, warmup: int, steps: int) -> Timing:
        timer = StepTimer(warmup, self.setting.sync)
        self.fit(warmup + steps, [timer])
        return per_step(timer.begin, timer.end, steps)


def per_step(begin: Timing, end: Timing, steps: int) -> Timing:
    return (end[0] - begin[0]) / steps, (end[1] - begin[1]) / steps


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
