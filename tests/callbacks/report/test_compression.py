"""CompressionReport: MACs and parameters counted by hand; the table file and metrics of a short fit."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_kd import DistillationModule
from lightning_kd.callbacks import CompressionReport
from lightning_kd.callbacks.report import (
    ModelCost,
    checkpoint_bytes,
    compression_table,
    count_macs,
    count_parameters,
    measure,
)
from tests.helpers import NUM_FEATURES, RandomDataModule, make_trainer, small_net


def _conv_net() -> nn.Module:
    # input (1, 2, 10): conv 2->3, k=3, no padding -> (3, 8); flatten 24 -> linear 24->5
    return nn.Sequential(nn.Conv1d(2, 3, kernel_size=3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 5))


def test_macs_by_hand() -> None:
    # conv: 8 positions x 3 out channels x (2 in x 3 taps) = 144; linear: 24 x 5 = 120
    assert count_macs(_conv_net(), torch.randn(1, 2, 10)) == 144 + 120
    # a batch of 4 counts 4 times as much; Linear(7, 6) + Linear(6, 2): 42 + 12 per sample
    mlp = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 2))
    assert count_macs(mlp, torch.randn(4, 7)) == 4 * (42 + 12)


def test_params_by_hand() -> None:
    assert count_parameters(_conv_net()) == (2 * 3 * 3 + 3) + (24 * 5 + 5)
    # BatchNorm: weight and bias are parameters (16 + 16), running stats are buffers (not counted)
    assert count_parameters(small_net(hidden=16)) == (NUM_FEATURES * 16 + 16) + 32 + (16 * 4 + 4)


def test_measure_cuts_to_one_sample_and_times_each_batch_size() -> None:
    net = _conv_net()
    cost = measure(net, torch.randn(3, 2, 10), batch_sizes=(1, 5), repeats=2, warmup=1)
    assert cost.macs == 144 + 120
    assert set(cost.latency_ms) == {1, 5} and all(v > 0 for v in cost.latency_ms.values())
    # float32 weights of 147 + 125 parameters, plus pickling overhead
    assert cost.checkpoint_bytes == checkpoint_bytes(net) > 4 * (147 + 125)
    assert net.training  # the measured model is left as it was


def test_table_ratios() -> None:
    costs = {
        "student": ModelCost(params=1000, macs=500, checkpoint_bytes=2048, latency_ms={1: 0.5}),
        "teacher": ModelCost(params=4000, macs=2500, checkpoint_bytes=8192, latency_ms={1: 2.0}),
    }
    table = compression_table(costs, {"student": 0.9, "teacher": 0.95}, num_threads=2)
    lines = table.splitlines()
    assert lines[0] == "| metric | student | teacher | teacher / student |"
    assert "| parameters | 1 K | 4 K | 4.00x |" in lines
    assert "| MACs / sample | 500 | 2.5 K | 5.00x |" in lines
    assert "| checkpoint | 2 KiB | 8 KiB | 4.00x |" in lines
    assert "| CPU latency, batch 1 | 0.5 ms | 2 ms | 4.00x |" in lines
    assert "| val accuracy | 90.00% | 95.00% | +5.00 pts |" in lines
    assert "2 CPU thread(s)" in table


def _fit(tmp_path: Path, teacher: nn.Module | None) -> tuple[CompressionReport, dict[str, str], pl.Trainer]:
    report = CompressionReport(repeats=2, warmup=1)
    checkpoints = tmp_path / "checkpoints"
    trainer = make_trainer(
        max_steps=2,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=True,
        callbacks=[report, ModelCheckpoint(dirpath=checkpoints)],
    )
    module = DistillationModule(small_net(hidden=8), teacher, num_classes=4)
    trainer.fit(module, datamodule=RandomDataModule(n=32, batch_size=16))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: v for row in rows for k, v in row.items() if k.startswith("compression/") and v}
    return report, logged, trainer


def test_short_fit_with_teacher_writes_file_and_logs(tmp_path: Path) -> None:
    report, logged, trainer = _fit(tmp_path, small_net(hidden=32))
    assert report.path == tmp_path / "checkpoints" / "compression.md"
    assert report.path.read_text().endswith(report.table)
    student, teacher = (100 * float(trainer.callback_metrics[k]) for k in ("val/acc", "val/teacher_acc"))
    assert (
        f"| val accuracy | {student:.2f}% | {teacher:.2f}% | {teacher - student:+.2f} pts |" in report.table
    )
    for model, hidden in (("student", 8), ("teacher", 32)):
        params = (NUM_FEATURES * hidden + hidden) + 2 * hidden + (hidden * 4 + 4)
        assert float(logged[f"compression/{model}_params"]) == params
        assert float(logged[f"compression/{model}_macs"]) == NUM_FEATURES * hidden + hidden * 4
        assert float(logged[f"compression/{model}_checkpoint_bytes"]) > 4 * params
        assert float(logged[f"compression/{model}_latency_ms"]) > 0
        assert float(logged[f"compression/{model}_latency_ms_batch16"]) > 0


def test_short_fit_without_teacher(tmp_path: Path) -> None:
    report, logged, trainer = _fit(tmp_path, None)
    assert set(logged) == {
        f"compression/student_{name}"
        for name in ("params", "macs", "checkpoint_bytes", "latency_ms", "latency_ms_batch16")
    }
    accuracy = 100 * float(trainer.callback_metrics["val/acc"])
    assert "teacher" not in report.table and f"| val accuracy | {accuracy:.2f}% |" in report.table


class KeywordEncoder(nn.Module):
    """Takes ``signal=`` (a dict batch's key, as Hugging Face models take ``input_ids=``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(NUM_FEATURES, width)

    def forward(self, signal: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self.linear(signal)}


def test_dict_batches_are_measured_with_keyword_inputs(tmp_path: Path) -> None:
    from lightning_kd.paradigms.embedding import EmbeddingDistillationModule

    module = EmbeddingDistillationModule(KeywordEncoder(6), KeywordEncoder(6), input_key=["signal"])
    report = CompressionReport(directory=tmp_path, repeats=2, warmup=1)
    make_trainer(max_epochs=1, callbacks=[report]).fit(module, RandomDataModule(as_dict=True))
    for name in ("student", "teacher"):
        assert report.costs[name].params == NUM_FEATURES * 6 + 6
        assert report.costs[name].macs == NUM_FEATURES * 6
    assert (tmp_path / "compression.md").is_file()
