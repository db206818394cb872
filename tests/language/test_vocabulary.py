"""The shared-vocabulary rule: padded output embeddings are aligned on the shared ids, anything else stops."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from lightning_kd.language import CausalLMDistillationModule, shared_vocabulary
from tests.helpers import make_trainer
from tests.language.helpers import VOCAB, TinyLM, TokenCE, TokenKL, tiny_gpt2, token_loader, token_samples


def word_tokenizer(size: int, prefix: str = "w", name: str = "tiny-words") -> PreTrainedTokenizerFast:
    vocab = {f"{prefix}{i}": i for i in range(size)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=f"{prefix}0")), name_or_path=name
    )


def test_equal_sizes_share_every_id_without_warning() -> None:
    assert shared_vocabulary(48, 48) == 48
    assert shared_vocabulary(48, 48, word_tokenizer(40)) == 48
    assert shared_vocabulary(48, None) == 48  # no teacher


def test_padded_embedding_with_its_tokenizer_is_aligned_on_the_shared_ids() -> None:
    tokenizer = word_tokenizer(48)
    message = (
        "The student predicts 48 token ids and the teacher 64: the tokenizer TokenizersBackend 'tiny-words' "
        "(48 ids) fits into both, so the larger output embedding is taken as padded and the models are "
        "compared on the shared ids [0, 48)."
    )
    with pytest.warns(UserWarning, match=re.escape(message)):
        assert shared_vocabulary(48, 64, tokenizer) == 48
    with pytest.warns(UserWarning, match=r"student predicts 64 token ids and the teacher 48"):
        assert shared_vocabulary(64, 48, None, tokenizer) == 48  # the teacher's tokenizer alone also tells


def test_different_sizes_without_a_tokenizer_stop() -> None:
    message = (
        "The student predicts 48 token ids but the teacher 64. If both use one tokenizer and one output "
        "embedding is padded, pass it as tokenizer= (its length must fit into 48) and the models are "
        "compared on the shared ids; models of different tokenizers cannot be distilled token by token."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        shared_vocabulary(48, 64)


def test_different_tokenizers_stop_naming_both() -> None:
    message = (
        "The student's tokenizer TokenizersBackend 'tiny-words' (48 ids) and the teacher's TokenizersBackend "
        "'other-words' (48 ids) differ (student 48, teacher 64 output ids): token-level distillation "
        "compares the models id by id, so both need one tokenizer."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        shared_vocabulary(48, 64, word_tokenizer(48), word_tokenizer(48, prefix="v", name="other-words"))
    with pytest.raises(ValueError, match=r"\(48 ids\) and the teacher's .* \(64 ids\) differ"):
        shared_vocabulary(48, 64, word_tokenizer(48), word_tokenizer(64))
    assert shared_vocabulary(48, 48, word_tokenizer(48), word_tokenizer(48)) == 48  # equal vocabularies: one


def test_tokenizer_longer_than_the_models_stops() -> None:
    message = (
        "The tokenizer TokenizersBackend 'tiny-words' (56 ids) has more ids than the models predict (student "
        "48, teacher 64 output ids): the models were built for another tokenizer"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        shared_vocabulary(48, 64, word_tokenizer(56))


def test_module_aligns_a_padded_teacher_at_construction_and_fits() -> None:
    with pytest.warns(UserWarning, match=r"compared on the shared ids \[0, 48\)"):
        module = CausalLMDistillationModule(
            tiny_gpt2(16),
            tiny_gpt2(16, vocab=64, seed=1),
            losses=[TokenCE("ce"), TokenKL("kd")],
            tokenizer=word_tokenizer(VOCAB),
            cosine_decay=False,
        )
    assert module.vocab_size == 48
    seen: list[tuple[int, int, int]] = []

    def record(term: object, args: tuple) -> None:
        tokens = args[0].tokens
        seen.append((tokens.vocab_size, tokens.student_logits.shape[-1], tokens.teacher_logits.shape[-1]))

    module.loss_terms["kd"].register_forward_pre_hook(record)
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, token_loader(token_samples(4), 4), token_loader(token_samples(4, seed=1), 4))
    assert seen == [(48, 48, 64)]  # the terms compare [..., :48]; validation runs no terms
    assert torch.isfinite(trainer.callback_metrics["val/teacher_perplexity"])
    with pytest.raises(ValueError, match=r"student predicts 48 token ids but the teacher 64"):
        CausalLMDistillationModule(tiny_gpt2(16), tiny_gpt2(16, vocab=64), losses=[TokenKL("kd")])


def test_models_without_output_embeddings_are_checked_at_the_first_batch() -> None:
    module = CausalLMDistillationModule(TinyLM(48), TinyLM(64), losses=[TokenKL("kd")])
    assert module.vocab_size is None
    with pytest.raises(ValueError, match=r"student predicts 48 token ids but the teacher 64"):
        make_trainer(limit_train_batches=1).fit(module, token_loader(token_samples(4), 4))


def test_label_ids_outside_the_shared_vocabulary_stop_before_the_step() -> None:
    module = CausalLMDistillationModule(tiny_gpt2(16), tiny_gpt2(16, seed=1), losses=[TokenKL("kd")])
    batch = token_loader(token_samples(4), 4).collate_fn(token_samples(4))
    batch["labels"][0, -1] = 60
    message = (
        "The training labels hold token id 60, outside [0, 48), the ids the models share (-100 marks tokens "
        "that do not count): tokenize with the models' tokenizer."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(limit_train_batches=1).fit(module, DataLoader([batch], batch_size=None))
    assert torch.equal(module.student.transformer.wte.weight, tiny_gpt2(16).transformer.wte.weight)  # no step
