"""DistillationModule: defaults, batches, logging, and bad input."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_kd import (
    CrossEntropyTerm,
    DistillationModule,
    EmbeddingDistillationModule,
    KDTerm,
    LossTerm,
    StepOutputs,
    TemperatureAnnealing,
)
from lightning_kd.losses import DKDTerm
from lightning_kd.losses.functional import dkd_loss
from tests.helpers import NUM_CLASSES, RandomDataModule, make_trainer, small_net


class MemoryLogger(Logger):
    """Keeps every logged metric name and the hyperparameters."""

    def __init__(self) -> None:
        super().__init__()
        self.metric_names: set[str] = set()
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metric_names.update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(dict(params))


def test_default_is_hinton_kd_with_crd_benchmark_weights() -> None:
    module = DistillationModule(small_net(), small_net())
    terms = module.loss_terms
    assert list(terms) == ["ce", "kd"]
    assert isinstance(terms["ce"], CrossEntropyTerm) and terms["ce"].weight == 0.1
    assert isinstance(terms["kd"], KDTerm) and terms["kd"].weight == 0.9 and terms["kd"].temperature == 4.0
    assert module.num_classes == NUM_CLASSES
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training


def test_without_teacher_it_is_plain_supervised_training() -> None:
    module = DistillationModule(small_net())
    assert list(module.loss_terms) == ["ce"] and module.loss_terms["ce"].weight == 1.0
    trainer = make_trainer(max_epochs=20)
    trainer.fit(module, datamodule=RandomDataModule())
    assert trainer.callback_metrics["val/acc"] > 0.5  # learnable labels; chance is 0.25


def test_dict_batches_with_custom_keys() -> None:
    module = DistillationModule(small_net(), small_net(), input_key="signal", target_key="label")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, datamodule=RandomDataModule(as_dict=True))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_wrong_batch_key_says_which_keys_exist() -> None:
    module = DistillationModule(small_net(), small_net())  # default input_key=0
    with pytest.raises(KeyError, match=r"keys \['signal', 'label'\]; set input_key"):
        make_trainer().fit(module, datamodule=RandomDataModule(as_dict=True))


def test_all_metrics_and_hyperparameters_reach_the_logger() -> None:
    logger = MemoryLogger()
    trainer = make_trainer(
        max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[TemperatureAnnealing(start=4.0, end=2.0)]
    )
    trainer.fit(DistillationModule(small_net(), small_net()), datamodule=RandomDataModule())
    expected = {
        "train/loss",
        "train/loss_ce",
        "train/loss_kd",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/teacher_acc",
        "val/agreement",
        "kd/temperature",
    }
    assert expected <= logger.metric_names
    assert logger.hparams["teacher_mode"] == "frozen" and logger.hparams["save_teacher"] is False


def test_agreement_is_top1_match_between_student_and_teacher() -> None:
    teacher = small_net()
    module = DistillationModule(copy.deepcopy(teacher), teacher)  # identical twins agree fully
    (metrics,) = make_trainer().validate(module, datamodule=RandomDataModule(), verbose=False)
    assert metrics["val/agreement"] == pytest.approx(1.0)
    assert metrics["val/acc"] == pytest.approx(metrics["val/teacher_acc"])


class NaNTerm(LossTerm):
    needs_teacher = False

    def forward(self, outputs: StepOutputs) -> Tensor:
        return outputs.student_logits.sum() * float("nan")


def test_nan_loss_stops_with_the_name_of_the_term(tmp_path: Any) -> None:
    module = DistillationModule(small_net(), losses=[CrossEntropyTerm(), NaNTerm("exploding")])
    trainer = make_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    with pytest.raises(
        FloatingPointError,
        match=r"at step 0: terms \{'exploding': nan\}.*Training ran on 3 step\(s\) after step 0 until the "
        r"check read it \(at step 3\), .*check_finite='step' stops at step 0 itself",
    ):
        trainer.fit(module, datamodule=RandomDataModule())  # read at the epoch end: 4 steps ran
    assert module.global_step == 4
    assert not list(tmp_path.rglob("*.ckpt"))  # raised before the epoch-end checkpoint was written


def test_check_finite_step_stops_at_the_step_itself(tmp_path: Any) -> None:
    module = DistillationModule(
        small_net(), losses=[CrossEntropyTerm(), NaNTerm("exploding")], check_finite="step"
    )
    trainer = make_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    with pytest.raises(
        FloatingPointError, match=r"at step 0: terms \{'exploding': nan\}.*term's math overflowed"
    ):
        trainer.fit(module, datamodule=RandomDataModule())
    assert module.global_step == 0
    assert not list(tmp_path.rglob("*.ckpt"))


def test_class_count_mismatch_is_caught_at_construction() -> None:
    with pytest.raises(ValueError, match="student predicts 4 classes but the teacher 10"):
        DistillationModule(small_net(), small_net(num_classes=10))


def test_logit_shape_mismatch_is_caught_at_the_first_step() -> None:
    module = DistillationModule(small_net(), small_net(num_classes=10), num_classes=NUM_CLASSES)
    with pytest.raises(
        ValueError, match=r"student_logits has shape \(16, 4\) but teacher_logits has shape \(16, 10\)"
    ):
        make_trainer().fit(module, datamodule=RandomDataModule())


def test_bad_configurations_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\['kd'\] need a teacher"):
        DistillationModule(small_net(), losses=[CrossEntropyTerm(), KDTerm()])
    with pytest.raises(ValueError, match="trainable teacher needs a loss on its own outputs"):
        DistillationModule(small_net(), small_net(), teacher_mode="trainable", losses=[KDTerm()])
    with pytest.raises(ValueError, match="unique"):
        DistillationModule(small_net(), small_net(), losses=[KDTerm("a"), KDTerm("a")])
    with pytest.raises(ValueError, match="teacher_mode"):
        DistillationModule(small_net(), small_net(), teacher_mode="ema")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KDTerm(temperature=0.0)
    with pytest.raises(ValueError, match="no teacher"):
        DistillationModule(small_net(), teacher_checkpoint="teacher.ckpt")


def test_custom_optimizer_and_scheduler() -> None:
    from functools import partial

    module = DistillationModule(
        small_net(),
        small_net(),
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        lr_scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.1),
    )
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, datamodule=RandomDataModule())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)  # decayed once, after epoch 1


def test_default_schedule_is_cosine_to_zero() -> None:
    module = DistillationModule(small_net())
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, datamodule=RandomDataModule())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cross_entropy_reads_probability_targets_and_other_terms_their_argmax() -> None:
    module = DistillationModule(small_net(), small_net(), losses=[CrossEntropyTerm(), DKDTerm()])
    generator = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(6, NUM_CLASSES, generator=generator),
        torch.randn(6, NUM_CLASSES, generator=generator),
    )
    labels = torch.tensor([0, 3, 1, 2, 2, 1])
    smoothed = 0.9 * F.one_hot(labels, NUM_CLASSES).float() + 0.1 / NUM_CLASSES  # label smoothing 0.1
    _, values = module.compute_loss(StepOutputs(student, smoothed, teacher))
    soft_ce = -(smoothed.double() * student.double().log_softmax(dim=1)).sum(dim=1).mean()
    assert float(values["ce"]) == pytest.approx(float(soft_ce), rel=1e-6)
    assert float(values["dkd"]) == pytest.approx(float(dkd_loss(student, teacher, labels)), rel=1e-6)


def test_embedding_module_refuses_an_embedding_without_a_batch_dimension() -> None:
    class Scalar(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.linear(x).flatten()

    module = EmbeddingDistillationModule(Scalar(), Scalar())
    with pytest.raises(ValueError, match=r"The student's embedding has shape \(16,\): expected \(N, D\)"):
        make_trainer(limit_val_batches=0).fit(module, datamodule=RandomDataModule())
