"""CompressionReport: teacher and student side by side in size, compute, latency and accuracy."""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_kd.callbacks.report.io import log_metrics, output_directory
from lightning_kd.hooks import uncompiled
from lightning_kd.model_io import call_model

__all__ = [
    "CompressionReport",
    "ModelCost",
    "checkpoint_bytes",
    "compression_table",
    "count_macs",
    "count_parameters",
    "latency_ms",
    "measure",
]


@dataclass
class ModelCost:
    """What one model costs: parameters, MACs per sample, checkpoint bytes, CPU latency per batch size."""

    params: int
    macs: int
    checkpoint_bytes: int
    latency_ms: dict[int, float] = field(default_factory=dict)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not; buffers excluded), each shared tensor once.

    Args:
        model: any network.
    """
    return sum(p.numel() for p in model.parameters())


def _batch_of(example_input: Any, batch_size: int) -> Any:
    """``example_input`` with every tensor cut or repeated along dim 0 to ``batch_size`` rows."""

    def resize(tensor: Tensor) -> Tensor:
        repeats = -(-batch_size // tensor.shape[0])
        return tensor.repeat(repeats, *[1] * (tensor.dim() - 1))[:batch_size]

    return apply_to_collection(example_input, Tensor, resize)


def _forward(model: nn.Module, example_input: Any) -> Any:
    """Positional arguments for a tuple, keyword arguments for a mapping (dict batches), else one input."""
    return model(*example_input) if isinstance(example_input, tuple) else call_model(model, example_input)


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_input`` (eval mode, ``no_grad``).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per
    multiply-accumulate of matmuls and convolutions (and nothing for elementwise ops, norms,
    pooling); MACs = FLOPs / 2. Pass a batch of one for MACs per sample. A tuple is unpacked
    into positional arguments.

    Args:
        model: the network (left in its training mode afterwards).
        example_input: one input batch (a tensor, a tuple of positional inputs or a mapping).
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            _forward(model, example_input)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def checkpoint_bytes(model: nn.Module) -> int:
    """Size on disk of ``torch.save(model.state_dict())``, written to a temporary file.

    Args:
        model: the network whose state dict is saved.
    """
    handle, path = tempfile.mkstemp(suffix=".pt")
    os.close(handle)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)
    finally:
        os.remove(path)


@torch.no_grad()
def latency_ms(model: nn.Module, example_input: Any, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time in milliseconds of ``repeats`` forward passes, after ``warmup`` untimed ones.

    Runs as given (device, mode); :func:`measure` runs it on a CPU copy in eval mode.

    Args:
        model: the network, run as it is.
        example_input: one input batch.
        repeats: timed forward passes (>= 1).
        warmup: untimed forward passes before them (>= 0).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"latency_ms needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}."
        )
    for _ in range(warmup):
        _forward(model, example_input)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _forward(model, example_input)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(
    model: nn.Module,
    example_input: Any,
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 10,
    warmup: int = 3,
) -> ModelCost:
    """Parameters, MACs per sample, checkpoint bytes and CPU latency of ``model``.

    ``example_input`` is one input batch (a tensor or a collection of tensors, batch on dim 0);
    it is cut to one sample for the MACs and cut or repeated to each of ``batch_sizes`` for the
    latency, measured on a CPU copy of ``model`` in eval mode under ``no_grad`` with
    ``torch.get_num_threads()`` threads (see :func:`latency_ms`). ``model`` itself is not changed.

    Args:
        model: the network (not changed; a compiled one is measured uncompiled).
        example_input: one input batch.
        batch_sizes: batch sizes of the latency.
        repeats: timed forward passes per latency.
        warmup: untimed forward passes before them.
    """
    model = uncompiled(model)
    cpu_model = copy.deepcopy(model).cpu().eval()
    cpu_input = move_data_to_device(example_input, "cpu")
    return ModelCost(
        params=count_parameters(model),
        macs=count_macs(cpu_model, _batch_of(cpu_input, 1)),
        checkpoint_bytes=checkpoint_bytes(model),
        latency_ms={
            size: latency_ms(cpu_model, _batch_of(cpu_input, size), repeats, warmup) for size in batch_sizes
        },
    )


def _human(number: float, units: Sequence[str], base: float = 1000.0) -> str:
    for unit in units[:-1]:
        if abs(number) < base:
            return f"{number:.3g} {unit}".rstrip()
        number /= base
    return f"{number:.3g} {units[-1]}"


def compression_table(
    costs: Mapping[str, ModelCost],
    accuracy: Mapping[str, float | None] | None = None,
    num_threads: int | None = None,
) -> str:
    """A Markdown table with one column per model and, beside the first, a ratio column per other model.

    Rows: parameters, MACs per sample (FLOPs / 2 of matmuls and convolutions, FlopCounterMode),
    checkpoint size (``torch.save`` of the state dict), median CPU latency per batch size, and
    validation accuracy where given. The ratio is ``other / first`` (e.g. teacher / student:
    how many times smaller the student is). A note under the table gives ``num_threads``.

    Args:
        costs: what each model costs, by name; the first is the reference of the ratios.
        accuracy: validation accuracy per name (a fraction, or ``None``), or ``None`` for no row.
        num_threads: CPU threads of the latency, for the note under the table.
    """
    if not costs:
        raise ValueError("compression_table needs at least one model in `costs`.")
    names = list(costs)
    first = costs[names[0]]
    header = ["metric", *names] + [f"{name} / {names[0]}" for name in names[1:]]

    def row(label: str, values: list[float | None], fmt: Any) -> list[str]:
        cells = [fmt(v) if v is not None else "-" for v in values]
        ratios = [
            f"{v / values[0]:.2f}x" if v is not None and values[0] not in (None, 0) else "-"
            for v in values[1:]
        ]
        return [label, *cells, *ratios]

    rows = [
        row("parameters", [c.params for c in costs.values()], lambda v: _human(v, ["", "K", "M", "G"])),
        row("MACs / sample", [c.macs for c in costs.values()], lambda v: _human(v, ["", "K", "M", "G", "T"])),
        row(
            "checkpoint",
            [c.checkpoint_bytes for c in costs.values()],
            lambda v: _human(v, ["B", "KiB", "MiB", "GiB"], 1024.0),
        ),
    ]
    for size in first.latency_ms:
        values = [c.latency_ms.get(size) for c in costs.values()]
        rows.append(row(f"CPU latency, batch {size}", values, lambda v: f"{v:.3g} ms"))
    if accuracy is not None:
        values = [accuracy.get(name) for name in names]
        cells = [f"{100 * v:.2f}%" if v is not None else "-" for v in values]
        diffs = [
            f"{100 * (v - values[0]):+.2f} pts" if v is not None and values[0] is not None else "-"
            for v in values[1:]
        ]
        rows.append(["val accuracy", *cells, *diffs])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    note = "MACs = FLOPs / 2 of matmuls and convolutions (torch.utils.flop_counter); latency: CPU median"
    if num_threads is not None:
        note += f", {num_threads} CPU thread(s)"
    return "\n".join(lines) + f"\n\n{note}.\n"


class CompressionReport(pl.Callback):
    """At the end of fit, teacher and student side by side: size, compute, CPU latency, accuracy.

    Knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015)
    is model compression; this reports what was compressed. For a
    :class:`~lightning_kd.DistillationModule` (with or without a teacher), on global rank 0:
    one input batch is taken from the validation loader (else the training loader) and
    :func:`measure` is run on the student and the teacher (its own inputs with
    ``teacher_input_key``). Logged through every logger's ``log_metrics``:
    ``compression/<model>_params``, ``_macs`` (per sample, FLOPs / 2), ``_checkpoint_bytes``
    (state dict via ``torch.save``) and ``_latency_ms`` (CPU, median, at batch size 1 and also
    ``_latency_ms_batch<n>`` at the loader's batch size ``n``). The accuracies are
    ``val/acc`` and ``val/teacher_acc`` from ``trainer.callback_metrics``. The Markdown table
    (:func:`compression_table`) is kept in :attr:`table` and written to ``compression.md`` in
    ``directory`` (default: the checkpoint directory, else the log directory); :attr:`path` is the file.

    Args:
        directory: where ``compression.md`` goes.
        repeats: timed forward passes per latency (the median is reported).
        warmup: untimed forward passes before them.
    """

    def __init__(self, directory: str | Path | None = None, repeats: int = 10, warmup: int = 3) -> None:
        super().__init__()
        self.directory = Path(directory) if directory is not None else None
        self.repeats = repeats
        self.warmup = warmup
        self.table: str | None = None
        self.path: Path | None = None
        self.costs: dict[str, ModelCost] = {}

    @staticmethod
    def _example_batch(trainer: pl.Trainer) -> Any:
        for loader in (trainer.val_dataloaders, trainer.train_dataloader):
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if loader is not None:
                return next(iter(loader), None)
        return None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure student and teacher, log the numbers, write and keep the table."""
        if not trainer.is_global_zero:
            return
        if not (hasattr(pl_module, "student") and hasattr(pl_module, "unpack_batch")):
            rank_zero_warn(
                "CompressionReport needs a DistillationModule (student, teacher); no report is made."
            )
            return
        batch = self._example_batch(trainer)
        if batch is None:
            rank_zero_warn(
                "CompressionReport needs validation or training data for a probe input; no report."
            )
            return
        inputs, _ = pl_module.unpack_batch(batch)
        batch_size = _first_dim(inputs)
        sizes = sorted({1, batch_size})
        models: dict[str, tuple[nn.Module, Any]] = {"student": (pl_module.student, inputs)}
        if getattr(pl_module, "teacher", None) is not None:
            models["teacher"] = (pl_module.teacher, pl_module.teacher_inputs(batch, inputs))
        self.costs = {
            name: measure(model, example, sizes, self.repeats, self.warmup)
            for name, (model, example) in models.items()
        }
        metrics = trainer.callback_metrics
        accuracy = {
            name: float(metrics[key]) if key in metrics else None
            for name, key in (("student", "val/acc"), ("teacher", "val/teacher_acc"))
            if name in models
        }
        logged: dict[str, float] = {}
        for name, cost in self.costs.items():
            logged[f"compression/{name}_params"] = float(cost.params)
            logged[f"compression/{name}_macs"] = float(cost.macs)
            logged[f"compression/{name}_checkpoint_bytes"] = float(cost.checkpoint_bytes)
            logged[f"compression/{name}_latency_ms"] = cost.latency_ms[1]
            if batch_size != 1:
                logged[f"compression/{name}_latency_ms_batch{batch_size}"] = cost.latency_ms[batch_size]
        log_metrics(trainer, logged)
        self.table = compression_table(self.costs, accuracy, torch.get_num_threads())
        self.path = output_directory(trainer, self.directory) / "compression.md"
        self.path.write_text("# Compression report\n\n" + self.table)


def _first_dim(inputs: Any) -> int:
    """The batch size of a collection of tensors: dim 0 of its first tensor."""
    found: list[int] = []
    apply_to_collection(inputs, Tensor, lambda t: found.append(t.shape[0]))
    if not found:
        raise ValueError("CompressionReport found no tensor in the batch inputs to measure with.")
    return found[0]
