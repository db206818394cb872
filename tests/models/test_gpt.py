"""tiny_gpt2: named sizes, parameter counts by formula, dropout, overrides and bad shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd.callbacks.report.compression import count_parameters  # noqa: E402
from lightning_kd.models import GPT2_SIZES, tiny_gpt2  # noqa: E402


def gpt2_parameters(vocab: int, positions: int, layers: int, width: int) -> int:
    """GPT-2 by hand: token + position embeddings, per block 2 layer norms, attention (qkv + output)
    and a 4x MLP, a final layer norm; the output head is tied to the token embedding."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width)
    block += (4 * width * width + 4 * width) + (4 * width * width + width)
    return vocab * width + positions * width + layers * block + 2 * width


@pytest.mark.parametrize("size", sorted(GPT2_SIZES))
def test_named_sizes_have_the_parameters_of_the_formula(size: str) -> None:
    shape = GPT2_SIZES[size]
    model = tiny_gpt2(4096, size, n_positions=128)
    assert count_parameters(model) == gpt2_parameters(4096, 128, shape["n_layer"], shape["n_embd"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_the_teacher_is_four_to_ten_times_the_student() -> None:
    teacher, student = tiny_gpt2(4096, "teacher"), tiny_gpt2(4096, "student")
    assert 1e6 < count_parameters(teacher) < 3e6
    assert 4 < count_parameters(teacher) / count_parameters(student) < 10


def test_overrides_dropout_special_ids_and_the_forward() -> None:
    model = tiny_gpt2(300, "teacher", n_positions=16, dropout=0.25, n_layer=1, n_embd=32, n_head=4)
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (1, 32, 4, 16)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.25
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (0, 0, 1)
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.masked_fill(torch.arange(16) >= 12, -100)
    output = model(input_ids=ids, labels=labels)
    assert output.logits.shape == (2, 16, 300) and torch.isfinite(output.loss)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Unknown size 'huge'; pick one of \['student', 'teacher'\]"):
        tiny_gpt2(300, "huge")
    with pytest.raises(ValueError, match="n_embd=30 must be a multiple of n_head=4"):
        tiny_gpt2(300, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        tiny_gpt2(300, dropout=1.0)
