"""The contract every loss term keeps, checked over several methods at once: zero and invariances,
gradients to the student only, terms equal their functionals, defaults, float32 under bf16 autocast,
shape errors naming both shapes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_kd import (
    ABTerm,
    ATTerm,
    CCTerm,
    CrossEntropyTerm,
    DistillationModule,
    DISTTerm,
    DKDTerm,
    FTTerm,
    KDTerm,
    NSTTerm,
    OFDTerm,
    ParaphraserTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
    StepOutputs,
    VIDTerm,
)
from lightning_kd.losses import LossTerm, margin_from_batchnorm
from lightning_kd.losses.functional import (
    ab_loss,
    at_loss,
    cc_loss,
    dist_loss,
    dkd_loss,
    ft_loss,
    kd_loss,
    mlkd_loss,
    nst_loss,
    ofd_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
    vid_loss,
)
from tests.helpers import make_outputs, outputs_of, rand, reference_at, reference_nst, small_net, step, t32


def test_ab_and_ft_losses_run_in_float32_under_bf16_autocast() -> None:
    student = t32(rand(4, 3, 6, 6, seed=11)).bfloat16()
    teacher = t32(rand(4, 3, 6, 6, seed=12)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ab, ft = ab_loss(student, teacher), ft_loss(student, teacher)
    assert ab.dtype == ft.dtype == torch.float32
    assert torch.equal(ab, ab_loss(student.float(), teacher.float()))
    assert torch.equal(ft, ft_loss(student.float(), teacher.float()))


def test_ab_and_ft_terms_give_float32_losses_under_bf16_autocast() -> None:
    ab = ABTerm("s", "t")
    paraphrase, ft = ParaphraserTerm("t"), FTTerm("s", "t")
    outputs = step({"s": torch.randn(4, 3, 6, 6)}, {"t": torch.randn(4, 8, 6, 6)})
    ft.bind_terms({"paraphrase": paraphrase})
    for term in (ab, paraphrase, ft):
        term.build(outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [term(outputs) for term in (ab, paraphrase, ft)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((2, 3, 8, 8), (2, 5, 4, 4)), ((2, 3, 4, 4), (2, 5, 8, 8)), ((2, 3, 8, 4), (2, 5, 4, 8))],
)
def test_at_and_nst_pool_the_larger_map_to_the_smaller(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
) -> None:
    student = rand(*student_shape, seed=13, positive=True)
    teacher = rand(*teacher_shape, seed=14, positive=True)
    assert at_loss(t32(student), t32(teacher)).item() == pytest.approx(
        reference_at(student, teacher), rel=1e-5
    )
    assert nst_loss(t32(student), t32(teacher)).item() == pytest.approx(
        reference_nst(student, teacher), rel=1e-5
    )


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


RELATION_LOSSES: dict[str, Loss] = {"sp": sp_loss, "rkd": rkd_loss, "pkt": pkt_loss, "cc": cc_loss}


MAP_LOSSES: dict[str, Loss] = {"at": at_loss, "nst": nst_loss}


ALL_LOSSES: dict[str, Loss] = {**RELATION_LOSSES, **MAP_LOSSES}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_loss_is_zero_when_student_equals_teacher(name: str) -> None:
    feature = torch.randn(6, 4, 3, 3)
    assert ALL_LOSSES[name](feature, feature.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert ALL_LOSSES[name](feature, torch.randn(6, 4, 3, 3)).item() > 1e-6


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize(("student_scale", "teacher_scale"), [(3.0, 3.0), (0.5, 1.0), (1.0, 7.0)])
def test_loss_is_invariant_to_positive_scaling(name: str, student_scale: float, teacher_scale: float) -> None:
    # SP: row-normalised Gram matrix; RKD: distances over their mean, angles; PKT, CC: cosines;
    # AT: normalised attention map; NST: normalised channel vectors
    student, teacher = torch.randn(6, 4, 3, 3), torch.randn(6, 5, 3, 3)
    loss = ALL_LOSSES[name]
    reference = loss(student, teacher)
    scaled = loss(student * student_scale, teacher * teacher_scale)
    torch.testing.assert_close(scaled, reference, rtol=1e-4, atol=1e-7)


TERMS: dict[str, tuple[Callable[..., LossTerm], tuple[int, ...], tuple[int, ...]]] = {
    "sp": (SPTerm, (6, 4, 3, 3), (6, 8, 2, 2)),
    "rkd": (RKDTerm, (6, 10), (6, 12)),
    "pkt": (PKTTerm, (6, 10), (6, 12)),
    "cc": (CCTerm, (6, 10), (6, 12)),
    "at": (ATTerm, (6, 4, 4, 4), (6, 8, 2, 2)),
    "nst": (NSTTerm, (6, 4, 4, 4), (6, 8, 2, 2)),
}


def step_outputs(student: torch.Tensor, teacher: torch.Tensor) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(len(student), 3),
        student_features={"block": student},
        teacher_features={"stage.2": teacher},
    )


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_gradient_reaches_the_student_and_never_the_teacher(name: str) -> None:
    term_cls, student_shape, teacher_shape = TERMS[name]
    term = term_cls("block", "stage.2")
    student = torch.randn(*student_shape).abs().requires_grad_(True)
    teacher = torch.randn(*teacher_shape).abs().requires_grad_(True)
    loss = term(step_outputs(student, teacher))
    assert loss.ndim == 0 and loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_equals_its_functional(name: str) -> None:
    term_cls, student_shape, teacher_shape = TERMS[name]
    student, teacher = torch.randn(*student_shape), torch.randn(*teacher_shape)
    term = term_cls("block", "stage.2")
    torch.testing.assert_close(term(step_outputs(student, teacher)), ALL_LOSSES[name](student, teacher))


def test_terms_default_to_the_benchmark_names_and_weights_cc_excepted() -> None:
    expected = {"sp": 3000.0, "rkd": 1.0, "pkt": 30000.0, "cc": 100.0, "at": 1000.0, "nst": 50.0}
    for name, (term_cls, _, _) in TERMS.items():
        term = term_cls("a", "b")
        assert (term.name, term.weight) == (name, expected[name])
        assert (term.student_layers, term.teacher_layers) == (("a",), ("b",))
    rkd = RKDTerm("a", "b")
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    assert ATTerm("a", "b").p == 2.0
    cc = CCTerm("a", "b")
    assert (cc.gamma, cc.order) == (0.4, 2)


def test_term_settings_reach_the_loss() -> None:
    student, teacher = torch.randn(5, 6), torch.randn(5, 4)
    outputs = step_outputs(student, teacher)
    torch.testing.assert_close(
        RKDTerm("block", "stage.2", distance_weight=1.0, angle_weight=0.0)(outputs),
        rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0),
    )
    torch.testing.assert_close(
        CCTerm("block", "stage.2", gamma=1.0, order=4)(outputs), cc_loss(student, teacher, gamma=1.0, order=4)
    )
    maps_s, maps_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(
        ATTerm("block", "stage.2", p=1.0)(step_outputs(maps_s, maps_t)), at_loss(maps_s, maps_t, p=1.0)
    )


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_loss_runs_in_float32_under_bf16_autocast(name: str) -> None:
    loss = ALL_LOSSES[name]
    student, teacher = torch.randn(8, 4, 4, 4), torch.randn(8, 6, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs differs: the math itself is float32
    torch.testing.assert_close(got, loss(student.bfloat16().float(), teacher.bfloat16().float()))


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_batch_size_mismatch_raises_naming_both_shapes(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\).*\(5, 3, 2, 2\).*batch size"):
        ALL_LOSSES[name](torch.randn(4, 3, 2, 2), torch.randn(5, 3, 2, 2))


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
def test_map_losses_reject_non_4d_features_naming_both_shapes(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(4, 16\).*\(4, 3, 2, 2\).*\(N, C, H, W\)"):
        MAP_LOSSES[name](torch.randn(4, 16), torch.randn(4, 3, 2, 2))


def test_bad_exponents_and_eps_are_rejected() -> None:
    with pytest.raises(ValueError, match="p must be > 0"):
        at_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), p=0.0)
    with pytest.raises(ValueError, match="p must be > 0"):
        ATTerm("a", "b", p=-1.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        pkt_loss(torch.randn(2, 3), torch.randn(2, 3), eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        PKTTerm("a", "b", eps=0.0)


def test_at_and_nst_on_1d_maps_pool_the_longer_sequence() -> None:
    rng = np.random.default_rng(3)
    student = rng.normal(size=(2, 3, 4))
    teacher = rng.normal(size=(2, 5, 2))
    pooled = student.reshape(2, 3, 2, 2).mean(axis=3)  # length 4 -> 2, as adaptive average pooling

    def attention(f: np.ndarray) -> np.ndarray:
        a = (np.abs(f) ** 2).mean(axis=1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected_at = ((attention(pooled) - attention(teacher)) ** 2).mean()
    got = at_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32))
    assert got.item() == pytest.approx(expected_at, rel=1e-5)

    def unit(f: np.ndarray) -> np.ndarray:
        return f / np.linalg.norm(f, axis=2, keepdims=True)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        return float((np.einsum("nil,njl->nij", a, b) ** 2).mean())

    s, t = unit(pooled), unit(teacher)
    expected_nst = kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)
    got = nst_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32))
    assert got.item() == pytest.approx(expected_nst, rel=1e-5)


@pytest.mark.parametrize(
    "term", [KDTerm(standardize=True), DKDTerm(), DISTTerm(), DISTTerm(temperature=4.0)], ids=repr
)
def test_terms_send_gradients_to_the_student_only(term: torch.nn.Module) -> None:
    outputs, student, teacher = make_outputs()
    loss = term(outputs)
    assert loss.ndim == 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_terms_compute_their_functions() -> None:
    outputs, student, teacher = make_outputs()
    s, t, y = student.detach(), teacher.detach(), outputs.targets
    torch.testing.assert_close(KDTerm(temperature=2.0, standardize=True)(outputs), kd_loss(s, t, 2.0, True))
    torch.testing.assert_close(
        DKDTerm(alpha=2.0, beta=4.0, temperature=3.0)(outputs), dkd_loss(s, t, y, 2.0, 4.0, 3.0)
    )
    torch.testing.assert_close(
        DISTTerm(beta=2.0, gamma=0.5, temperature=2.0)(outputs), dist_loss(s, t, 2.0, 0.5, 2.0)
    )


def test_terms_defaults_and_repr() -> None:
    dkd, dist, kd = DKDTerm(), DISTTerm(), KDTerm(standardize=True)
    assert (dkd.name, dkd.weight, dkd.alpha, dkd.beta, dkd.temperature) == ("dkd", 1.0, 1.0, 8.0, 4.0)
    assert (dist.name, dist.weight, dist.beta, dist.gamma, dist.temperature) == ("dist", 1.0, 1.0, 1.0, 1.0)
    assert KDTerm().standardize is False
    assert "standardize=True" in repr(kd)
    assert "alpha=1.0, beta=8.0, temperature=4.0" in repr(dkd)
    assert "beta=1.0, gamma=1.0, temperature=1.0" in repr(dist)
    for term in (dkd, dist, kd):
        assert isinstance(term.temperature, float)


def test_temperature_attribute_is_read_on_every_call() -> None:
    # TemperatureAnnealing sets ``term.temperature``; the next forward must use it
    outputs, student, teacher = make_outputs()
    s, t, y = student.detach(), teacher.detach(), outputs.targets
    for term, expected in (
        (DKDTerm(), dkd_loss(s, t, y, temperature=1.5)),
        (DISTTerm(), dist_loss(s, t, temperature=1.5)),
        (KDTerm(standardize=True), kd_loss(s, t, 1.5, standardize=True)),
    ):
        term.temperature = 1.5
        torch.testing.assert_close(term(outputs), expected)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda s, t, y: kd_loss(s, t, 2.0, standardize=True),
        lambda s, t, y: dkd_loss(s, t, y),
        lambda s, t, y: dist_loss(s, t, temperature=2.0),
        lambda s, t, y: dkd_loss(s, t, y, temperature=2.0, standardize=True),
        lambda s, t, y: mlkd_loss(s[:16], t[:16], s[16:], t[16:], standardize=True),
        lambda s, t, y: kd_loss(s, t, torch.linspace(1.0, 20.0, 32)),
    ],
    ids=["kd_standardized", "dkd", "dist", "dkd_standardized", "mlkd", "kd_learned_temperature"],
)
def test_response_losses_run_in_float32_under_bf16_autocast(loss_fn: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(2)
    student, teacher, target = torch.randn(32, 10), torch.randn(32, 10), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(student.bfloat16(), teacher.bfloat16(), target)
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs differs: the math itself is float32
    exact_on_rounded = loss_fn(student.bfloat16().float(), teacher.bfloat16().float(), target)
    torch.testing.assert_close(got, exact_on_rounded)


def test_losses_reject_mismatched_shapes_naming_both() -> None:
    s, t = torch.randn(2, 10), torch.randn(2, 100)
    for call in (
        lambda: kd_loss(s, t, standardize=True),
        lambda: dkd_loss(s, t, torch.zeros(2, dtype=torch.long)),
        lambda: dist_loss(s, t),
    ):
        with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 100\).*num_classes"):
            call()


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_losses_reject_non_positive_temperature(temperature: float) -> None:
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    for call in (
        lambda: kd_loss(s, t, temperature, standardize=True),
        lambda: dkd_loss(s, t, y, temperature=temperature),
        lambda: dist_loss(s, t, temperature=temperature),
    ):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            call()
    for term_cls in (DKDTerm, DISTTerm, KDTerm):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            term_cls(temperature=temperature)


def test_terms_need_teacher_logits() -> None:
    outputs = StepOutputs(student_logits=torch.randn(4, 3), targets=torch.tensor([0, 1, 2, 0]))
    for term in (DKDTerm(), DISTTerm(), KDTerm()):
        with pytest.raises(ValueError, match="needs the teacher's logits"):
            term(outputs)


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        ((2, 4, 4, 4), (2, 6), r"\(2, 4, 4, 4\).*\(2, 6\)"),
        ((2, 4, 4), (2, 6, 4, 4), r"\(2, 4, 4\).*\(2, 6, 4, 4\)"),
        ((3, 4, 4, 4), (2, 6, 4, 4), r"\(3, 4, 4, 4\).*\(2, 6, 4, 4\).*batch size"),
    ],
)
def test_terms_reject_bad_shapes_naming_both(student: tuple, teacher: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VIDTerm("s", "t").build(outputs_of(torch.randn(student), torch.randn(teacher)))
    with pytest.raises(ValueError, match=message):
        OFDTerm("s", "t", margin=[-1.0] * teacher[1]).build(
            outputs_of(torch.randn(student), torch.randn(teacher))
        )


def test_module_builds_vid_and_ofd_adapters_on_a_probe_batch() -> None:
    vid = VIDTerm("2", "2")  # after the ReLU: (N, 16) -> (N, 32)
    ofd = OFDTerm("1", "1", name="ofd")  # the BatchNorm's (pre-ReLU) output, margin from the same BN
    module = DistillationModule(
        small_net(hidden=16), small_net(hidden=32), losses=[CrossEntropyTerm(), vid, ofd]
    )
    batch = (torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    assert ofd.margin is None
    module.build_terms(batch)  # binds the term to the teacher: the margin comes from its BatchNorm
    assert not vid.needs_build and not ofd.needs_build
    torch.testing.assert_close(ofd.margin, margin_from_batchnorm(module.teacher[1]))
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in (*vid.parameters(), *ofd.parameters())} <= trainable
    assert "loss_terms.ofd.margin" in module.state_dict()
    assert "loss_terms.vid.log_scale" in module.state_dict()


def test_vid_and_ofd_losses_run_in_float32_under_bf16_autocast() -> None:
    mean, teacher, student = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    alpha, margin = torch.randn(3), torch.tensor([-0.2, -1.0, -0.6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_vid = vid_loss(mean.bfloat16(), teacher.bfloat16(), alpha)
        got_ofd = ofd_loss(student.bfloat16(), teacher.bfloat16(), margin)
    assert got_vid.dtype == torch.float32 and got_ofd.dtype == torch.float32
    # only the bf16 rounding of the inputs differs: the math itself is float32
    torch.testing.assert_close(got_vid, vid_loss(mean.bfloat16().float(), teacher.bfloat16().float(), alpha))
    torch.testing.assert_close(
        got_ofd, ofd_loss(student.bfloat16().float(), teacher.bfloat16().float(), margin)
    )


def test_vid_and_ofd_terms_give_float32_losses_under_bf16_autocast() -> None:
    vid, ofd = VIDTerm("s", "t"), OFDTerm("s", "t", margin=[-0.5] * 6)
    outputs = outputs_of(torch.randn(4, 4, 4, 4), torch.randn(4, 6, 4, 4))
    vid.build(outputs)
    ofd.build(outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = outputs_of(torch.randn(4, 4, 4, 4).bfloat16(), torch.randn(4, 6, 4, 4).bfloat16())
        assert vid(bf16).dtype == torch.float32 and ofd(bf16).dtype == torch.float32


@pytest.mark.parametrize("weight", [-1.0, -1e-9, float("inf"), float("-inf"), float("nan")])
def test_terms_refuse_negative_or_non_finite_weights_at_construction_and_assignment(weight: float) -> None:
    message = (
        rf"Loss term 'kd': weight must be a finite number >= 0 \(0 switches the term off\), got {weight}"
    )
    with pytest.raises(ValueError, match=message):
        KDTerm("kd", weight=weight)
    term = KDTerm("kd", weight=0.0)  # 0 is legal: the term switched off
    with pytest.raises(ValueError, match=message):
        term.weight = weight
    assert term.weight == 0.0


@pytest.mark.parametrize("temperature", [float("inf"), float("nan")])
def test_terms_and_losses_refuse_non_finite_temperatures_naming_the_value(temperature: float) -> None:
    with pytest.raises(ValueError, match=f"temperature must be > 0 and finite, got {temperature}"):
        KDTerm(temperature=temperature)
    with pytest.raises(ValueError, match=f"temperature must be > 0 and finite, got {temperature}"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature)


@pytest.mark.parametrize(
    ("build", "shown"),
    [
        (
            lambda: DKDTerm(beta=-8.0),
            r"Loss term 'dkd': beta \(the weight of NCKD\) must be a finite number >= 0",
        ),
        (
            lambda: DISTTerm(gamma=float("inf")),
            r"Loss term 'dist': gamma \(the weight of the intra-class part\)",
        ),
        (
            lambda: RKDTerm("0", "0", angle_weight=float("nan")),
            "Loss term 'rkd': angle_weight must be a finite",
        ),
    ],
)
def test_weights_inside_a_term_are_checked_like_its_weight(build: Callable[[], object], shown: str) -> None:
    with pytest.raises(ValueError, match=shown):
        build()
