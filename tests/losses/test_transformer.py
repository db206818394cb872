"""TinyBERT/MiniLM losses: hidden states, attention maps, value relations, masks, a narrow student."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd.losses import (  # noqa: E402
    AttentionMapTerm,
    EmbeddingMatchTerm,
    HiddenStateTerm,
    StepOutputs,
    ValueRelationTerm,
)
from lightning_kd.losses import functional as F  # noqa: E402
from lightning_kd.losses.transformer import uniform_mapping  # noqa: E402
from lightning_kd.models import small_bert_encoder  # noqa: E402
from lightning_kd.paradigms import EmbeddingDistillationModule  # noqa: E402
from tests.helpers import KEYS, VOCAB, make_trainer, tiny_bert, token_batch  # noqa: E402


def masked_kl_rows_float64(teacher: Tensor, student: Tensor, mask: Tensor) -> float:
    """Mean over heads and real queries of sum_k p log(p / q) over real keys, by explicit loops."""
    total, rows = 0.0, 0
    for n in range(teacher.shape[0]):
        real = [i for i in range(teacher.shape[-1]) if mask[n, i]]
        for h in range(teacher.shape[1]):
            for q in real:
                p = [float(teacher[n, h, q, k]) for k in real]
                s = [float(student[n, h, q, k]) for k in real]
                total += sum(pk * math.log(pk / sk) for pk, sk in zip(p, s, strict=True) if pk > 0)
                rows += 1
    return total / rows


def test_hidden_state_loss_by_hand_ignores_padding() -> None:
    student = torch.zeros(2, 3, 4)
    teacher = torch.ones(2, 3, 4)
    teacher[1, 2] = float("nan")  # a padded position may hold anything
    student[0, 2] = 1e6
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert F.hidden_state_loss(student, teacher, mask).item() == pytest.approx(1.0)
    teacher[0, 0] = 3.0  # that token's mean squared error becomes 9; the other 3 real tokens keep 1
    assert F.hidden_state_loss(student, teacher, mask).item() == pytest.approx((9 + 1 + 1 + 1) / 4)


def test_hidden_state_loss_matches_float64_loop() -> None:
    student, teacher = torch.randn(3, 5, 6), torch.randn(3, 5, 6)
    mask = token_batch(3, 5)["attention_mask"]
    errors = [
        float(((student[n, t].double() - teacher[n, t].double()) ** 2).mean())
        for n in range(3)
        for t in range(5)
        if mask[n, t]
    ]
    assert F.hidden_state_loss(student, teacher, mask).item() == pytest.approx(
        sum(errors) / len(errors), rel=1e-5
    )


def test_attention_kl_by_hand() -> None:
    teacher = torch.tensor([[[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]]])
    student = torch.tensor([[[[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]]])
    mask = torch.tensor([[1, 1, 0]])
    # query 0: 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25); query 1: 0; query 2 is padding
    expected = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)) / 2
    assert F.attention_kl_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)


def test_attention_kl_matches_float64_loop_and_has_finite_gradients() -> None:
    batch = token_batch(3, 6)
    mask = batch["attention_mask"]
    key_bias = torch.where(mask.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    teacher = (torch.randn(3, 2, 6, 6) * 2 + key_bias).softmax(-1)
    scores = torch.randn(3, 2, 6, 6, requires_grad=True)
    student = (scores + key_bias).softmax(-1)
    loss = F.attention_kl_loss(student, teacher, mask)
    assert loss.item() == pytest.approx(masked_kl_rows_float64(teacher, student.detach(), mask), rel=1e-5)
    loss.backward()
    assert torch.isfinite(scores.grad).all()


def test_value_relation_loss_matches_float64_loop_with_different_widths() -> None:
    batch = token_batch(2, 5)
    mask = batch["attention_mask"]
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 12)

    def relations(values: Tensor, heads: int) -> Tensor:  # (N, H, L, L), padded keys at probability 0
        out = torch.zeros(values.shape[0], heads, 5, 5, dtype=torch.float64)
        d = values.shape[-1] // heads
        for n in range(values.shape[0]):
            real = [i for i in range(5) if mask[n, i]]
            for h in range(heads):
                v = values[n, real, h * d : (h + 1) * d].double()
                out[n, h][torch.tensor(real)[:, None], torch.tensor(real)[None, :]] = (
                    v @ v.T / math.sqrt(d)
                ).softmax(-1)
        return out

    expected = masked_kl_rows_float64(relations(teacher, 4), relations(student, 4), mask)
    assert F.value_relation_loss(student, teacher, 4, mask).item() == pytest.approx(expected, rel=1e-5)
    assert F.value_relation_loss(teacher, teacher, 4, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_transformer_losses_reject_bad_input_with_the_fix() -> None:
    with pytest.raises(ValueError, match="same number of attention heads"):
        F.attention_kl_loss(torch.rand(1, 2, 3, 3), torch.rand(1, 4, 3, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        F.hidden_state_loss(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        F.hidden_state_loss(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="must divide"):
        F.value_relation_loss(torch.rand(1, 3, 6), torch.rand(1, 3, 8), num_heads=4)


def test_uniform_mapping_is_tinyberts() -> None:
    assert uniform_mapping(2, 6) == [(0, 0), (1, 3), (2, 6)]
    assert uniform_mapping(4, 12) == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]


def test_terms_name_the_missing_flag() -> None:
    student, teacher = tiny_bert(), tiny_bert()
    batch = token_batch()
    outputs = StepOutputs(
        student_logits=torch.zeros(4, 16),
        batch=batch,
        student_output=student(**batch),
        teacher_output=teacher(**batch),
    )
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        HiddenStateTerm().build(outputs)
    with pytest.raises(ValueError, match="eager"):
        AttentionMapTerm()(outputs)
    outputs.batch = {"input_ids": batch["input_ids"]}
    with pytest.raises(KeyError, match="mask_key"):
        AttentionMapTerm(mask_key="attention_mask")(
            StepOutputs(
                student_logits=torch.zeros(4, 16),
                batch=outputs.batch,
                student_output={"attentions": (torch.rand(4, 2, 7, 7),)},
                teacher_output={"attentions": (torch.rand(4, 2, 7, 7),)},
            )
        )


def test_attention_term_averages_heads_for_a_student_with_fewer_heads() -> None:
    batch = token_batch()
    key_bias = torch.where(batch["attention_mask"].bool(), 0.0, torch.finfo(torch.float32).min)[
        :, None, None, :
    ]
    student_maps = ((torch.randn(4, 1, 7, 7) * 2 + key_bias).softmax(-1),)
    teacher_maps = ((torch.randn(4, 4, 7, 7) * 2 + key_bias).softmax(-1),)
    outputs = StepOutputs(
        student_logits=torch.zeros(4, 8),
        batch=batch,
        student_output={"attentions": student_maps},
        teacher_output={"attentions": teacher_maps},
    )
    with pytest.raises(ValueError, match="num_attention_heads"):
        AttentionMapTerm()(outputs)
    value = AttentionMapTerm(average_heads=True)(outputs)
    expected = masked_kl_rows_float64(
        teacher_maps[0].mean(1, keepdim=True), student_maps[0], batch["attention_mask"]
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert value.item() > 0.05


def sentence_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    batch = token_batch(n, 7, seed=1)
    items = [{key: value[i] for key, value in batch.items()} for i in range(n)]
    return DataLoader(items, batch_size=batch_size)


def test_narrow_student_learns_from_hidden_states_attention_and_value_relations() -> None:
    """A 2-layer width-8 student of a 4-layer width-16 teacher: projection built, every term trains."""
    teacher = tiny_bert(hidden=16, layers=4, heads=2, output_hidden_states=True, output_attentions=True)
    student = small_bert_encoder(
        hidden_size=8, num_layers=2, num_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
        projection_dim=16, output_hidden_states=True, output_attentions=True,
    )  # fmt: skip
    losses = [
        EmbeddingMatchTerm("embedding"),
        HiddenStateTerm("hidden"),
        AttentionMapTerm("attention"),
        ValueRelationTerm(
            "model.encoder.layer.1.attention.self.value", "model.encoder.layer.3.attention.self.value"
        ),
    ]
    module = EmbeddingDistillationModule(student, teacher, losses=losses, input_key=KEYS, cosine_decay=False)
    module.build_terms(next(iter(sentence_loader())))
    hidden, relation = module.loss_terms["hidden"], module.loss_terms["value_relation"]
    assert isinstance(hidden.projection, nn.Linear) and hidden.projection.in_features == 8
    assert relation.num_heads == 2  # the teacher's
    before = hidden.projection.weight.detach().clone()
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=sentence_loader(), val_dataloaders=sentence_loader())
    assert not torch.equal(before, hidden.projection.weight)
    for name in ("embedding", "hidden", "attention", "value_relation"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss_{name}"]), name
    assert "val/cosine" in trainer.callback_metrics
