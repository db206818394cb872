"""DistillationReport: reliability bins, ECE, PNG files beside the checkpoints, logged metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_kd import DistillationModule
from lightning_kd.callbacks import DistillationReport
from lightning_kd.callbacks.report import reliability_bins
from tests.helpers import RandomDataModule, make_trainer, small_net


def test_reliability_bins_by_hand() -> None:
    # top-1 confidences 0.9 (correct), 0.8 (wrong), 0.55 (correct), 0.6 (correct); 2 bins: (0, .5], (.5, 1]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.4, 0.6]])
    targets = torch.tensor([0, 0, 0, 1])
    confidence, accuracy, counts = reliability_bins(probs, targets, num_bins=2)
    assert counts.tolist() == [0.0, 4.0]
    assert torch.isnan(confidence[0]) and torch.isnan(accuracy[0])
    torch.testing.assert_close(confidence[1], torch.tensor((0.9 + 0.8 + 0.55 + 0.6) / 4))
    torch.testing.assert_close(accuracy[1], torch.tensor(0.75))


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_report_saves_plots_beside_checkpoints_and_logs_ece(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DistillationModule(small_net(), small_net(hidden=32))
    report = DistillationReport(num_bins=5)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", filename="kd", enable_version_counter=False
    )
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(
        max_epochs=2, logger=logger, callbacks=[checkpoint, report], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=RandomDataModule())
    assert sorted(p.name for p in report.files) == ["per_class_accuracy.png", "reliability.png"]
    for path in report.files:
        assert path.parent == tmp_path / "checkpoints"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoints" / "kd.ckpt").exists()

    rows = _metrics(Path(logger.log_dir))
    values = {
        key: float(v)
        for row in rows
        for key, v in row.items()
        if v and key.startswith(("report/", "reference/"))
    }
    assert {"reference/teacher_acc", "report/student_ece", "report/teacher_ece"} <= set(values)

    # the logged ECE agrees with one computed from our own bins: sum over bins of |acc - conf| * share
    data = RandomDataModule()
    student, teacher, targets = report.collect(module, data.val_dataloader())
    confidence, accuracy, counts = reliability_bins(student.softmax(dim=-1), targets, num_bins=5)
    filled = counts > 0
    ece = ((accuracy - confidence).abs()[filled] * counts[filled]).sum() / counts.sum()
    assert values["report/student_ece"] == pytest.approx(ece.item(), abs=1e-5)
    teacher_accuracy = (teacher.argmax(dim=-1) == targets).float().mean().item()
    assert values["reference/teacher_acc"] == pytest.approx(teacher_accuracy)


def test_report_without_teacher_draws_the_student_only(tmp_path: Path) -> None:
    report = DistillationReport(directory=tmp_path / "plots")
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(max_epochs=1, logger=logger, callbacks=[report]).fit(
        DistillationModule(small_net()), datamodule=RandomDataModule()
    )
    assert all(path.exists() and path.parent == tmp_path / "plots" for path in report.files)
    columns = set(_metrics(Path(logger.log_dir))[0])
    assert "report/student_ece" in columns and "report/teacher_ece" not in columns
    assert "reference/teacher_acc" not in columns
