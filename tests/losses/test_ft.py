"""FT (factor transfer): values against float64 references, paraphraser and translator, gradients,
the init stage."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd import (
    CrossEntropyTerm,
    DistillationModule,
    DistillationStages,
    FTTerm,
    ParaphraserTerm,
    Stage,
)
from lightning_kd.losses import Paraphraser, Translator
from lightning_kd.losses.functional import ft_loss
from tests.helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    RandomDataModule,
    Snapshots,
    f64,
    make_trainer,
    rand,
    same,
    step,
    t32,
)


def reference_ft(student: Any, teacher: Any, p: float = 1.0) -> float:
    """RepDistiller's FactorTransfer: per sample, the channel mean of the squared factor, flattened and
    divided by its L2 norm; mean over samples and positions of |difference| ** p (maps of equal size)."""

    def factor(f: np.ndarray) -> np.ndarray:
        q = (f**2).mean(axis=1).reshape(f.shape[0], -1)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)

    return float(np.mean(np.abs(factor(f64(student)) - factor(f64(teacher))) ** p))


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 5, 7)])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ft_loss_matches_reference(shape: tuple[int, ...], p: float) -> None:
    student, teacher = rand(*shape, seed=6), rand(shape[0], 2 * shape[1], *shape[2:], seed=7)
    got = ft_loss(t32(student), t32(teacher), p=p)
    assert got.item() == pytest.approx(reference_ft(student, teacher, p), rel=1e-5)


def test_ft_loss_hand_computed_value() -> None:
    # one sample, one channel, two positions: maps (3, 4) -> squares (9, 16) -> (0.49..., 0.87...)
    student = t32([[[3.0, 4.0]]])
    teacher = t32([[[1.0, 0.0]]])  # squares (1, 0) -> normalised (1, 0)
    q = np.array([9.0, 16.0]) / np.hypot(9.0, 16.0)
    expected = (abs(q[0] - 1.0) + abs(q[1] - 0.0)) / 2
    assert ft_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_ft_loss_pools_the_larger_map() -> None:
    student, teacher = rand(2, 3, 4, 4, seed=8), rand(2, 5, 2, 2, seed=9)
    pooled = student.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 average pooling
    got = ft_loss(t32(student), t32(teacher))
    assert got.item() == pytest.approx(reference_ft(pooled, teacher), rel=1e-5)


def test_ft_loss_is_zero_for_the_same_factor_up_to_scale() -> None:
    factor = t32(rand(3, 4, 5, 5, seed=10))
    assert ft_loss(factor, factor).item() == 0.0
    assert ft_loss(factor, 3.0 * factor).item() == pytest.approx(0.0, abs=1e-7)
    assert ft_loss(factor, -factor).item() == pytest.approx(0.0, abs=1e-7)  # squares: the sign is lost


def test_ft_loss_rejects_bad_inputs_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"student_factor has shape \(2, 3\) and teacher_factor has shape"):
        ft_loss(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) but teacher_factor has shape \(3, 3, 4\)"):
        ft_loss(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match="p must be > 0"):
        ft_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), p=0.0)


def test_paraphraser_and_translator_are_the_benchmarks() -> None:
    paraphraser = Paraphraser(8, 4)
    convs = [m for m in paraphraser.encoder if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 4), (4, 4)]
    assert [(c.in_channels, c.out_channels) for c in deconvs] == [(4, 4), (4, 8), (8, 8)]
    for conv in convs + deconvs:
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        assert conv.bias is not None
    slopes = [m.negative_slope for m in paraphraser.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paraphraser.modules())  # use_bn=False
    translator = Translator(3, 4)
    convs = [m for m in translator.encoder if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 3), (3, 4), (4, 4)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in translator.modules()) == 3  # use_bn=True
    assert [m.negative_slope for m in translator.modules() if isinstance(m, nn.LeakyReLU)] == [0.1] * 3
    feature = torch.randn(2, 8, 5, 5)
    factor, reconstruction = paraphraser(feature)
    assert factor.shape == (2, 4, 5, 5) and reconstruction.shape == feature.shape
    assert Paraphraser(6, 3, ndim=3)(torch.randn(2, 6, 7))[1].shape == (2, 6, 7)


def _ft_pair(student_shape: tuple[int, ...] = (4, 3, 5, 5), teacher_shape: tuple[int, ...] = (4, 8, 5, 5)):
    paraphrase, ft = ParaphraserTerm("t", rate=0.5), FTTerm("s", "t")
    student = torch.randn(*student_shape, requires_grad=True)
    teacher = torch.randn(*teacher_shape, requires_grad=True)
    outputs = step({"s": student}, {"t": teacher})
    ft.bind_terms({"paraphrase": paraphrase})
    paraphrase.build(outputs)
    ft.build(outputs)
    return paraphrase, ft, student, teacher, outputs


def test_ft_terms_values_and_factor_channels() -> None:
    paraphrase, ft, student, teacher, outputs = _ft_pair()
    assert paraphrase.paraphraser.factor_channels == 4 and ft.paraphraser is paraphrase.paraphraser
    factor, reconstruction = paraphrase.paraphraser(teacher)
    expected = float(((f64(reconstruction) - f64(teacher)) ** 2).mean())
    assert paraphrase(outputs).item() == pytest.approx(expected, rel=1e-5)
    student_factor = ft.translator(student)
    assert student_factor.shape == factor.shape
    assert ft(outputs).item() == pytest.approx(reference_ft(student_factor, factor), rel=1e-5)


def test_ft_gradients_reach_student_and_translator_only_and_reconstruction_the_paraphraser() -> None:
    paraphrase, ft, student, teacher, outputs = _ft_pair()
    ft(outputs).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert all(p.grad is None for p in paraphrase.parameters())  # the teacher's factor is a fixed target
    assert teacher.grad is None
    student.grad = None
    paraphrase(outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in paraphrase.parameters())
    assert student.grad is None and teacher.grad is None


def test_the_paraphraser_is_registered_once_under_its_own_term() -> None:
    module = DistillationModule(
        small_conv_net(4),
        small_conv_net(8),
        losses=[CrossEntropyTerm(), ParaphraserTerm("3"), FTTerm("3", "3")],
    )
    module.build_terms((torch.randn(4, NUM_FEATURES), torch.randint(0, NUM_CLASSES, (4,))))
    names = [name for name, _ in module.named_parameters() if name.startswith("loss_terms.")]
    assert len(names) == len(set(names))
    assert all(
        name.startswith(("loss_terms.paraphrase.paraphraser.", "loss_terms.ft.translator.")) for name in names
    )
    assert not any(key.startswith("loss_terms.ft.paraphraser") for key in module.state_dict())
    assert module.loss_terms["ft"].paraphraser is module.loss_terms["paraphrase"].paraphraser
    clone = copy.deepcopy(module)  # the reference follows the copy
    assert clone.loss_terms["ft"].paraphraser is clone.loss_terms["paraphrase"].paraphraser


def test_ft_term_binding() -> None:
    outputs = step({"s": torch.randn(2, 3, 4)}, {"t": torch.randn(2, 6, 4)})
    ft = FTTerm("s", "t")
    with pytest.raises(RuntimeError, match="not bound to its ParaphraserTerm 'paraphrase'"):
        ft.build(outputs)
    paraphrase = ParaphraserTerm("t")
    ft.bind_terms({"paraphrase": paraphrase})  # bound first: any order works
    ft.build(outputs)
    paraphrase.build(outputs)
    assert not ft.needs_build and not paraphrase.needs_build
    assert torch.isfinite(ft(outputs))
    with pytest.raises(ValueError, match="reads teacher layer 't' but its paraphraser term"):
        FTTerm("s", "t").bind_paraphraser(ParaphraserTerm("other"))
    with pytest.raises(TypeError, match="not a ParaphraserTerm"):
        FTTerm("s", "t", paraphraser_term="ce").bind_terms({"ce": CrossEntropyTerm()})
    with pytest.raises(KeyError, match="no loss term named 'paraphrase'"):
        FTTerm("s", "t").bind_terms({})


def test_ft_terms_reject_bad_shapes_and_settings() -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 6\): factor transfer needs"):
        ParaphraserTerm("t").build(step({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 6)}))
    with pytest.raises(ValueError, match="leaves no factor channel"):
        ParaphraserTerm("t", rate=0.1).build(step({"s": torch.zeros(2, 3, 4)}, {"t": torch.zeros(2, 6, 4)}))
    paraphrase, ft = ParaphraserTerm("t"), FTTerm("s", "t")
    outputs = step({"s": torch.zeros(2, 3, 4, 4)}, {"t": torch.zeros(2, 6, 4)})
    ft.bind_terms({"paraphrase": paraphrase})
    paraphrase.build(outputs)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and the teacher feature \(2, 6, 4\)"):
        ft.build(outputs)
    for bad in ({"rate": 0.0}, {"rate": -1.0}):
        with pytest.raises(ValueError, match="rate must be > 0"):
            ParaphraserTerm("t", **bad)
    with pytest.raises(ValueError, match="p must be > 0"):
        FTTerm("s", "t", p=0.0)


def small_conv_net(width: int) -> nn.Module:
    """A tiny 1-D CNN on the conftest's 8-feature inputs: "1" is the conv, "2" its BN, "3" the ReLU."""
    return nn.Sequential(
        nn.Unflatten(1, (1, NUM_FEATURES)),
        nn.Conv1d(1, width, kernel_size=3, padding=1),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * NUM_FEATURES, NUM_CLASSES),
    )


