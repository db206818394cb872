"""batch_checks: class targets, logit shapes, probabilities given as logits, shared models, forward errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.batch_checks import (
    check_logits,
    check_separate,
    class_indices,
    class_targets,
    explain_forward_error,
    warn_if_probabilities,
)
from tests.helpers import small_net


def test_class_indices_of_any_integer_dtype_or_a_column_become_int64() -> None:
    labels = torch.tensor([0, 3, 1, 2])
    for given in (labels.int(), labels.to(torch.uint8), labels[:, None], labels.short()):
        out = class_targets(given, 4, "training", read_values=True)
        assert out.dtype == torch.int64 and torch.equal(out, labels)
    assert torch.equal(class_targets(torch.tensor([True, False]), 2, "training", True), torch.tensor([1, 0]))


def test_probability_targets_stay_probabilities_in_float32() -> None:
    one_hot = F.one_hot(torch.tensor([2, 0, 1]), 3)
    assert torch.equal(class_targets(one_hot, 3, "training", True), one_hot.float())  # int64 one-hot rows
    smoothed = (0.9 * one_hot + 0.1 / 3).double()
    out = class_targets(smoothed, 3, "training", True)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), smoothed)
    assert torch.equal(class_indices(out), torch.tensor([2, 0, 1]))


def test_values_are_read_only_when_asked() -> None:
    """On an accelerator the values are read at the first batch only: shapes and dtypes still are checked."""
    out_of_range, not_probabilities = torch.tensor([0, 7]), torch.tensor([[0.5, 0.9], [1.0, 0.0]])
    assert torch.equal(class_targets(out_of_range, 4, "training", read_values=False), out_of_range)
    assert class_targets(not_probabilities, 2, "training", read_values=False) is not None
    with pytest.raises(ValueError, match=r"Label 7 in a training batch is outside \[0, num_classes\)"):
        class_targets(out_of_range, 4, "training", read_values=True)
    with pytest.raises(ValueError, match=r"a row \[0\.5, 0\.9\] sums to 1\.4 "):
        class_targets(not_probabilities, 2, "training", read_values=True)
    with pytest.raises(ValueError, match=r"torch\.float32 of shape \(2,\) with integral values"):
        class_targets(out_of_range.float(), 4, "training", read_values=False)


def test_labels_that_are_not_a_tensor_name_the_fix() -> None:
    with pytest.raises(TypeError, match=r"The test labels are a list, not a tensor: return class indices"):
        class_targets([0, 1], 2, "test", read_values=True)


def test_logits_of_any_leading_shape_with_the_class_dimension_last_pass() -> None:
    check_logits(torch.zeros(2, 5, 3), "student", 3)  # e.g. one prediction per token
    with pytest.raises(
        ValueError, match=r"The student's output has shape \(2, 5\): expected \(N, C\) logits"
    ):
        check_logits(torch.zeros(2, 5), "student", 3)


def test_only_probability_rows_warn() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 10, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for candidate in (logits, 0.01 * logits, logits.log_softmax(dim=-1), logits.sigmoid()):
            assert not warn_if_probabilities(candidate, "teacher")
    with pytest.warns(UserWarning, match=r"The teacher's outputs are probabilities"):
        assert warn_if_probabilities(logits.softmax(dim=-1), "teacher")


def test_separate_models_pass_and_tied_ones_do_not() -> None:
    check_separate({"student": small_net(), "teacher": small_net(), "other": None}, "why")
    net = small_net()
    with pytest.raises(ValueError, match=r"The a and the b share the parameter '1\.weight': why\. Give each"):
        check_separate({"a": net, "b": nn.Sequential(nn.Identity(), net[0])}, "why")


def test_forward_errors_of_other_causes_are_left_alone() -> None:
    net = small_net()
    unrelated = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 8x16)")
    assert explain_forward_error(unrelated, [("student", net, torch.zeros(2, 5))]) is None
    dtype_error = RuntimeError("mat1 and mat2 must have the same dtype, but got Double and Float")
    assert explain_forward_error(dtype_error, [("student", net, torch.zeros(2, 8))]) is None  # inputs fine
    explained = explain_forward_error(dtype_error, [("student", net, torch.zeros(2, 8, dtype=torch.float64))])
    assert isinstance(explained, TypeError) and "torch.float64 but its weights are torch.float32" in str(
        explained
    )
