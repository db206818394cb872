"""On-policy distillation (GKD): prompts, the generated batch's mask, the draws, determinism, lmbda 0."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd.data import PromptCollator
from lightning_kd.data.text import pack_blocks
from lightning_kd.language import CausalLMDistillationModule, GenerationSettings, OnPolicyDistillationModule
from lightning_kd.language.generation import completion_batch, generate_completions
from lightning_kd.language.on_policy import on_policy_batch
from lightning_kd.losses import TokenCrossEntropyTerm, TokenDivergenceTerm
from tests.helpers import make_trainer
from tests.language.helpers import TinyLM, tiny_gpt2

X = -100
EOS, PAD = 0, 1


def prompt_loader(rows: int = 12, length: int = 10, prompt_length: int = 4) -> DataLoader:
    """Blocks of random ids >= 2 (0 ends, 1 pads) with 4-token prompts, in order."""
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(2, 48, (length - 1,), generator=generator).tolist() for _ in range(rows)]
    blocks = pack_blocks(documents, length, EOS, PAD)
    return DataLoader(blocks, batch_size=4, collate_fn=PromptCollator(PAD, prompt_length))


def on_policy(lmbda: float, **kwargs: Any) -> OnPolicyDistillationModule:
    kwargs.setdefault("losses", [TokenDivergenceTerm("kd", divergence="jsd")])
    return OnPolicyDistillationModule(
        tiny_gpt2(16, pad_token_id=PAD),
        tiny_gpt2(32, seed=1),
        lmbda=lmbda,
        max_new_tokens=6,
        cosine_decay=False,
        **kwargs,
    )


class KeepGenerations(pl.Callback):
    """The generated batches of a fit (wrapping the module's generated_batch)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_fit_start(self, trainer: pl.Trainer, module: Any) -> None:
        if not isinstance(module, OnPolicyDistillationModule):
            return
        generate = module.generated_batch

        def kept(batch: Any, index: int) -> dict[str, torch.Tensor]:
            result = generate(batch, index)
            self.batches.append((index, result))
            return result

        module.generated_batch = kept


def fit(module: pl.LightningModule, steps: int = 3, seed: int = 0, **kwargs: Any) -> KeepGenerations:
    pl.seed_everything(seed, verbose=False)
    keep = KeepGenerations()
    make_trainer(max_steps=steps, callbacks=[keep], **kwargs).fit(module, train_dataloaders=prompt_loader())
    return keep


def test_the_generated_batch_counts_exactly_the_generated_tokens_up_to_the_first_eos() -> None:
    # prompts (left-padded, width 3) + 4 generated tokens; row 0 ends at its 2nd token, row 1 never
    sequences = torch.tensor([[9, 5, 6, 7, 0, 1, 1], [1, 1, 5, 7, 8, 9, 6], [1, 4, 5, 0, 3, 0, 2]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    batch = completion_batch(sequences, prompt_mask, eos_token_id=EOS, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [
        [9, 5, 6, 7, 0, 1, 1],
        [5, 7, 8, 9, 6, 1, 1],
        [4, 5, 0, 1, 1, 1, 1],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [[X, X, X, 7, 0, X, X], [X, 7, 8, 9, 6, X, X], [X, X, 0, X, X, X, X]]


def test_greedy_completions_are_the_students_argmax_at_exactly_the_counted_positions() -> None:
    student = tiny_gpt2(16, seed=3)
    batch = next(iter(prompt_loader()))
    prompts, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    with torch.no_grad():  # the end: row 0's most likely next token, so that row ends at once
        eos = int(student(input_ids=prompts[:1]).logits[0, -1].argmax())
    student.generation_config.eos_token_id = eos
    sequences = generate_completions(student, prompts, prompt_mask, GenerationSettings(6, do_sample=False), 0)
    generated = completion_batch(sequences, prompt_mask, eos, PAD)
    with torch.no_grad():
        logits = student(input_ids=generated["input_ids"], attention_mask=generated["attention_mask"]).logits
    counted = generated["labels"][:, 1:] != X
    # each counted position predicts the generated token after it: greedy, that is the student's argmax
    assert torch.equal(logits[:, :-1].argmax(-1)[counted], generated["labels"][:, 1:][counted])
    lengths = []
    for i in range(len(sequences)):  # counted: from the first generated token to the first EOS
        tokens = sequences[i, prompts.shape[1] :].tolist()
        lengths.append(tokens.index(eos) + 1 if eos in tokens else len(tokens))
        start = int(prompt_mask[i].sum()) - 1  # the last prompt token predicts the first generated one
        assert counted[i].nonzero().flatten().tolist() == list(range(start, start + lengths[i]))
    assert lengths[0] == 1 and max(lengths) == 6


def test_on_policy_draws_are_a_fraction_lmbda_from_seed_and_index() -> None:
    draws = [on_policy_batch(0, index, 0.5) for index in range(2000)]
    assert 0.46 < sum(draws) / len(draws) < 0.54
    assert draws == [on_policy_batch(0, index, 0.5) for index in range(2000)]
    assert draws != [on_policy_batch(1, index, 0.5) for index in range(2000)]
    assert not any(on_policy_batch(0, index, 0.0) for index in range(200))
    assert all(on_policy_batch(0, index, 1.0) for index in range(200))


def test_the_fit_generates_on_the_drawn_batches_and_uses_every_completion() -> None:
    module = on_policy(0.5, seed=7)
    counted: list[int] = []
    module.token_mean.count = lambda mask, count=module.token_mean.count: (
        counted.append(int(mask.sum())) or count(mask)
    )
    keep = fit(module, steps=6, max_epochs=3)
    assert [index for index, _ in keep.batches] == [i for i in range(6) if on_policy_batch(7, i, 0.5)]
    assert 0 < len(keep.batches) < 6
    for index, batch in keep.batches:  # the step's loss counted every generated token of the batch
        assert counted[index] == int((batch["labels"][:, 1:] != X).sum()) >= len(batch["labels"])


def test_same_seed_gives_identical_generations_and_weights() -> None:
    runs = [on_policy(1.0) for _ in range(2)]
    first, second = fit(runs[0], seed=3), fit(runs[1], seed=3)
    assert len(first.batches) == len(second.batches) == 3
    for (_, a), (_, b) in zip(first.batches, second.batches, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for (name, a), b in zip(
        runs[0].student.state_dict().items(), runs[1].student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    other = fit(on_policy(1.0), seed=4)
    assert any(
        not torch.equal(a["input_ids"], b["input_ids"])
        for (_, a), (_, b) in zip(first.batches, other.batches, strict=True)
    )


def test_lmbda_zero_is_supervised_kd_exactly() -> None:
    terms = [TokenDivergenceTerm("kd", divergence="jsd")]
    gkd = on_policy(0.0, losses=terms)
    supervised = CausalLMDistillationModule(
        tiny_gpt2(16, pad_token_id=PAD),
        tiny_gpt2(32, seed=1),
        losses=[TokenDivergenceTerm("kd", divergence="jsd")],
        cosine_decay=False,
    )
    assert fit(gkd).batches == []
    fit(supervised)
    for (name, a), b in zip(
        gkd.student.state_dict().items(), supervised.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    before = tiny_gpt2(16, pad_token_id=PAD).state_dict()
    assert any(not torch.equal(before[name], value) for name, value in gkd.student.state_dict().items())


def test_generation_time_is_logged_apart(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger

    module = on_policy(1.0)
    fit(module, steps=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    logged = module.trainer.callback_metrics
    assert float(logged["train/on_policy_batches"]) == 1.0
    assert 0 < float(logged["train/generation_seconds"]) < float(logged["train/step_seconds"])


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("lmbda", ValueError, "lmbda is the fraction of on-policy batches"),
        ("no-generate", TypeError, "has no Hugging Face `generate`"),
        ("ce-term", ValueError, r"Loss terms \['ce'\] do not read the teacher"),
        ("no-eos", ValueError, "has no eos_token_id"),
        ("settings", ValueError, "top_p must be in"),
    ],
)
def test_bad_settings_stop_at_construction(case: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        if case == "lmbda":
            on_policy(1.5)
        elif case == "no-generate":
            OnPolicyDistillationModule(TinyLM(), TinyLM(seed=1), lmbda=0.5)
        elif case == "ce-term":
            on_policy(0.5, losses=[TokenCrossEntropyTerm("ce"), TokenDivergenceTerm("kd")])
        elif case == "no-eos":
            OnPolicyDistillationModule(tiny_gpt2(16, eos_token_id=None), tiny_gpt2(32), lmbda=0.5)
        else:
            on_policy(0.5, top_p=0.0)


def test_bad_batches_stop_with_the_fix() -> None:
    module = on_policy(1.0)
    batch = next(iter(prompt_loader()))
    with pytest.raises(KeyError, match="collate with lightning_kd.data.PromptCollator"):
        module.prompts({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    long = on_policy(1.0, losses=[TokenDivergenceTerm("kd")])
    long.generation = GenerationSettings(max_new_tokens=40)
    with pytest.raises(ValueError, match="exceed the student's 32 positions: lower max_new_tokens"):
        long.generated_batch(batch, 0)
