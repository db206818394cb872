"""CausalLMDistillationModule: the shifted token view, the fused LM-head path, metrics, terms, bf16, YAML."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lightning_kd import AttentionMapTerm, HiddenStateTerm
from lightning_kd.cli import main
from lightning_kd.language import CausalLMDistillationModule
from lightning_kd.losses import LossTerm, StepOutputs, TokenCrossEntropyTerm, TokenDivergenceTerm
from tests.helpers import make_trainer
from tests.language.helpers import (
    FusedTokenKL,
    RandomTokenData,
    TinyLM,
    TokenCE,
    TokenKL,
    tiny_gpt2,
    tiny_llama,
    token_loader,
    token_samples,
)

X = -100


def distiller(
    student: nn.Module | None = None, teacher: nn.Module | None = None, **kwargs: Any
) -> CausalLMDistillationModule:
    kwargs.setdefault("losses", [TokenCE("ce"), TokenKL("kd")])
    kwargs.setdefault("cosine_decay", False)
    student = student if student is not None else tiny_gpt2(16)
    return CausalLMDistillationModule(
        student, teacher if teacher is not None else tiny_gpt2(32, seed=1), **kwargs
    )


class Record(LossTerm):
    """Keeps the token view of each step; contributes 0."""

    needs_teacher = False

    def __init__(self) -> None:
        super().__init__("record")
        self.seen: list[Any] = []

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        self.seen.append(outputs.tokens)
        return outputs.tokens.student_logits.sum() * 0.0


def test_models_are_called_without_labels_and_the_view_is_shifted_once() -> None:
    record = Record()
    module = distiller(losses=[record, TokenKL("kd")])
    calls: list[set[str]] = []
    for model in (module.student, module.teacher):
        model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(set(kwargs)), with_kwargs=True)
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [4, 3, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[X, X, 7, 8, 9], [X, 3, 2, X, X]]),
    }
    expected = tiny_gpt2(16)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    make_trainer(limit_train_batches=1).fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert calls == [{"input_ids", "attention_mask"}] * 2  # teacher, student: no labels
    tokens = record.seen[0]
    assert torch.equal(tokens.mask, torch.tensor([[False, True, True, True], [True, True, False, False]]))
    assert torch.equal(tokens.targets, torch.tensor([[X, 7, 8, 9], [3, 2, X, X]]))
    torch.testing.assert_close(tokens.student_logits, expected[:, :-1])
    assert tokens.vocab_size == 48 and tokens.teacher_logits.shape == (2, 4, 48)
    assert tokens.student_hidden is None and tokens.student_head is None  # the plain path


def test_validation_metrics_are_token_means_over_the_whole_epoch() -> None:
    module = distiller()
    data = RandomTokenData(samples=8, batch_size=4)  # 2 validation batches of different token counts
    trainer = make_trainer(limit_train_batches=2)
    trainer.fit(module, datamodule=data)
    ce_sum = teacher_sum = agreed = counted = 0.0
    with torch.no_grad():
        for batch in data.val_dataloader():
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            student = module.student(**inputs).logits[:, :-1].double()
            teacher = module.teacher(**inputs).logits[:, :-1].double()
            targets = batch["labels"][:, 1:]
            mask = targets != X
            ce_sum += float(F.cross_entropy(student[mask], targets[mask], reduction="sum"))
            teacher_sum += float(F.cross_entropy(teacher[mask], targets[mask], reduction="sum"))
            agreed += float((student.argmax(-1) == teacher.argmax(-1))[mask].sum())
            counted += float(mask.sum())
    metrics = trainer.callback_metrics
    assert math.isclose(float(metrics["val/loss"]), ce_sum / counted, rel_tol=1e-5)
    assert math.isclose(float(metrics["val/perplexity"]), math.exp(ce_sum / counted), rel_tol=1e-5)
    assert math.isclose(
        float(metrics["val/teacher_perplexity"]), math.exp(teacher_sum / counted), rel_tol=1e-5
    )
    assert math.isclose(float(metrics["val/agreement"]), agreed / counted, rel_tol=1e-6)
    for key in ("train/loss_ce", "train/loss_kd", "train/loss"):
        assert torch.isfinite(metrics[key]), key


def test_a_student_without_teacher_trains_on_next_tokens() -> None:
    module = CausalLMDistillationModule(tiny_gpt2(16), losses=[TokenCE("ce")])
    trainer = make_trainer(limit_train_batches=2)
    trainer.fit(module, datamodule=RandomTokenData(samples=8))
    assert (
        "val/perplexity" in trainer.callback_metrics
        and "val/teacher_perplexity" not in trainer.callback_metrics
    )


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_fused_path_trains_as_the_plain_path_without_the_students_full_logits(build: Any) -> None:
    weights = []
    for path in ("plain", "chunked", "fused"):
        terms = [
            TokenCrossEntropyTerm("ce", weight=0.5, path=path),
            TokenDivergenceTerm("kd", weight=0.5, divergence="jsd", path=path, chunk_size=8),
        ]
        module = distiller(build(16), build(32, seed=1), losses=terms)
        heads: list[tuple[int, ...]] = []
        module.student.get_output_embeddings().register_forward_hook(
            lambda _, args, out, keep=heads.append: keep(args[0].shape)
        )
        make_trainer(limit_train_batches=2, limit_val_batches=0).fit(
            module, datamodule=RandomTokenData(samples=8)
        )
        weights.append(dict(module.student.named_parameters()))
        if path == "fused":  # only the first batch's check ran the head: 1 sequence, 8 tokens
            assert heads == [(1, 8, 16)]
        else:
            assert [shape[0] for shape in heads] == [4, 4]
    for other in weights[1:]:
        for name, value in weights[0].items():
            torch.testing.assert_close(other[name], value, rtol=0, atol=1e-6, msg=name)


class ScaledGPT2(transformers.GPT2LMHeadModel):
    """A GPT-2 whose logits are twice its head's output (as models that scale or soft-cap them)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)
        output.logits = 2 * output.logits
        return output


