"""Multi-teacher KD: the mixture loss, confidence weights, TeacherEnsemble in a fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import RandomDataModule, make_trainer, small_net
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import CrossEntropyTerm, DistillationModule, KDTerm, MultiTeacherKDTerm, TeacherEnsemble
from lightning_kd.losses import functional


def _softmax64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(logits.double() / temperature)
    return e / e.sum(dim=-1, keepdim=True)


def test_loss_is_kl_from_the_weighted_mixture_float64() -> None:
    torch.manual_seed(0)
    student, teachers = torch.randn(4, 5) * 2, torch.randn(3, 4, 5) * 3
    for weights in (torch.tensor([0.5, 0.3, 0.2]), torch.rand(3, 4).softmax(dim=0)):
        w = weights.double() if weights.ndim == 2 else weights.double()[:, None].expand(3, 4)
        mixture = sum(w[m, :, None] * _softmax64(teachers[m], 3.0) for m in range(3))
        q = _softmax64(student, 3.0)
        expected = 9.0 * (mixture * (mixture.log() - q.log())).sum(dim=1).mean()
        got = functional.multi_teacher_kd_loss(student, teachers, weights, temperature=3.0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradient_equals_that_of_the_weighted_per_teacher_losses() -> None:
    torch.manual_seed(1)
    teachers, weights = torch.randn(2, 6, 4), torch.tensor([0.25, 0.75])
    student = torch.randn(6, 4, requires_grad=True)
    (mixed,) = torch.autograd.grad(functional.multi_teacher_kd_loss(student, teachers, weights, 2.0), student)
    separate = sum(w * functional.kd_loss(student, t, 2.0) for w, t in zip(weights, teachers, strict=True))
    (summed,) = torch.autograd.grad(separate, student)
    torch.testing.assert_close(mixed, summed)


def test_confidence_weights_by_hand() -> None:
    # two teachers, one sample, label 0: CE_1 = log 2 (uniform over 2), CE_2 = log(1 + e^-2)
    teachers = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    ce = [math.log(2.0), math.log(1 + math.exp(-2.0))]
    soft = [math.exp(c) / (math.exp(ce[0]) + math.exp(ce[1])) for c in ce]
    expected = torch.tensor([[1 - soft[0]], [1 - soft[1]]])  # divided by M - 1 = 1
    got = functional.confidence_weights(teachers, torch.tensor([0]))
    torch.testing.assert_close(got, expected.float())
    assert got[1, 0] > got[0, 0]  # the surer teacher weighs more
    three = functional.confidence_weights(torch.randn(3, 5, 4), torch.randint(0, 4, (5,)))
    torch.testing.assert_close(three.sum(dim=0), torch.ones(5))


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="one \\(N, C\\) tensor per teacher"):
        functional.multi_teacher_kd_loss(torch.randn(4, 5), torch.randn(2, 4, 6), torch.ones(2) / 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        functional.multi_teacher_kd_loss(torch.randn(4, 5), torch.randn(2, 4, 5), torch.ones(3) / 3)


def test_ensemble_output_and_construction_errors() -> None:
    ensemble = TeacherEnsemble([small_net(), small_net(hidden=32)], weights=[1.0, 3.0])
    ensemble.eval()
    x = torch.randn(7, 8)
    out = ensemble(x)
    assert out["members"].shape == (2, 7, 4)
    torch.testing.assert_close(out["weights"], torch.tensor([0.25, 0.75]))
    expected = (
        0.25 * _softmax64(ensemble.members[0](x), 1.0) + 0.75 * _softmax64(ensemble.members[1](x), 1.0)
    ).log()
    torch.testing.assert_close(out["logits"].double(), expected, rtol=1e-5, atol=1e-6)
    assert ensemble.num_classes == 4 and len(ensemble) == 2
    with pytest.raises(ValueError, match="at least two teachers"):
        TeacherEnsemble([small_net()])
    with pytest.raises(ValueError, match="different numbers of classes"):
        TeacherEnsemble([small_net(), small_net(num_classes=3)])
    with pytest.raises(ValueError, match="checkpoints has 1 entries for 2 teachers"):
        TeacherEnsemble([small_net(), small_net()], checkpoints=["a.ckpt"])


def _teacher_checkpoint(directory: Path, hidden: int) -> Path:
    checkpoint = ModelCheckpoint(dirpath=directory, filename=f"t{hidden}", enable_version_counter=False)
    make_trainer(max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True).fit(
        DistillationModule(small_net(hidden=hidden)), datamodule=RandomDataModule()
    )
    return directory / f"t{hidden}.ckpt"


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
def test_distilling_an_ensemble_logs_each_teacher(tmp_path: Path, weighting: str) -> None:
    paths = [_teacher_checkpoint(tmp_path, 16), _teacher_checkpoint(tmp_path, 32)]
    ensemble = TeacherEnsemble([small_net(hidden=16), small_net(hidden=32)], checkpoints=paths)
    saved = torch.load(paths[1], weights_only=True)["state_dict"]
    assert torch.equal(ensemble.members[1].state_dict()["0.weight"], saved["student.0.weight"])
    module = DistillationModule(
        small_net(), ensemble, losses=[CrossEntropyTerm(weight=0.1), MultiTeacherKDTerm(weighting=weighting)]
    )
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, datamodule=RandomDataModule())
    (metrics,) = trainer.test(module, datamodule=RandomDataModule(), verbose=False)
    assert {"test/teacher0_acc", "test/teacher1_acc", "test/teacher_acc", "test/agreement"} <= set(metrics)
    assert all(not p.requires_grad for p in ensemble.parameters())


def test_multi_teacher_term_needs_an_ensemble() -> None:
    module = DistillationModule(small_net(), small_net(), losses=[MultiTeacherKDTerm()])
    outputs = module.step_outputs((torch.randn(4, 8), torch.randint(0, 4, (4,))))
    with pytest.raises(ValueError, match="TeacherEnsemble"):
        module.compute_loss(outputs)
    # a plain KDTerm works on an ensemble too, through its mixture log-probabilities
    ensemble = DistillationModule(small_net(), TeacherEnsemble([small_net(), small_net()]), losses=[KDTerm()])
    total, _ = ensemble.compute_loss(ensemble.step_outputs((torch.randn(4, 8), torch.randint(0, 4, (4,)))))
    assert torch.isfinite(total)