def test_ft_init_stage_trains_only_the_paraphraser_then_it_stays_fixed() -> None:
    pl.seed_everything(0, verbose=False)
    losses = [CrossEntropyTerm(), ParaphraserTerm("3"), FTTerm("3", "3", weight=200.0)]
    module = DistillationModule(small_conv_net(4), small_conv_net(8), losses=losses)
    stages = DistillationStages(
        [
            Stage(epochs=2, weights={"paraphrase": 1.0}, trainable=["loss_terms.paraphrase"]),
            Stage(weights={"ce": 1.0, "ft": 200.0}, trainable=["student", "loss_terms.ft"]),
        ]
    )
    paths = {"student": "student", "paraphraser": "loss_terms.paraphrase", "translator": "loss_terms.ft"}
    snapshots = Snapshots(paths)
    make_trainer(max_epochs=4, callbacks=[stages, snapshots]).fit(module, datamodule=RandomDataModule())
    start, epochs = snapshots.initial, snapshots.epochs
    for epoch in (0, 1):  # init stage: the student and the translator (BN statistics too) are untouched
        assert same(epochs[epoch]["student"], start["student"])
        assert same(epochs[epoch]["translator"], start["translator"])
    assert not same(epochs[0]["paraphraser"], start["paraphraser"])
    assert not same(epochs[1]["paraphraser"], epochs[0]["paraphraser"])
    for epoch in (2, 3):  # main stage: the paraphraser is fixed, the student and the translator learn
        assert same(epochs[epoch]["paraphraser"], epochs[1]["paraphraser"])
        assert not same(epochs[epoch]["student"], epochs[epoch - 1]["student"])
        assert not same(epochs[epoch]["translator"], epochs[epoch - 1]["translator"])
