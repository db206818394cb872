"""AB and FT: values against float64 references written from the formulas, adapters, gradients, stages."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, NUM_FEATURES, RandomDataModule, make_trainer, small_net
from torch import nn

from lightning_kd import (
    ABTerm,
    CrossEntropyTerm,
    DistillationModule,
    DistillationStages,
    FTTerm,
    ParaphraserTerm,
    Stage,
    StepOutputs,
)
from lightning_kd.losses import Paraphraser, Translator
from lightning_kd.losses.boundary import make_ab_connector
from lightning_kd.losses.functional import ab_loss, ft_loss

# --------------------------------------------------------------------------------------------
# Independent references (float64 numpy), written from the formulas.
# --------------------------------------------------------------------------------------------


def f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def t32(x: Any) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def reference_ab(student: Any, teacher: Any, margin: float = 1.0) -> float:
    """Heo et al. alternative loss, element by element: t <= 0: (s + m)^2 if s > -m; t > 0: (s - m)^2 if
    s <= m; summed, divided by the batch size, times 3 / 1000 (RepDistiller's ABLoss)."""
    s, t = f64(student), f64(teacher)
    total = 0.0
    for s_i, t_i in zip(s.ravel(), t.ravel(), strict=True):
        if t_i <= 0:
            total += (s_i + margin) ** 2 if s_i > -margin else 0.0
        else:
            total += (s_i - margin) ** 2 if s_i <= margin else 0.0
    return total / s.shape[0] * 3 / 1000


def reference_ft(student: Any, teacher: Any, p: float = 1.0) -> float:
    """RepDistiller's FactorTransfer: per sample, the channel mean of the squared factor, flattened and
    divided by its L2 norm; mean over samples and positions of |difference| ** p (maps of equal size)."""

    def factor(f: np.ndarray) -> np.ndarray:
        q = (f**2).mean(axis=1).reshape(f.shape[0], -1)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)

    return float(np.mean(np.abs(factor(f64(student)) - factor(f64(teacher))) ** p))


def step(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> StepOutputs:
    batch = next(iter(student.values())).shape[0]
    return StepOutputs(torch.zeros(batch, 2), student_features=student, teacher_features=teacher)


# --------------------------------------------------------------------------------------------
# ab_loss
# --------------------------------------------------------------------------------------------


def test_ab_loss_every_branch_of_the_mask_on_hand_picked_values() -> None:
    # teacher inactive (t <= 0, t = 0 included): s <= -m costs nothing, -m < s costs (s + m)^2;
    # teacher active (t > 0): s > m costs nothing, s <= m costs (s - m)^2.
    student = t32([[-2.0, -1.0, -0.5, 2.0], [2.0, 1.0, 0.5, -1.0]])
    teacher = t32([[-1.0, 0.0, -3.0, 0.0], [0.5, 2.0, 1e-3, 4.0]])
    costs = [0.0, 0.0, 0.25, 9.0, 0.0, 0.0, 0.25, 4.0]
    expected = sum(costs) / 2 * 3 / 1000  # two samples
    assert ab_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert reference_ab(student, teacher) == pytest.approx(expected, rel=1e-12)
    # margin 0.5: -0.5 sits on the boundary (no cost), 1.0 is beyond it, 0.5 on it (cost 0)
    expected_half = (0.0 + 0.0 + 0.0 + 2.5**2 + 0.0 + 0.0 + 0.0 + 1.5**2) / 2 * 3 / 1000
    assert ab_loss(student, teacher, margin=0.5).item() == pytest.approx(expected_half, rel=1e-6)


@pytest.mark.parametrize(("shape", "margin"), [((4, 6), 1.0), ((2, 3, 5), 0.5), ((3, 2, 4, 4), 2.0)])
def test_ab_loss_matches_reference(shape: tuple[int, ...], margin: float) -> None:
    student, teacher = 2 * rand(*shape, seed=1), rand(*shape, seed=2)
    got = ab_loss(t32(student), t32(teacher), margin=margin)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference_ab(student, teacher, margin), rel=1e-5)


