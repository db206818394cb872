"""OFD: values against float64 references, the margin, the connector, gradients, state."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd import OFDTerm, StepOutputs
from lightning_kd.callbacks import FeatureHooks
from lightning_kd.losses import margin_from_batchnorm
from lightning_kd.losses.functional import ofd_loss, ofd_margin
from tests.helpers import f64, outputs_of, per_channel, pointwise, rand, t32


def reference_ofd(student: np.ndarray, teacher: np.ndarray, margin: np.ndarray) -> float:
    """Heo et al., the three cases of the first version of the authors' distillation_loss, element by
    element: t > 0: (s - t)^2; m < t <= 0: (s - t)^2 if s > t; t <= m: (s - m)^2 if s > m. Sum / N."""
    s, t = f64(student), f64(teacher)
    m = np.broadcast_to(per_channel(f64(margin), t.ndim), t.shape)
    total = 0.0
    for s_i, t_i, m_i in zip(s.ravel(), t.ravel(), m.ravel(), strict=True):
        if t_i > 0:
            total += (s_i - t_i) ** 2
        elif t_i > m_i:
            total += (s_i - t_i) ** 2 if s_i > t_i else 0.0
        else:
            total += (s_i - m_i) ** 2 if s_i > m_i else 0.0
    return total / len(s)


def reference_margin(weight: list[float], bias: list[float]) -> list[float]:
    """get_margin_from_BN: E[x | x < 0] for x ~ N(bias, |weight|^2), or -3 |weight| when
    P(x < 0) <= 0.001; Phi(-r) = erfc(r / sqrt 2) / 2."""
    margins = []
    for w, b in zip(weight, bias, strict=True):
        s, m = abs(w), b
        below = 0.5 * math.erfc(m / s / math.sqrt(2))
        if below > 0.001:
            margins.append(m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below)
        else:
            margins.append(-3 * s)
    return margins


def test_ofd_partial_l2_on_hand_picked_values() -> None:
    # one channel, margin -1; (student, teacher) -> target max(t, -1), counted where s > target or target > 0
    pairs = [
        (1.0, 2.0),  # positive teacher: (1 - 2)^2 = 1
        (3.0, 2.0),  # positive teacher, student above: 1
        (0.0, -0.5),  # student above a negative target: 0.25
        (-1.0, -0.5),  # student below a negative target: 0
        (-2.0, -3.0),  # target raised to the margin -1, student below it: 0
        (0.0, -3.0),  # target raised to the margin -1, student above it: (0 + 1)^2 = 1
    ]
    student = t32([[[s for s, _ in pairs]]])
    teacher = t32([[[t for _, t in pairs]]])
    got = ofd_loss(student, teacher, t32([-1.0]))
    assert got.item() == pytest.approx(1 + 1 + 0.25 + 0 + 0 + 1, rel=1e-6)
    # the sum is divided by the batch size
    doubled = ofd_loss(student.repeat(2, 1, 1), teacher.repeat(2, 1, 1), t32([-1.0]))
    assert doubled.item() == pytest.approx(got.item(), rel=1e-6)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 7), (3, 2, 9)])
def test_ofd_loss_matches_the_three_case_reference(shape: tuple[int, ...]) -> None:
    student, teacher = rand(*shape, seed=4), rand(*shape, seed=5)
    margin = -np.abs(rand(shape[1], seed=6)) - 0.1
    got = ofd_loss(t32(student), t32(teacher), t32(margin))
    assert got.item() == pytest.approx(reference_ofd(student, teacher, margin), rel=1e-5)


def test_ofd_loss_is_zero_when_the_student_matches_and_gradient_reaches_it_only_where_counted() -> None:
    teacher = torch.randn(3, 4, 2, 2)
    margin = torch.full((4,), -0.5)
    assert ofd_loss(torch.maximum(teacher, margin.reshape(1, 4, 1, 1)), teacher, margin).item() == 0.0
    student = torch.randn(3, 4, 2, 2, requires_grad=True)
    ofd_loss(student, teacher, margin).backward()
    target = torch.maximum(teacher, margin.reshape(1, 4, 1, 1))
    counted = (student > target) | (target > 0)
    assert (student.grad[~counted] == 0).all()
    torch.testing.assert_close(student.grad[counted], (2 * (student - target) / 3)[counted].detach())


def test_ofd_loss_rejects_bad_shapes_naming_both() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        ofd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"margin has shape \(4,\).*\(2, 3, 2, 2\)"):
        ofd_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.zeros(4))


def test_margin_matches_the_formula_on_both_branches() -> None:
    # m / s from -2 to 4; P(x < 0) at m / s = 3 is 0.00135 (formula), at 3.2 and 4 below 0.001 (-3 s)
    weight = [1.0, 2.0, -0.5, 1.0, 1.0, 1.0, 0.3, 1.5]
    bias = [0.0, -4.0, 0.2, 3.0, 3.2, 4.0, 0.1, 1.0]
    got = ofd_margin(torch.tensor(weight), torch.tensor(bias))
    assert got.dtype == torch.float32 and got.shape == (8,)
    expected = reference_margin(weight, bias)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(-math.sqrt(2 / math.pi))  # m = 0, s = 1: -phi(0) / Phi(0)
    assert expected[4] == -3.0 and expected[5] == -3.0
    assert (got <= 0).all()


def test_margin_is_the_mean_of_the_negative_part_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    weight, bias = [1.0, 0.5, 2.0, 1.0], [0.0, 0.3, -1.0, 1.5]
    got = ofd_margin(torch.tensor(weight), torch.tensor(bias))
    for margin, s, m in zip(got.tolist(), weight, bias, strict=True):
        x = rng.normal(m, s, size=400_000)
        assert margin == pytest.approx(x[x < 0].mean(), rel=1e-2, abs=5e-3)


def test_margin_of_a_dead_channel_is_the_limit() -> None:
    got = ofd_margin(torch.zeros(3), torch.tensor([-0.7, 0.0, 0.4]))
    assert torch.isfinite(got).all()
    assert got.tolist() == pytest.approx([-0.7, 0.0, 0.0])


def test_margin_from_batchnorm_reads_weight_and_bias() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -0.2, 5.0]))
    got = margin_from_batchnorm(bn)
    assert not got.requires_grad
    assert got.tolist() == pytest.approx(
        reference_margin([1.0, -2.0, 0.5, 1.0], [0.0, 1.0, -0.2, 5.0]), rel=1e-6
    )
    plain = margin_from_batchnorm(nn.BatchNorm1d(3, affine=False))
    assert plain.tolist() == pytest.approx([-math.sqrt(2 / math.pi)] * 3, rel=1e-6)
    with pytest.raises(TypeError, match="LayerNorm"):
        margin_from_batchnorm(nn.LayerNorm(4))


def bn_teacher(channels: int = 6) -> nn.Sequential:
    """conv - BN - ReLU, with BN weight and bias spread so that both margin branches occur."""
    teacher = nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
    with torch.no_grad():
        teacher[1].weight.copy_(torch.linspace(-1.5, 2.0, channels))
        teacher[1].bias.copy_(torch.linspace(-1.0, 4.0, channels))
    return teacher


def test_ofd_term_margin_from_the_teacher_bn_connector_and_value() -> None:
    teacher_net = bn_teacher()
    term = OFDTerm("s", "t", teacher_bn="1")
    assert (term.name, term.weight) == ("ofd", 1e-3)
    assert term.needs_build and term.margin is None
    term.set_margin_from(teacher_net)
    weight, bias = teacher_net[1].weight.tolist(), teacher_net[1].bias.tolist()
    assert term.margin.tolist() == pytest.approx(reference_margin(weight, bias), rel=1e-6)
    assert term.needs_build  # the connector is still missing

    student, teacher = rand(2, 4, 5, 5, seed=11), rand(2, 6, 5, 5, seed=12)
    term.build(outputs_of(t32(student), t32(teacher)))
    assert not term.needs_build
    conv, bn = term.connector
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (6, 4, 1, 1) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and (bn.weight == 1).all() and (bn.bias == 0).all()
    assert set(term.state_dict()) >= {"margin", "connector.0.weight", "connector.1.running_mean"}

    term.eval()  # BN with its initial running statistics: x / sqrt(1 + eps)
    connected = pointwise(student, conv.weight) / math.sqrt(1 + 1e-5)
    expected = reference_ofd(connected, teacher, term.margin)
    assert term(outputs_of(t32(student), t32(teacher))).item() == pytest.approx(expected, rel=1e-5)


def test_ofd_connector_for_vectors_and_its_he_init() -> None:
    term = OFDTerm("s", "t", margin=[-0.5] * 128)
    assert term.needs_build and term.margin.dtype == torch.float32
    term.build(outputs_of(torch.randn(4, 64), torch.randn(4, 128)))
    layer, bn = term.connector
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (128, 64) and layer.bias is None
    assert isinstance(bn, nn.BatchNorm1d)
    # the authors' init: N(0, 2 / (k * k * out_channels)), k = 1
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert abs(layer.weight.mean().item()) < 0.01
    sequences = OFDTerm("s", "t", margin=[-0.5] * 3)
    sequences.build(outputs_of(torch.randn(4, 2, 9), torch.randn(4, 3, 9)))
    assert isinstance(sequences.connector[0], nn.Conv1d) and isinstance(
        sequences.connector[1], nn.BatchNorm1d
    )


def test_ofd_term_gradients_reach_student_and_connector_never_the_teacher() -> None:
    term = OFDTerm("s", "t", margin=[-0.3, -1.0, -0.1])
    student = torch.randn(4, 2, 3, 3, requires_grad=True)
    teacher = torch.randn(4, 3, 3, 3, requires_grad=True)
    term.build(outputs_of(student.detach(), teacher.detach()))
    loss = term(outputs_of(student, teacher))
    assert loss.ndim == 0 and loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.connector.parameters())
    assert teacher.grad is None
    assert [name for name, _ in term.named_parameters()] == [
        "connector.0.weight",
        "connector.1.weight",
        "connector.1.bias",
    ]  # the margin is a buffer, not trained


def test_ofd_term_needs_a_margin_and_checks_it() -> None:
    outputs = outputs_of(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3))
    with pytest.raises(RuntimeError, match=r"no margin.*set_margin_from\(teacher\).*'t'"):
        OFDTerm("s", "t").build(outputs)
    with pytest.raises(ValueError, match=r"margin has shape \(5,\).*\(2, 6, 3, 3\)"):
        OFDTerm("s", "t", margin=[-1.0] * 5).build(outputs)
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 6, 4, 4\).*spatial size"):
        OFDTerm("s", "t", margin=[-1.0] * 6).build(
            outputs_of(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 4, 4))
        )
    with pytest.raises(ValueError, match="finite value"):
        OFDTerm("s", "t", margin=[])
    with pytest.raises(ValueError, match=r"teacher_bn='0' is a Conv2d, not a BatchNorm"):
        OFDTerm("s", "t", teacher_bn="0").set_margin_from(bn_teacher())
    with pytest.raises(ValueError, match="Unknown teacher layer 'bn9'"):
        OFDTerm("s", "t", teacher_bn="bn9").set_margin_from(bn_teacher())
    with pytest.raises(RuntimeError, match="builds them in setup"):
        OFDTerm("s", "t")(outputs)


def test_ofd_term_state_is_restored_from_a_state_dict() -> None:
    outputs = outputs_of(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3))
    trained = OFDTerm("s", "t", teacher_bn="1")
    trained.set_margin_from(bn_teacher())
    trained.build(outputs)
    restored = OFDTerm("s", "t", teacher_bn="1")
    restored.set_margin_from(nn.Sequential(nn.Identity(), nn.BatchNorm2d(6)))  # another teacher
    restored.build(outputs)
    restored.load_state_dict(trained.state_dict())
    torch.testing.assert_close(restored.margin, trained.margin)
    torch.testing.assert_close(restored.connector[0].weight, trained.connector[0].weight)


def test_ofd_term_warns_once_when_the_hooked_feature_is_modified_in_place() -> None:
    def models(inplace: bool) -> types.SimpleNamespace:
        student = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(inplace=inplace))
        teacher = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(inplace=inplace))
        return types.SimpleNamespace(student=student, teacher=teacher)

    for inplace in (False, True):
        nets = models(inplace)
        hooks = FeatureHooks(["1"], ["1"])
        hooks.attach(nets)
        term = OFDTerm(
            "1", "1", margin=[-1.0] * 6, connector=nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        )
        x = torch.randn(5, 8)
        nets.student(x)
        with torch.no_grad():
            nets.teacher(x)
        outputs = StepOutputs(
            torch.zeros(5, 2),
            student_features=hooks.features["student"],
            teacher_features=hooks.features["teacher"],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            term(outputs)
            term(outputs)
        messages = [str(w.message) for w in caught if "modified in place" in str(w.message)]
        assert len(messages) == (1 if inplace else 0)
        if inplace:
            assert "student feature of layer '1'" in messages[0]
        hooks.detach()
