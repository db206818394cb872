"""select and call_model with keyword (dict) inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd.model_io import call_model, select
from tests.helpers import KeywordEncoder


def test_select_and_call_model_with_keyword_inputs() -> None:
    batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.zeros(2, 3), "labels": torch.zeros(2)}
    picked = select(batch, ["input_ids", "attention_mask"], "input_key")
    assert list(picked) == ["input_ids", "attention_mask"]
    assert select(batch, None, "input_key") is batch
    with pytest.raises(TypeError, match="needs mapping batches"):
        select((torch.ones(1),), ["input_ids"], "input_key")
    with pytest.raises(KeyError, match="keys"):
        select(batch, ["token_type_ids"], "input_key")
    model = KeywordEncoder(nn.Identity())
    assert torch.equal(call_model(model, {"signal": torch.ones(1, 2)})["embedding"], torch.ones(1, 2))
