"""Small GPT-2 language models built from a config (random weights, no download)."""

from __future__ import annotations

from typing import Any

from lightning_kd.models.sentence_encoder import _transformers

__all__ = ["GPT2_SIZES", "tiny_gpt2"]

#: named sizes: layers, width and heads of the offline language-model example's teacher and student,
#: chosen in benchmarks/results/lm_sizing.md (15 CPU-minutes of the teacher: perplexity 64.5 on
#: PythonDocsText; 5 of the student alone: 82-86)
GPT2_SIZES: dict[str, dict[str, int]] = {
    "teacher": {"n_layer": 4, "n_embd": 192, "n_head": 6},
    "student": {"n_layer": 2, "n_embd": 64, "n_head": 2},
}


def tiny_gpt2(
    vocab_size: int,
    size: str = "student",
    n_positions: int = 256,
    dropout: float = 0.0,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
) -> Any:
    """A freshly initialised ``transformers.GPT2LMHeadModel`` (Radford et al., 2019) of a named size.

    ``size`` picks layers, width and heads from :data:`GPT2_SIZES` (``"teacher"``, ``"student"``);
    ``n_layer`` / ``n_embd`` / ``n_head`` override them. The feed-forward width is ``4 * n_embd``
    and the output head is tied to the token embedding, as in GPT-2. With ``vocab_size=4096`` and
    ``n_positions=128`` the teacher has 2.59M parameters and the student 0.37M, 7 times fewer.

    Args:
        vocab_size: the tokenizer's vocabulary size (``len(tokenizer)``).
        size: a key of :data:`GPT2_SIZES`.
        n_positions: the longest sequence the model reads (at least the datamodule's ``block_size``).
        dropout: the probability of the residual, embedding and attention dropout.
        n_layer: transformer blocks (overrides ``size``).
        n_embd: width (overrides ``size``); a multiple of ``n_head``.
        n_head: attention heads (overrides ``size``).
        eos_token_id: the end-of-text id (also the start id, as in GPT-2); 0 in
            :func:`~lightning_kd.data.bpe.trained_bpe_tokenizer`'s tokenizers.
        pad_token_id: the padding id; 1 in those tokenizers.
    """
    if size not in GPT2_SIZES:
        raise ValueError(
            f"Unknown size {size!r}; pick one of {sorted(GPT2_SIZES)} or pass n_layer/n_embd/n_head."
        )
    shape = {**GPT2_SIZES[size]}
    shape.update({k: v for k, v in {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}.items() if v})
    if shape["n_embd"] % shape["n_head"]:
        raise ValueError(f"n_embd={shape['n_embd']} must be a multiple of n_head={shape['n_head']}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **shape,
    )
    return transformers.GPT2LMHeadModel(config)
