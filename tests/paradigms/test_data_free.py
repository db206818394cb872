"""Data-free distillation (DAFL): generator losses, gradient isolation, data access, config, checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_kd.cli import main
from lightning_kd.data import LatentNoiseDataModule
from lightning_kd.losses import CrossEntropyTerm, FitNetTerm, KDTerm
from lightning_kd.losses import functional as F
from lightning_kd.models import Generator
from lightning_kd.paradigms import DataFreeDistillationModule
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import LATENT, NUM_CLASSES, NUM_FEATURES, RandomDataModule, make_trainer, small_net

CONFIGS = RECIPES_DIR / "mnist1d"


def make_module(teacher: nn.Module | None = None, **kwargs: object) -> DataFreeDistillationModule:
    options: dict[str, object] = dict(cosine_decay=False)
    options.update(kwargs)
    generator = Generator((NUM_FEATURES,), LATENT, hidden=(16,))
    return DataFreeDistillationModule(small_net(), teacher or small_net(), generator, **options)


def noise_data(datamodule: RandomDataModule | None = None) -> LatentNoiseDataModule:
    return LatentNoiseDataModule(datamodule or RandomDataModule(), LATENT, batch_size=8, batches_per_epoch=2)


def states(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_hot_loss_is_cross_entropy_against_own_argmax() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    # by hand: -log softmax at the argmax (classes 0 and 1)
    row0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
    row1 = -(0.3 - math.log(math.exp(0.1) + math.exp(0.3) + math.exp(0.2)))
    assert F.dafl_one_hot_loss(logits).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_activation_loss_is_minus_mean_absolute_value() -> None:
    features = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert F.dafl_activation_loss(features).item() == pytest.approx(-(1 + 2 + 0.5 + 0) / 4)


def test_information_entropy_loss_matches_float64() -> None:
    logits = torch.randn(16, 5) * 3
    mean = torch.softmax(logits.double(), dim=1).mean(dim=0)
    expected = (mean * mean.log()).sum()
    assert F.dafl_information_entropy_loss(logits).item() == pytest.approx(expected.item(), rel=1e-5)
    # the balanced optimum: one confident sample per class gives -log C
    assert F.dafl_information_entropy_loss(torch.eye(4) * 50).item() == pytest.approx(-math.log(4), rel=1e-5)


def test_information_entropy_loss_has_finite_gradients_when_a_class_underflows() -> None:
    logits = torch.tensor([[200.0, 0.0, -200.0], [200.0, -200.0, 0.0]], requires_grad=True)
    F.dafl_information_entropy_loss(logits).backward()
    assert torch.isfinite(logits.grad).all()


def test_bn_statistics_loss_matches_float64() -> None:
    maps, vectors = torch.randn(4, 3, 5), torch.randn(6, 2)
    means, variances = [torch.randn(3), torch.randn(2)], [torch.rand(3), torch.rand(2)]
    expected = 0.0
    for x, mu, var in zip([maps, vectors], means, variances, strict=True):
        rows = x.double().transpose(0, 1).reshape(x.shape[1], -1)
        batch_mean = rows.sum(dim=1) / rows.shape[1]
        batch_var = ((rows - batch_mean[:, None]) ** 2).sum(dim=1) / rows.shape[1]
        expected += ((batch_mean - mu.double()) ** 2).sum().sqrt()
        expected += ((batch_var - var.double()) ** 2).sum().sqrt()
    got = F.bn_statistics_loss([maps, vectors], means, variances)
    assert got.item() == pytest.approx(float(expected), rel=1e-5)


def test_generator_losses_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        F.dafl_one_hot_loss(torch.randn(4))
    with pytest.raises(ValueError, match="one running mean"):
        F.bn_statistics_loss([torch.randn(4, 3)], [], [])
    with pytest.raises(ValueError, match=r"\(C,\) statistics"):
        F.bn_statistics_loss([torch.randn(4, 3)], [torch.zeros(2)], [torch.ones(2)])


def test_generator_parts_read_the_teachers_penultimate_features() -> None:
    module = make_module(bn_weight=0.5)
    z = torch.randn(8, LATENT)
    module.train()
    x, teacher_logits, total, parts = module.generator_loss(z)
    # the teacher by hand, in float64: Linear -> BatchNorm (eval: running stats) -> ReLU -> Linear
    linear, bn, _, classifier = copy.deepcopy(module.teacher).double()
    pre = x.detach().double() @ linear.weight.T + linear.bias
    normed = (pre - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    features = normed.clamp(min=0)
    logits = features @ classifier.weight.T + classifier.bias
    torch.testing.assert_close(teacher_logits.double(), logits, rtol=1e-5, atol=1e-5)
    assert parts["activation"].item() == pytest.approx(-features.abs().mean().item(), rel=1e-5)
    hand_one_hot = -torch.log_softmax(logits, dim=1).max(dim=1).values.mean()
    assert parts["one_hot"].item() == pytest.approx(hand_one_hot.item(), rel=1e-5)
    mean = torch.softmax(logits, dim=1).mean(dim=0)
    assert parts["entropy"].item() == pytest.approx((mean * mean.log()).sum().item(), rel=1e-5)
    batch_mean, batch_var = pre.mean(dim=0), pre.var(dim=0, unbiased=False)
    hand_bn = (batch_mean - bn.running_mean).norm() + (batch_var - bn.running_var).norm()
    assert parts["bn"].item() == pytest.approx(hand_bn.item(), rel=1e-5)
    weighted = parts["one_hot"] + 0.1 * parts["activation"] + 5.0 * parts["entropy"] + 0.5 * parts["bn"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_each_model_gets_gradients_from_its_own_loss_only() -> None:
    module = make_module(bn_weight=1.0)
    module.train()
    x, teacher_logits, generator_total, _ = module.generator_loss(torch.randn(8, LATENT))
    generator_total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    assert all(p.grad is None for p in module.student.parameters())
    module.generator.zero_grad(set_to_none=True)
    student_total, values = module.student_loss(x, teacher_logits)
    assert set(values) == {"kd"}
    student_total.backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.generator.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


def test_optimizer_steps_change_only_their_own_model() -> None:
    module = make_module()
    module.train()
    student_optimizer, generator_optimizer = module.configure_optimizers()
    teacher, student = states(module.teacher), states(module.student)
    generator = states(module.generator)
    x, teacher_logits, generator_total, _ = module.generator_loss(torch.randn(8, LATENT))
    generator_total.backward()
    generator_optimizer.step()
    assert same(states(module.student), student) and not same(states(module.generator), generator)
    generator = states(module.generator)
    student_total, _ = module.student_loss(x, teacher_logits)
    student_total.backward()
    student_optimizer.step()
    assert same(states(module.generator), generator) and not same(states(module.student), student)
    assert same(states(module.teacher), teacher)


class NoTrainingData(RandomDataModule):
    def train_dataloader(self) -> None:  # type: ignore[override]
        raise AssertionError("the real training data was read")


def test_fit_never_reads_the_real_training_data() -> None:
    module = make_module()
    teacher = states(module.teacher)
    trainer = make_trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=noise_data(NoTrainingData()))
    logged = set(trainer.callback_metrics)
    for name in ("generator", "student", "kd", "one_hot", "activation", "entropy"):
        assert f"train/loss_{name}" in logged
    (metrics,) = trainer.test(module, datamodule=noise_data(NoTrainingData()), verbose=False)
    assert {"test/acc", "test/teacher_acc", "test/agreement"} <= metrics.keys()
    assert same(states(module.teacher), teacher) and not module.teacher.training
    assert trainer.global_step == 2 * 2 * 2  # epochs x batches x (generator step + student step)


def test_student_terms_with_adapters_are_built_on_generated_samples() -> None:
    # the probe step runs the teacher itself (no logits from a generator step yet)
    hint = FitNetTerm("0", "0", name="hint", weight=1.0)
    module = make_module(small_net(hidden=24), losses=[KDTerm("kd", temperature=1.0), hint])
    assert hint.needs_build
    trainer = make_trainer(max_epochs=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=noise_data())
    assert hint.regressor is not None and not hint.needs_build
    assert "train/loss_hint" in trainer.callback_metrics


def test_a_real_training_datamodule_is_refused_before_it_is_read() -> None:
    with pytest.raises(TypeError, match="LatentNoiseDataModule"):
        make_trainer().fit(make_module(), datamodule=NoTrainingData())


def test_clear_errors_for_bad_settings() -> None:
    with pytest.raises(ValueError, match="read labels"):
        make_module(losses=[CrossEntropyTerm()])
    with pytest.raises(ValueError, match="Unknown teacher layer"):
        make_module(feature_layer="nope")
    with pytest.raises(ValueError, match="BatchNorm"):
        make_module(teacher=small_net(batchnorm=False), bn_weight=1.0)
    with pytest.raises(ValueError, match="latent_dim"):
        DataFreeDistillationModule(small_net(), small_net(), nn.Linear(LATENT, NUM_FEATURES))
    with pytest.raises(ValueError, match=r"latent noise of shape \(N, 6\)"):
        make_module()._latents(torch.randn(4, NUM_CLASSES))


def test_checkpoint_round_trip_keeps_generator_and_student(tmp_path: Path) -> None:
    module = make_module()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, datamodule=noise_data())
    path = tmp_path / "data_free.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"]) == 2
    restored = DataFreeDistillationModule.load_from_checkpoint(
        path, student=small_net(), teacher=small_net(), generator=Generator((NUM_FEATURES,), LATENT, (16,))
    )
    assert same(states(restored.student), states(module.student))
    assert same(states(restored.generator), states(module.generator))
    assert restored.generator_weights == module.generator_weights


SMALL = [
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_samples=600",
    "--data.init_args.val_samples=100",
    "--data.init_args.test_samples=200",
]


def test_data_free_recipe_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "teacher.yaml"), "--trainer.limit_train_batches=2", *SMALL])
    small = [arg.replace("--data.init_args.", "--data.init_args.datamodule.init_args.") for arg in SMALL]
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "paradigms" / "data_free.yaml"),
            "--data.init_args.batches_per_epoch=2",
            *small,
        ]
    )
    checkpoint = torch.load(tmp_path / "runs/mnist1d/data_free/latest.ckpt", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("generator.") for k in keys) and any(k.startswith("student.") for k in keys)
    assert not any(k.startswith("teacher.") for k in keys)
    metrics = tmp_path / "runs/mnist1d/data_free/version_0/metrics.csv"
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"train/loss_generator", "train/loss_student", "train/loss_bn", "val/acc"} <= set(header)
