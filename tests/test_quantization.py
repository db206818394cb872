"""Quantization: fake quantization, int8 conversion, traceable students, deterministic int8."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, disable_observer

from lightning_kd.callbacks import convert_to_int8, evaluate_int8, prepare_qat
from lightning_kd.models import ConvNet1d
from tests.helpers import NUM_FEATURES, RandomDataModule, mlp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def test_prepare_inserts_fake_quantization_and_fuses_linear_relu() -> None:
    prepared = prepare_qat(mlp(), torch.randn(4, NUM_FEATURES))
    kinds = {type(m).__name__ for m in prepared.modules()}
    assert any(isinstance(m, FakeQuantizeBase) for m in prepared.modules())
    assert "LinearReLU" in kinds  # torch.ao.nn.intrinsic.qat: Linear + ReLU fused
    assert not any(type(m) is nn.Linear for m in prepared.modules())  # every Linear is a QAT Linear
    assert "features.2" not in dict(prepared.named_modules())  # the fused ReLU is gone


def test_int8_student_matches_the_fake_quantized_student() -> None:
    """After QAT steps, int8 outputs equal the fake-quant float outputs to within a few output steps.

    Both round the same values to the same grids; they differ where the int8 kernel's integer
    requantization rounds a value near a half-step the other way than fp32 fake quantization:
    that activation moves by one step, and a hidden activation's step reaches the logits through
    the next layer's weights. Measured here: max |difference| = 2.0 output steps (the last layer's
    scale), top-1 agreement 1.0; we allow 3 steps and 95% agreement. (With torch.ao's 7-bit
    activations, ``reduce_range=True``, the difference grows with training, see ``qat_qconfig_mapping``.)
    """
    datamodule = RandomDataModule(n=256)
    prepared = prepare_qat(mlp(), datamodule.x[:16])
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    for _ in range(3):
        for inputs, targets in datamodule.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(prepared(inputs), targets).backward()
            optimizer.step()
    prepared.eval().apply(disable_observer)
    int8 = convert_to_int8(prepared)
    quantized_kinds = {type(m).__module__ for m in int8.modules()}
    assert "torch.ao.nn.intrinsic.quantized.modules.linear_relu" in quantized_kinds
    assert int8.classifier.weight().dtype == torch.qint8
    with torch.no_grad():
        reference, output = prepared(datamodule.x), int8(datamodule.x)
    step = float(prepared.activation_post_process_2.scale)  # the classifier output's quantization step
    assert (reference - output).abs().max().item() <= 3 * step
    assert evaluate_int8(int8, [(datamodule.x, None)], prepared)["agreement"] >= 0.95
    assert (reference - output).abs().max().item() > 0  # really integer arithmetic, not the float model


def test_convnet1d_is_a_traceable_student() -> None:
    x = torch.randn(4, 40)
    model = ConvNet1d()
    assert torch.equal(model(x), model(x.unsqueeze(1)))  # (N, L) is read as one channel
    prepared = prepare_qat(model, x)
    assert any(isinstance(m, FakeQuantizeBase) for m in prepared.modules())
    assert prepared(x).shape == (4, 10)


def test_int8_runs_under_deterministic_algorithms_and_restores_the_setting() -> None:
    """Trainer(deterministic=True) turns on torch.use_deterministic_algorithms; int8 kernels lack it."""
    datamodule = RandomDataModule(n=32)
    prepared = prepare_qat(mlp(), datamodule.x[:16])
    prepared(datamodule.x)  # the observers see data once
    prepared.eval().apply(disable_observer)
    torch.use_deterministic_algorithms(True)
    try:
        int8 = convert_to_int8(prepared)
        result = evaluate_int8(int8, [(datamodule.x, datamodule.y)], prepared)
        assert 0.0 <= result["acc"] <= 1.0 and result["agreement"] >= 0.9
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
