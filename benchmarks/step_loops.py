"""The loops that ``step_overhead.py`` times: hand-written, torchdistill's, bare Lightning and lightning_kd's.

Each :class:`Variant` runs blocks of training steps of one :class:`Workload` under one
:class:`Setting` and returns its wall and CPU seconds per step (see ``step_overhead.py``'s docstring
for what each variant is and how the table is made).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset, default_collate

from lightning_kd.models import MLP, create_cifar_model

TEMPERATURE, CE_WEIGHT, KD_WEIGHT, LR = 4.0, 0.1, 0.9, 1e-3


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