def test_fused_path_refuses_a_model_whose_logits_are_not_its_heads_output() -> None:
    student = ScaledGPT2(tiny_gpt2(16).config)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    module = distiller(student, losses=[FusedTokenKL("kd")])
    message = (
        r"The student \(ScaledGPT2\) does not compute its logits as get_output_embeddings\(\) of its last "
        r"hidden state: on 8 tokens they differ by up to \S+ \(largest logit \S+\)\. It soft-caps, scales "
        r"or post-processes its logits, so terms on the fused LM-head path \(reads_hidden_states\) would "
        r"train another objective: give them path='plain' or path='chunked'\."
    )
    with pytest.raises(ValueError, match=message):
        make_trainer(limit_train_batches=1).fit(module, datamodule=RandomTokenData(samples=4))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in initial.items())  # no step was taken
    plain = distiller(
        ScaledGPT2(tiny_gpt2(16).config), losses=[TokenKL("kd")]
    )  # the plain path reads the logits
    make_trainer(limit_train_batches=1, limit_val_batches=0).fit(plain, datamodule=RandomTokenData(samples=4))


def test_fused_path_refuses_configs_that_transform_the_logits_at_construction() -> None:
    message = (
        "The teacher (GPT2LMHeadModel) transforms its logits after its output head "
        "(config.final_logit_softcapping=30.0), so terms on the fused LM-head path (reads_hidden_states) "
        "would train another objective: give them path='plain' or path='chunked'."
    )
    teacher = tiny_gpt2(32, seed=1, final_logit_softcapping=30.0)  # as Gemma 2's config
    with pytest.raises(ValueError, match=re.escape(message)):
        distiller(teacher=teacher, losses=[FusedTokenKL("kd")])
    distiller(teacher=teacher, losses=[TokenKL("kd")])  # the plain path reads the model's own logits


