"""ReviewKD: HCL against an independent float64 computation, the ABF fusion, and the review chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_kd import ReviewKDTerm, StepOutputs
from lightning_kd.losses import ABF
from lightning_kd.losses.functional import hcl_loss
from tests.helpers import step


def pool(x: np.ndarray, size: int) -> np.ndarray:
    """Average pooling of an (N, C, *spatial) array to ``size`` per spatial dimension (sizes divisible)."""
    n, c, *spatial = x.shape
    blocks: list[int] = []
    for extent in spatial:
        assert extent % size == 0
        blocks += [size, extent // size]
    windows = x.reshape(n, c, *blocks)
    return windows.mean(axis=tuple(range(3, 3 + 2 * len(spatial), 2)))


def reference_hcl(students: list[np.ndarray], teachers: list[np.ndarray]) -> float:
    """Sum over pairs of (mse + sum_k 2^-k mse(pool_l_k)) / (1 + sum_k 2^-k), l_k < size in (4, 2, 1)."""
    total = 0.0
    for s, t in zip(students, teachers, strict=True):
        s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
        levels = [size for size in (4, 2, 1) if size < min(s.shape[2:])]
        weights = [1.0] + [0.5 ** (k + 1) for k in range(len(levels))]
        errors = [np.mean((s - t) ** 2)] + [np.mean((pool(s, size) - pool(t, size)) ** 2) for size in levels]
        total += sum(w * e for w, e in zip(weights, errors, strict=True)) / sum(weights)
    return float(total)


def tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


SHAPES = [
    (2, 3, 8, 8),  # levels 4, 2, 1
    (2, 4, 4, 4),  # levels 2, 1
    (2, 2, 2, 2),  # level 1
    (2, 5, 1, 1),  # the pooled feature: plain MSE
    (2, 3, 8, 4),  # not square: levels below both sizes (2, 1)
    (2, 3, 16),  # 1-D: levels 4, 2, 1
    (2, 3, 4),  # 1-D: levels 2, 1
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_hcl_matches_numpy_per_pair(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=shape), rng.normal(size=shape)
    got = hcl_loss(tensors(s), tensors(t))
    assert got.ndim == 0
    assert got.item() == pytest.approx(reference_hcl([s], [t]), rel=1e-5)


def test_hcl_sums_over_pairs_with_the_authors_weights() -> None:
    rng = np.random.default_rng(1)
    shapes = [(3, 2, 8, 8), (3, 4, 4, 4), (3, 6, 1, 1)]
    students = [rng.normal(size=shape) for shape in shapes]
    teachers = [rng.normal(size=shape) for shape in shapes]
    got = hcl_loss(tensors(*students), tensors(*teachers))
    assert got.item() == pytest.approx(reference_hcl(students, teachers), rel=1e-5)
    # spelled out for the 8x8 map: full map 1, then 1/2, 1/4, 1/8 for the 4x4, 2x2, 1x1 levels
    s, t = students[0], teachers[0]
    errors = [np.mean((s - t) ** 2)] + [np.mean((pool(s, size) - pool(t, size)) ** 2) for size in (4, 2, 1)]
    expected = (errors[0] + errors[1] / 2 + errors[2] / 4 + errors[3] / 8) / 1.875
    assert hcl_loss(tensors(s), tensors(t)).item() == pytest.approx(expected, rel=1e-5)


def test_hcl_is_zero_for_equal_maps_and_gives_gradients() -> None:
    maps = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 10)]
    assert hcl_loss(maps, [m.clone() for m in maps]).item() == 0.0
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    hcl_loss([student], [torch.randn(2, 3, 8, 8)]).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_hcl_runs_in_float32_under_bf16_autocast() -> None:
    students = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 1, 1)]
    teachers = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 1, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hcl_loss([s.bfloat16() for s in students], [t.bfloat16() for t in teachers])
    assert got.dtype == torch.float32
    rounded = hcl_loss([s.bfloat16().float() for s in students], [t.bfloat16().float() for t in teachers])
    torch.testing.assert_close(got, rounded)


def test_hcl_rejects_bad_pairs_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*\(2, 4, 8, 8\)"):
        hcl_loss([torch.randn(2, 3, 8, 8)], [torch.randn(2, 4, 8, 8)])
    with pytest.raises(ValueError, match=r"\(2, 3, 8\).*\(2, 3, 4\)"):
        hcl_loss([torch.randn(2, 3, 8)], [torch.randn(2, 3, 4)])
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 3\).*\(N, C, H, W\)"):
        hcl_loss([torch.randn(2, 3)], [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="2 student and 1 teacher maps"):
        hcl_loss([torch.randn(2, 3, 4, 4)] * 2, [torch.randn(2, 3, 4, 4)])
    with pytest.raises(ValueError, match="at least one pair"):
        hcl_loss([], [])


def test_abf_shapes_with_and_without_residual_2d() -> None:
    fusing = ABF(6, 4, 5, fuse=True)
    output, residual = fusing(torch.randn(2, 6, 8, 8), torch.randn(2, 4, 4, 4), out_size=(16, 16))
    assert output.shape == (2, 5, 16, 16) and residual.shape == (2, 4, 16, 16)
    output, residual = fusing(torch.randn(2, 6, 8, 8), torch.randn(2, 4, 1, 1))
    assert output.shape == (2, 5, 8, 8) and residual.shape == (2, 4, 8, 8)
    deepest = ABF(6, 4, 5, fuse=False)
    assert deepest.att_conv is None
    output, residual = deepest(torch.randn(2, 6, 1, 1), out_size=(1, 1))
    assert output.shape == (2, 5, 1, 1) and residual.shape == (2, 4, 1, 1)


def test_abf_shapes_with_and_without_residual_1d() -> None:
    fusing = ABF(6, 4, 5, fuse=True, spatial_dims=1)
    assert isinstance(fusing.conv1[0], torch.nn.Conv1d) and isinstance(fusing.conv2[1], torch.nn.BatchNorm1d)
    output, residual = fusing(torch.randn(2, 6, 10), torch.randn(2, 4, 5), out_size=(20,))
    assert output.shape == (2, 5, 20) and residual.shape == (2, 4, 20)
    output, residual = ABF(6, 4, 5, fuse=False, spatial_dims=1)(torch.randn(2, 6, 1))
    assert output.shape == (2, 5, 1) and residual.shape == (2, 4, 1)


def test_abf_fuses_by_attention_with_the_nearest_upsampled_residual() -> None:
    abf = ABF(3, 2, 4, fuse=True).eval()
    torch.nn.init.zeros_(abf.att_conv[0].weight)
    torch.nn.init.zeros_(abf.att_conv[0].bias)  # sigmoid(0): both attention maps 1/2
    x, deeper = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)
    _, residual = abf(x, deeper)
    upsampled = deeper.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(residual, 0.5 * abf.conv1(x) + 0.5 * upsampled)


def test_abf_rejects_a_missing_or_unexpected_residual_and_wrong_ranks() -> None:
    with pytest.raises(ValueError, match="pass `residual`"):
        ABF(3, 2, 4, fuse=True)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="takes no residual"):
        ABF(3, 2, 4, fuse=False)(torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, L\).*\(2, 3, 4, 4\)"):
        ABF(3, 2, 4, fuse=False, spatial_dims=1)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        ABF(3, 2, 4, fuse=False, spatial_dims=3)


def image_levels(requires_grad: bool = False) -> StepOutputs:
    """Three stages: 8x8 (student 4x4, resized to the teacher's 8x8), 4x4, and pooled vectors."""
    student = {"s1": torch.randn(4, 3, 4, 4), "s2": torch.randn(4, 6, 4, 4), "s3": torch.randn(4, 8)}
    teacher = {"t1": torch.randn(4, 5, 8, 8), "t2": torch.randn(4, 7, 4, 4), "t3": torch.randn(4, 9)}
    for feature in [*student.values(), *teacher.values()]:
        feature.requires_grad_(requires_grad)
    return step(student, teacher)


def test_term_builds_one_abf_per_level_from_the_probe() -> None:
    term = ReviewKDTerm(["s1", "s2", "s3"], ["t1", "t2", "t3"])
    assert term.student_layers == ("s1", "s2", "s3") and term.teacher_layers == ("t1", "t2", "t3")
    assert term.needs_build
    term.build(image_levels())
    assert not term.needs_build and term.abfs is not None and len(term.abfs) == 3
    # width min(512, 8): the student's deepest channels; channels to the teacher's at each level
    for abf, (c_in, c_out) in zip(term.abfs, [(3, 5), (6, 7), (8, 9)], strict=True):
        assert isinstance(abf.conv1[0], torch.nn.Conv2d)
        assert (abf.conv1[0].in_channels, abf.conv1[0].out_channels) == (c_in, 8)
        assert (abf.conv2[0].in_channels, abf.conv2[0].out_channels) == (8, c_out)
    assert [abf.att_conv is not None for abf in term.abfs] == [True, True, False]
    wide = ReviewKDTerm(["s1", "s2", "s3"], ["t1", "t2", "t3"], mid_channels=16)
    wide.build(image_levels())
    assert all(abf.conv1[0].out_channels == 16 for abf in wide.abfs)


def test_term_runs_the_review_chain_from_deep_to_shallow() -> None:
    term = ReviewKDTerm(["s1", "s2", "s3"], ["t1", "t2", "t3"])
    outputs = image_levels()
    term.build(outputs)
    s, t = outputs.student_features, outputs.teacher_features
    deepest, residual = term.abfs[2](s["s3"].reshape(4, 8, 1, 1), out_size=(1, 1))
    middle, residual = term.abfs[1](s["s2"], residual, out_size=(4, 4))
    shallow, _ = term.abfs[0](s["s1"], residual, out_size=(8, 8))
    assert shallow.shape == (4, 5, 8, 8)
    expected = hcl_loss([shallow, middle, deepest], [t["t1"], t["t2"], t["t3"].reshape(4, 9, 1, 1)])
    torch.testing.assert_close(term(outputs), expected)


def test_gradients_reach_student_features_and_abfs_never_the_teacher() -> None:
    term = ReviewKDTerm(["s1", "s2", "s3"], ["t1", "t2", "t3"])
    outputs = image_levels(requires_grad=True)
    term.build(outputs)
    loss = term(outputs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in outputs.student_features.values())
    assert all(f.grad is None for f in outputs.teacher_features.values())
    assert all(p.grad is not None for p in term.abfs.parameters())


def test_term_on_sequences_views_vectors_as_length_one() -> None:
    student = {"a": torch.randn(4, 3, 20), "b": torch.randn(4, 6, 10), "v": torch.randn(4, 8)}
    teacher = {"a": torch.randn(4, 5, 20), "b": torch.randn(4, 7, 10), "v": torch.randn(4, 9)}
    for feature in student.values():
        feature.requires_grad_(True)
    term = ReviewKDTerm(["a", "b", "v"], ["a", "b", "v"])
    outputs = step(student, teacher)
    term.build(outputs)
    assert all(isinstance(abf.conv2[0], torch.nn.Conv1d) for abf in term.abfs)
    term(outputs).backward()
    assert all(f.grad is not None for f in student.values())


def test_term_under_bf16_autocast_gives_a_float32_loss() -> None:
    term = ReviewKDTerm(["s1", "s2", "s3"], ["t1", "t2", "t3"])
    outputs = image_levels()
    term.build(outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = term(outputs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_term_rejects_mismatched_layer_counts() -> None:
    with pytest.raises(ValueError, match=r"2 student layers \['a', 'b'\] and 1 teacher layers \['c'\]"):
        ReviewKDTerm(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="at least one"):
        ReviewKDTerm([], [])
    with pytest.raises(TypeError, match="not single strings"):
        ReviewKDTerm("a", "b")
    with pytest.raises(ValueError, match="mid_channels"):
        ReviewKDTerm(["a"], ["b"], mid_channels=0)


def test_term_rejects_shapes_that_cannot_be_fused() -> None:
    term = ReviewKDTerm(["a", "b"], ["a", "b"])
    mixed = step(
        {"a": torch.randn(4, 3, 8, 8), "b": torch.randn(4, 6, 4, 4)},
        {"a": torch.randn(4, 5, 8), "b": torch.randn(4, 7, 4, 4)},
    )
    with pytest.raises(ValueError, match=r"cannot be fused.*\(4, 3, 8, 8\).*\(4, 5, 8\)"):
        term.build(mixed)
    bad_rank = step(
        {"a": torch.randn(4, 3, 8, 8, 2), "b": torch.randn(4, 6, 4, 4)},
        {"a": torch.randn(4, 5, 8, 8), "b": torch.randn(4, 7, 4, 4)},
    )
    with pytest.raises(ValueError, match=r"\(4, 3, 8, 8, 2\)"):
        term.build(bad_rank)
    batch = step(
        {"a": torch.randn(4, 3, 8, 8), "b": torch.randn(4, 6, 4, 4)},
        {"a": torch.randn(5, 5, 8, 8), "b": torch.randn(5, 7, 4, 4)},
    )
    with pytest.raises(ValueError, match="batch size"):
        term.build(batch)
    assert term.needs_build


def test_term_before_build_and_without_captured_layers() -> None:
    term = ReviewKDTerm(["s1", "s2", "s3"], ["t1", "t2", "t3"])
    with pytest.raises(RuntimeError, match="no ABFs yet"):
        term(image_levels())
    with pytest.raises(KeyError, match="'missing'"):
        ReviewKDTerm(["s1", "missing"], ["t1", "t2"]).build(image_levels())
