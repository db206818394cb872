"""QuantizationAwareTraining: the callback in a fit, int8 test accuracy, observers, checkpoints, recipes."""

from __future__ import annotations

import copy
import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, disable_observer

from lightning_kd import DistillationModule, FitNetTerm
from lightning_kd.callbacks import (
    QuantizationAwareTraining,
    convert_to_int8,
    prepare_qat,
    restore_qat_student,
)
from lightning_kd.cli import main
from lightning_kd.losses import CrossEntropyTerm
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    TINY_MNIST1D_FIT,
    RandomDataModule,
    make_trainer,
    mlp,
    small_net,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


CONFIGS = RECIPES_DIR / "mnist1d"


def states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def metrics_of(logger: CSVLogger) -> dict[str, float]:
    """The last logged value of every column of a CSVLogger's metrics.csv."""
    found: dict[str, float] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            found.update({key: float(value) for key, value in row.items() if value})
    return found


def qat_fit(module: DistillationModule, tmp_path: Path, epochs: int = 2, **options: Any) -> tuple[Any, ...]:
    qat = QuantizationAwareTraining(**options)
    logger = CSVLogger(tmp_path, name="qat")
    trainer = make_trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[qat, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
        enable_checkpointing=True,
    )
    datamodule = RandomDataModule()
    trainer.fit(module, datamodule=datamodule)
    return qat, trainer, logger, datamodule


def test_callback_trains_the_student_logs_and_saves_int8_and_leaves_the_teacher(tmp_path: Path) -> None:
    teacher = small_net()
    module = DistillationModule(mlp(), teacher, cosine_decay=False)
    teacher_before = states(teacher)
    student_before = states(module.student)
    qat, trainer, logger, datamodule = qat_fit(module, tmp_path)

    assert any(isinstance(m, FakeQuantizeBase) for m in module.student.modules())
    assert module.teacher is teacher and not any(isinstance(m, FakeQuantizeBase) for m in teacher.modules())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    trained = module.student.state_dict()
    assert not torch.equal(trained["classifier.weight"], student_before["classifier.weight"])

    assert qat.path == tmp_path / "checkpoints" / "student_int8.pt"
    int8 = torch.load(qat.path, weights_only=False)
    inputs, targets = datamodule.x, datamodule.y
    with torch.no_grad():
        accuracy = (int8(inputs).argmax(dim=1) == targets).float().mean().item()
    logged = metrics_of(logger)
    assert logged["quantized/val_acc"] == pytest.approx(accuracy)  # the val split is the whole set
    assert qat.metrics["quantized/val_acc"] == pytest.approx(accuracy)
    assert 0.9 <= logged["quantized/val_agreement"] <= 1.0


def test_trainer_test_reports_int8_accuracy(tmp_path: Path) -> None:
    module = DistillationModule(mlp(), cosine_decay=False)
    qat, trainer, _, datamodule = qat_fit(module, tmp_path, epochs=1)
    (results,) = trainer.test(module, datamodule=datamodule, verbose=False)
    with torch.no_grad():
        expected = (qat.int8_student(datamodule.x).argmax(dim=1) == datamodule.y).float().mean().item()
    assert results["quantized/test_acc"] == pytest.approx(expected)
    assert "quantized/test_agreement" in results and "test/acc" in results


def test_observers_learn_in_training_only_and_freeze_on_schedule(tmp_path: Path) -> None:
    seen: list[tuple[str, int, torch.Tensor, int]] = []

    class Probe(pl.Callback):
        def _record(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            fake_quant = pl_module.student.activation_post_process_1
            seen.append(
                (stage, trainer.current_epoch, fake_quant.scale.clone(), int(fake_quant.observer_enabled))
            )

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._record("train_end", trainer, pl_module)

        def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._record("val_start", trainer, pl_module)

        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._record("val_end", trainer, pl_module)

    module = DistillationModule(mlp(), cosine_decay=False)
    qat = QuantizationAwareTraining(freeze_observers_epoch=1, filename=None)
    make_trainer(max_epochs=3, callbacks=[qat, Probe()]).fit(module, datamodule=RandomDataModule())
    by = {(stage, epoch): (scale, enabled) for stage, epoch, scale, enabled in seen}
    for epoch in range(3):  # validation does not move the ranges
        assert by[("val_start", epoch)][1] == 0
        assert torch.equal(by[("val_start", epoch)][0], by[("val_end", epoch)][0])
    assert by[("train_end", 0)][1] == 1
    assert by[("train_end", 1)][1] == 0 and by[("train_end", 2)][1] == 0
    assert torch.equal(by[("train_end", 1)][0], by[("train_end", 2)][0])  # frozen from epoch 1


def test_batchnorm_statistics_freeze_on_schedule() -> None:
    student = nn.Sequential(
        nn.Unflatten(1, (1, NUM_FEATURES)),
        nn.Conv1d(1, 4, 3, padding=1),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * NUM_FEATURES, NUM_CLASSES),
    )
    means: list[torch.Tensor] = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            means.append(getattr(pl_module.student, "1").bn.running_mean.clone())

        on_train_end = on_train_epoch_start

    module = DistillationModule(student, num_classes=NUM_CLASSES, cosine_decay=False)
    qat = QuantizationAwareTraining(freeze_bn_epoch=1, filename=None)
    make_trainer(max_epochs=3, callbacks=[qat, Probe()]).fit(module, datamodule=RandomDataModule())
    assert type(getattr(module.student, "1")).__name__ == "ConvBnReLU1d"
    before_epoch_0, before_epoch_1, before_epoch_2, after_epoch_2 = means
    assert not torch.equal(before_epoch_0, before_epoch_1)  # epoch 0 updates the statistics
    assert torch.equal(before_epoch_1, before_epoch_2) and torch.equal(before_epoch_2, after_epoch_2)