def test_fused_path_needs_output_heads_at_construction() -> None:
    message = (
        "Loss terms ['kd'] read the student's hidden states and output head (the fused LM-head path), but "
        "the student (TinyLM) has no get_output_embeddings(): give these terms path='plain' (or 'chunked'), "
        "or use a Hugging Face causal LM."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        CausalLMDistillationModule(TinyLM(), TinyLM(seed=1), losses=[FusedTokenKL("kd")])


def test_an_ema_teacher_follows_the_student() -> None:
    module = CausalLMDistillationModule(
        tiny_gpt2(16), teacher_mode="ema", ema_decay=0.5, losses=[TokenKL("kd")]
    )
    start = module.teacher.transformer.wte.weight.clone()
    trainer = make_trainer(limit_train_batches=2)
    trainer.fit(module, datamodule=RandomTokenData(samples=8))
    assert not torch.equal(module.teacher.transformer.wte.weight, start)
    assert torch.isfinite(trainer.callback_metrics["val/teacher_perplexity"])


def test_any_model_with_n_l_v_logits_is_a_causal_lm() -> None:
    module = CausalLMDistillationModule(TinyLM(), TinyLM(seed=1), losses=[TokenCE("ce"), TokenKL("kd")])
    trainer = make_trainer(limit_train_batches=2)
    trainer.fit(module, datamodule=RandomTokenData(samples=8))
    assert module.vocab_size == 48 and torch.isfinite(trainer.callback_metrics["val/agreement"])


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_hidden_state_and_attention_terms_train_a_causal_lm(fused: bool) -> None:
    def gpt2(hidden: int, seed: int) -> nn.Module:
        model = tiny_gpt2(hidden, seed=seed, output_hidden_states=True, output_attentions=True)
        model.config._attn_implementation = "eager"  # SDPA returns no attention maps
        return model

    losses = [
        FusedTokenKL("kd") if fused else TokenKL("kd"),
        HiddenStateTerm("hidden"),
        AttentionMapTerm("attention"),
    ]
    module = distiller(gpt2(16, 0), gpt2(32, 1), losses=losses)
    initial = {k: v.clone() for k, v in module.student.named_parameters()}
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=RandomTokenData(samples=8))
    assert isinstance(module.loss_terms["hidden"].projection, nn.Linear)  # 16 -> 32, built on the probe batch
    for name in ("hidden", "attention"):
        value = trainer.callback_metrics[f"train/loss_{name}"]
        assert torch.isfinite(value) and value > 0, name
    assert not torch.equal(
        module.student.transformer.h[0].attn.c_attn.weight, initial["transformer.h.0.attn.c_attn.weight"]
    )


def test_bf16_mixed_fit_has_finite_losses() -> None:
    module = distiller(
        losses=[TokenCE("ce"), FusedTokenKL("kd")]
    )  # mixed: logits formed from the hidden states
    trainer = make_trainer(limit_train_batches=2, log_every_n_steps=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=RandomTokenData(samples=8))
    for key in ("train/loss", "train/loss_ce", "train/loss_kd", "val/loss", "val/perplexity"):
        assert torch.isfinite(trainer.callback_metrics[key]), key


CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  limit_train_batches: 2
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: runs, name: lm}
model:
  class_path: lightning_kd.language.CausalLMDistillationModule
  init_args:
    student:
      class_path: transformers.GPT2LMHeadModel
      init_args:
        config:
          class_path: transformers.GPT2Config
          init_args: {vocab_size: 48, n_positions: 32, n_embd: 16, n_layer: 1, n_head: 2, bos_token_id: 0,
                      eos_token_id: 0}
    teacher:
      class_path: transformers.GPT2LMHeadModel
      init_args:
        config:
          class_path: transformers.GPT2Config
          init_args: {vocab_size: 48, n_positions: 32, n_embd: 32, n_layer: 2, n_head: 2, bos_token_id: 0,
                      eos_token_id: 0}
    losses:
      - class_path: tests.language.helpers.TokenCE
        init_args: {name: ce, weight: 0.5}
      - class_path: tests.language.helpers.TokenKL
        init_args: {name: kd, weight: 0.5}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001}
data:
  class_path: tests.language.helpers.RandomTokenData
  init_args: {samples: 8, batch_size: 4}
