"""TokenPerplexity and the causal-LM module's val/test metrics weigh every counted token equally."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_kd import CausalLMDistillationModule, TokenCrossEntropyTerm
from lightning_kd.language.metrics import TokenMean, TokenPerplexity
from lightning_kd.models import tiny_gpt2


def test_token_mean_and_perplexity_weigh_batches_by_their_token_counts() -> None:
    mean, perplexity = TokenMean(), TokenPerplexity()
    for value, count in ((1.0, 3), (4.0, 1)):  # a full batch and a short last one
        mean.update(torch.tensor(value), torch.tensor(count))
        perplexity.update(torch.tensor(value), torch.tensor(count))
    assert mean.compute().item() == pytest.approx((1.0 * 3 + 4.0 * 1) / 4)  # not (1 + 4) / 2
    assert perplexity.compute().item() == pytest.approx(math.exp(7 / 4))


def test_module_test_perplexity_is_over_all_counted_tokens_with_a_partial_last_batch() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2(32, n_positions=8, n_layer=1, n_embd=8, n_head=2)
    ids = torch.randint(2, 32, (5, 8))
    mask = torch.ones_like(ids)
    mask[4, 3:] = 0  # the last row is padded: the batches have 14, 14 and 2 counted tokens
    labels = ids.masked_fill(mask == 0, -100)
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": lab}
        for i, m, lab in zip(ids, mask, labels, strict=True)
    ]
    with torch.no_grad():  # expected: exp of the NLL summed over every counted token / their number
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        expected = math.exp(nll.item() / int((targets != -100).sum()))
    module = CausalLMDistillationModule(model, losses=[TokenCrossEntropyTerm("ce")])
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    got = trainer.test(module, dataloaders=loader, verbose=False)[0]
    assert got["test/perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["test/loss"] == pytest.approx(math.log(expected), rel=1e-5)