def test_resume_and_restore_from_a_qat_checkpoint(tmp_path: Path) -> None:
    module = DistillationModule(mlp(), cosine_decay=False)
    _, trainer, _, datamodule = qat_fit(module, tmp_path, epochs=1)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any("fake_quant" in key for key in state)

    resumed = DistillationModule(mlp(), cosine_decay=False)
    trainer = make_trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(filename=None)])
    trainer.fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    assert trainer.global_step == 2 * len(datamodule.train_dataloader())

    fresh = make_trainer(callbacks=[QuantizationAwareTraining(filename=None)])
    (tested,) = fresh.test(
        DistillationModule(mlp()), datamodule=datamodule, ckpt_path=checkpoint, verbose=False
    )
    assert "quantized/test_acc" in tested  # a new Trainer prepares the student, then loads the checkpoint

    restored = restore_qat_student(DistillationModule(mlp()), checkpoint, datamodule.x[:4])
    module.student.eval().apply(disable_observer)
    restored.student.eval()
    with torch.no_grad():
        assert torch.equal(restored.student(datamodule.x), module.student(datamodule.x))
    with pytest.raises(ValueError, match="not from a QAT run"):
        restore_qat_student(DistillationModule(mlp()), {"state_dict": states(mlp())}, datamodule.x[:4])


def test_feature_hooks_follow_the_prepared_student() -> None:
    """A hook on a fused Linear (features.1) captures its output after the ReLU; features.2 is gone."""
    captured: list[torch.Tensor] = []
    term = FitNetTerm(student_layer="features.1", teacher_layer="2", weight=1.0)
    module = DistillationModule(mlp(), small_net(), losses=[CrossEntropyTerm(), term], cosine_decay=False)

    class Probe(pl.Callback):
        def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
            captured.append(pl_module.feature_hooks.features["student"]["features.1"].detach())

    make_trainer(callbacks=[QuantizationAwareTraining(filename=None), Probe()]).fit(
        module, datamodule=RandomDataModule()
    )
    assert captured and all(features.min() >= 0 for features in captured)  # post-ReLU

    fused_away = FitNetTerm(student_layer="features.2", teacher_layer="2", weight=1.0)
    module = DistillationModule(mlp(), small_net(), losses=[CrossEntropyTerm(), fused_away])
    with pytest.raises(ValueError, match="Unknown student layer 'features.2'"):
        make_trainer(callbacks=[QuantizationAwareTraining(filename=None)]).fit(
            module, datamodule=RandomDataModule()
        )


class BranchesOnItsInput(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_bad_input_gets_errors_that_name_the_fix() -> None:
    with pytest.raises(ValueError, match="Unknown quantization backend 'tpu'"):
        QuantizationAwareTraining(backend="tpu")
    with pytest.raises(TypeError, match="not FX-traceable.*non_traceable_modules"):
        prepare_qat(BranchesOnItsInput(), torch.randn(2, 8))
    with pytest.raises(TypeError, match="call prepare_qat"):
        convert_to_int8(copy.deepcopy(mlp()))

    class NoStudent(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

    with pytest.raises(TypeError, match="has no student network.*DistillationModule"):
        QuantizationAwareTraining().setup(make_trainer(), NoStudent(), "fit")
    ema = DistillationModule(mlp(), teacher_mode="ema")
    with pytest.raises(ValueError, match="teacher_mode='ema'"):
        make_trainer(callbacks=[QuantizationAwareTraining()]).fit(ema, datamodule=RandomDataModule())
    untrained = DistillationModule(mlp())
    for evaluate in ("test", "validate"):
        with pytest.raises(ValueError, match="never observed"):
            trainer = make_trainer(callbacks=[QuantizationAwareTraining()])
            getattr(trainer, evaluate)(untrained, datamodule=RandomDataModule())


def test_yaml_recipes_run_and_save_the_int8_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *TINY_MNIST1D_FIT])
        for name in ("qat_kd", "qat_baseline"):
            main(["fit", "--config", str(CONFIGS / "quantization" / f"{name}.yaml"), *TINY_MNIST1D_FIT])
            header = (tmp_path / f"runs/mnist1d/{name}/version_0/metrics.csv").read_text().splitlines()[0]
            assert "quantized/val_acc" in header and "quantized/val_agreement" in header
            int8 = torch.load(
                tmp_path / f"runs/mnist1d/{name}/version_0/checkpoints/{name}_int8.pt", weights_only=False
            )
            assert int8(torch.randn(3, 40)).shape == (3, 10)
    header = (tmp_path / "runs/mnist1d/qat_kd/version_0/metrics.csv").read_text().splitlines()[0]
    assert "val/teacher_acc" in header