def test_ab_loss_is_zero_beyond_the_margin_on_the_teachers_side() -> None:
    teacher = t32(rand(4, 3, 5, seed=3))
    student = torch.where(teacher > 0, 1.0 + torch.rand_like(teacher), -1.0 - torch.rand_like(teacher))
    assert ab_loss(student, teacher).item() == 0.0
    assert ab_loss(student, torch.relu(teacher)).item() == 0.0  # only the teacher's sign matters


def test_ab_loss_gradient_matches_the_formula_and_spares_the_teacher() -> None:
    student_np, teacher_np = rand(3, 4, 5, seed=4), rand(3, 4, 5, seed=5)
    student = t32(student_np).requires_grad_()
    teacher = t32(teacher_np).requires_grad_()
    ab_loss(student, teacher.detach()).backward()
    s, t = student_np, teacher_np
    down = (s > -1) & (t <= 0)
    up = (s <= 1) & (t > 0)
    expected = (2 * (s + 1) * down + 2 * (s - 1) * up) / 3 * 3 / 1000
    np.testing.assert_allclose(f64(student.grad), expected, rtol=1e-5, atol=1e-9)
    assert teacher.grad is None


def test_ab_loss_rejects_bad_inputs_naming_both_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"student_pre has shape \(2, 3\) but teacher_pre has shape \(2, 4\)"
    ):
        ab_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        ab_loss(torch.zeros(2, 3), torch.zeros(2, 3), margin=-1.0)
    with pytest.raises(ValueError, match="batch dimension"):
        ab_loss(torch.tensor(1.0), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------
# ft_loss
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------


def test_losses_run_in_float32_under_bf16_autocast() -> None:
    student = t32(rand(4, 3, 6, 6, seed=11)).bfloat16()
    teacher = t32(rand(4, 3, 6, 6, seed=12)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ab, ft = ab_loss(student, teacher), ft_loss(student, teacher)
    assert ab.dtype == ft.dtype == torch.float32
    assert torch.equal(ab, ab_loss(student.float(), teacher.float()))
    assert torch.equal(ft, ft_loss(student.float(), teacher.float()))


def test_terms_give_float32_losses_under_bf16_autocast() -> None:
    ab = ABTerm("s", "t")
    paraphrase, ft = ParaphraserTerm("t"), FTTerm("s", "t")
    outputs = step({"s": torch.randn(4, 3, 6, 6)}, {"t": torch.randn(4, 8, 6, 6)})
    ft.bind_terms({"paraphrase": paraphrase})
    for term in (ab, paraphrase, ft):
        term.build(outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [term(outputs) for term in (ab, paraphrase, ft)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values)


# --------------------------------------------------------------------------------------------
# ABTerm
# --------------------------------------------------------------------------------------------


def test_ab_connector_follows_the_benchmark() -> None:
    assert isinstance(make_ab_connector((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)  # equal shapes
    conv, bn = make_ab_connector((2, 4, 4, 4), (2, 8, 4, 4))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8
    conv, _ = make_ab_connector((2, 4, 8, 8), (2, 8, 4, 4))
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2)  # ConvReg: twice the teacher's size
    conv, bn = make_ab_connector((2, 4, 10), (2, 8, 10))
    assert isinstance(conv, nn.Conv1d) and isinstance(bn, nn.BatchNorm1d)
    linear, bn = make_ab_connector((2, 4), (2, 8))
    assert isinstance(linear, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
    assert not any(isinstance(m, nn.ReLU) for m in make_ab_connector((2, 4, 4, 4), (2, 8, 4, 4)).modules())


def test_ab_term_value_and_gradients_reach_student_and_connector_never_the_teacher() -> None:
    term = ABTerm("s", "t", margin=0.5)
    student = torch.randn(4, 3, 5, requires_grad=True)
    teacher = torch.randn(4, 6, 5, requires_grad=True)
    outputs = step({"s": student}, {"t": teacher})
    term.build(outputs)
    value = term(outputs)
    assert value.item() == pytest.approx(reference_ab(term.connector(student), teacher, 0.5), rel=1e-5)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None for p in term.connector.parameters())
    assert teacher.grad is None

    same = ABTerm("s", "t")  # equal shapes: identity connector, nothing to train
    outputs = step({"s": student.detach()}, {"t": student.detach() + 0.1})
    same.build(outputs)
    assert isinstance(same.connector, nn.Identity) and not list(same.parameters()) and not same.needs_build
    assert same(outputs).item() == pytest.approx(reference_ab(student, student + 0.1), rel=1e-5)


def test_ab_term_rejects_bad_shapes_and_settings() -> None:
    with pytest.raises(ValueError, match=r"'ab'.*\(2, 3\).*\(2, 3, 4\)"):
        ABTerm("s", "t").build(step({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 3, 4)}))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        ABTerm("s", "t", margin=-0.1)
    with pytest.raises(RuntimeError, match="no connector yet"):
        ABTerm("s", "t")(step({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 3)}))


def test_ab_term_warns_once_when_the_student_feature_was_overwritten_in_place() -> None:
    term = ABTerm("s", "t", connector=nn.Identity())
    clean = step({"s": torch.randn(2, 3)}, {"t": torch.randn(2, 3).relu_()})  # teacher: only its sign matters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term(clean)
    overwritten = step({"s": torch.randn(2, 3).relu_()}, {"t": torch.randn(2, 3)})
    with pytest.warns(UserWarning, match="modified in place"):
        term(overwritten)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term(overwritten)  # once


# --------------------------------------------------------------------------------------------
# ParaphraserTerm and FTTerm
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Staged fits
# --------------------------------------------------------------------------------------------


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


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Snapshots(pl.Callback):
    """States of the given submodules (by attribute path) at the start and after every epoch."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.initial: dict[str, dict[str, torch.Tensor]] = {}
        self.epochs: list[dict[str, dict[str, torch.Tensor]]] = []

    def _take(self, pl_module: Any) -> dict[str, dict[str, torch.Tensor]]:
        return {key: state(pl_module.get_submodule(path)) for key, path in self.paths.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.initial = self._take(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.epochs.append(self._take(pl_module))


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


def test_ab_init_stage_trains_the_feature_layers_and_connector_then_ce_the_student() -> None:
    pl.seed_everything(0, verbose=False)
    losses = [CrossEntropyTerm(), ABTerm("1", "1")]  # small_net: "1" is the BatchNorm before the ReLU
    module = DistillationModule(small_net(hidden=16), small_net(hidden=32), losses=losses)
    stages = DistillationStages(
        [
            Stage(epochs=2, weights={"ab": 1.0}, trainable=["student.0", "student.1", "loss_terms.ab"]),
            Stage(weights={"ce": 1.0}, trainable=["student"]),
        ]
    )
    paths = {"features": "student.0", "head": "student.3", "connector": "loss_terms.ab"}
    snapshots = Snapshots(paths)
    make_trainer(max_epochs=4, callbacks=[stages, snapshots]).fit(module, datamodule=RandomDataModule())
    start, epochs = snapshots.initial, snapshots.epochs
    assert isinstance(module.loss_terms["ab"].connector[0], nn.Linear)
    for epoch in (0, 1):
        assert same(epochs[epoch]["head"], start["head"])  # the classifier waits for the main stage
        assert not same(epochs[epoch]["features"], (epochs[epoch - 1] if epoch else start)["features"])
        assert not same(epochs[epoch]["connector"], (epochs[epoch - 1] if epoch else start)["connector"])
    for epoch in (2, 3):
        assert same(epochs[epoch]["connector"], epochs[1]["connector"])  # unused and fixed (BN in eval)
        assert not same(epochs[epoch]["head"], epochs[epoch - 1]["head"])