"""


def test_fits_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lm.yaml").write_text(CONFIG)
    main(["fit", "--config", str(tmp_path / "lm.yaml")])
    header = (tmp_path / "runs/lm/version_0/metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train/loss_ce", "train/loss_kd", "val/loss", "val/perplexity", "val/teacher_perplexity"):
        assert column in header, column


def test_default_objective_is_cross_entropy_and_forward_kl() -> None:
    """The default loss on a batch equals 0.5 CE + 0.5 KL(teacher || student), token means in float64."""
    student, teacher = tiny_gpt2(16), tiny_gpt2(32, seed=1)
    module = CausalLMDistillationModule(student, teacher).eval()
    batch = next(iter(token_loader(token_samples(6), batch_size=6)))
    total, values = module.compute_loss(module.step_outputs(batch))
    assert set(values) == {"ce", "kd"}
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = student(**inputs).logits[:, :-1].double().log_softmax(-1)
        t = teacher(**inputs).logits[:, :-1].double().log_softmax(-1)
    targets, attention = batch["labels"][:, 1:], batch["attention_mask"].bool()
    counted = (targets != -100) & attention[:, 1:] & attention[:, :-1]
    ce = -s.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[counted].mean()
    kl = (t.exp() * (t - s)).sum(-1)[counted].mean()
    assert float(values["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(values["kd"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(total) == pytest.approx(float(0.5 * ce + 0.5 * kl), rel=1e-5)


class SequenceClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * torch.zeros(input_ids.shape[0], 48)


SETTINGS = {
    "trainable": (
        {"teacher_mode": "trainable"},
        "teacher_mode must be 'frozen' or 'ema' for causal-LM distillation, got 'trainable'.",
    ),
    "target_key": (
        {"target_key": "labels"},
        "CausalLMDistillationModule takes no target_key: the labels are read from labels_key. Remove it.",
    ),
    "num_classes": (
        {"num_classes": 48},
        "CausalLMDistillationModule takes no num_classes: the vocabulary is read from the models.",
    ),
    "teacher_cache": (
        {"teacher_cache": object()},
        "CausalLMDistillationModule takes no teacher_cache: a cache of (N, L, V) logits per sample is not "
        "supported; the teacher runs each step. Remove it.",
    ),
    "input_key": (
        {"input_key": ["ids"]},
        "input_key must name the token ids 'input_ids' (and the attention mask), got ['ids'].",
    ),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_settings_stop_at_construction(case: str) -> None:
    change, message = SETTINGS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        distiller(**change)


BATCHES = {
    "no labels": (
        lambda b: b.pop("labels"),
        KeyError,
        "The batch has keys ['input_ids', 'attention_mask'] but no 'labels' (labels): give labels (the input "
        "ids with -100 on tokens that do not count; completion_only_labels builds them), set labels_key to "
        "their key, or labels_key=None to count every real token.",
    ),
    "shifted labels": (
        lambda b: b.update(labels=b["labels"][:, 1:]),
        ValueError,
        "batch's labels have shape (4, 11) but input_ids (4, 12): both are per token of the same (unshifted) "
        "sequences; the module shifts the labels itself.",
    ),
    "float labels": (
        lambda b: b.update(labels=b["labels"].float()),
        ValueError,
        "batch['labels'] (labels) must be an (N, L) integer tensor, got (4, 12) torch.float32",
    ),
}


@pytest.mark.parametrize("case", list(BATCHES))
def test_bad_batches_stop_with_the_fix(case: str) -> None:
    edit, error, message = BATCHES[case]
    batch = token_loader(token_samples(4, seed=5), 4).collate_fn(token_samples(4, seed=5))
    assert batch["input_ids"].shape == (4, 12)
    edit(batch)
    with pytest.raises(error, match=re.escape(message)):
        make_trainer(limit_train_batches=1).fit(
            distiller(), torch.utils.data.DataLoader([batch], batch_size=None)
        )


def test_logits_per_sequence_are_refused() -> None:
    module = CausalLMDistillationModule(SequenceClassifier(), SequenceClassifier(), losses=[TokenKL("kd")])
    message = (
        "The student's logits have shape (4, 48) for token ids of shape (4, 12): a causal LM returns (N, L, "
        "V), one next-token distribution per position"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(limit_train_batches=1).fit(module, token_loader(token_samples(4, length=12, seed=5), 4))
