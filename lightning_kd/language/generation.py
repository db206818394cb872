"""Sampling completions from a causal LM for distillation, and turning them into training batches.

:func:`generate_completions` runs Hugging Face's ``generate`` (no gradients, eval mode) on
left-padded prompts, under a random state derived from a seed and a key (a step, a batch index),
so the same seed gives the same completions whatever else used the global random state.
:func:`completion_batch` turns the ``(N, P + T)`` sequences into a right-padded batch of the
causal-LM module (``input_ids``, ``attention_mask``, ``labels``) whose labels count exactly the
generated tokens: each row's completion up to and including its first end-of-sequence token.

**Device reads.** ``generate`` reads the device once per new token to learn whether every row has
reached the end-of-sequence token (and stops then); that is the only place where a training
step with generation waits for the device. :func:`completion_batch` reads nothing: its shapes are
those of the generated sequences, known on the host when ``generate`` returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.language.completion import IGNORE_INDEX

__all__ = [
    "GenerationSettings",
    "check_can_generate",
    "completion_batch",
    "derived_seed",
    "generate_completions",
    "pad_token_id",
    "seeded",
]


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled: Hugging Face ``generate`` arguments.

    Args:
        max_new_tokens: the most tokens generated per prompt (>= 1).
        temperature: sampling temperature (> 0); ignored when ``do_sample=False``.
        top_p: nucleus sampling (Holtzman et al., 2020): sample from the smallest set of tokens
            whose probability reaches ``top_p``; 1.0 keeps every token.
        do_sample: ``False``: greedy decoding (the most likely token each step).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (1.0 samples the model's distribution), got {self.temperature}."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0 keeps every token), got {self.top_p}.")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what a fingerprint records)."""
        return asdict(self)


def derived_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (e.g. the step, the rank): SHA-256, not ``hash()``."""
    text = "/".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)``; the global random state (CPU, ``device``) is kept."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def check_can_generate(model: nn.Module, role: str) -> None:
    """Refuse a model without Hugging Face's ``generate`` (and its end-of-sequence id), naming the fix."""
    if not callable(getattr(model, "generate", None)) or getattr(model, "generation_config", None) is None:
        raise TypeError(
            f"The {role} ({type(model).__name__}) has no Hugging Face `generate`: on-policy and "
            "sequence-level distillation sample completions with it. Use a transformers causal LM "
            "(AutoModelForCausalLM, "
            "or a model deriving from transformers.GenerationMixin)."
        )
    if end_of_sequence_id(model) is None:
        raise ValueError(
            f"The {role}'s generation config has no eos_token_id: completions could not end. Set "
            "model.generation_config.eos_token_id (the tokenizer's end-of-text id)."
        )


def end_of_sequence_id(model: nn.Module) -> int | None:
    """The first end-of-sequence id of the model's generation config (``None`` if it has none)."""
    eos = model.generation_config.eos_token_id
    if isinstance(eos, list | tuple):
        return int(eos[0]) if eos else None
    return None if eos is None else int(eos)


def pad_token_id(model: nn.Module) -> int:
    """The padding id of the model's generation config (or config); without one, its end-of-sequence id."""
    eos = end_of_sequence_id(model)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        assert eos is not None  # check_can_generate
        return eos
    return int(pad[0] if isinstance(pad, list | tuple) else pad)


def check_context(model: nn.Module, role: str, prompt_width: int, settings: GenerationSettings) -> None:
    """Refuse prompts + ``max_new_tokens`` longer than the model's positions (read from its config)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and prompt_width + settings.max_new_tokens > positions:
        raise ValueError(
            f"Prompts of {prompt_width} tokens + max_new_tokens={settings.max_new_tokens} exceed the "
            f"{role}'s {positions} positions: lower max_new_tokens or shorten the prompts (prompt_length)."
        )


@torch.no_grad()
def generate_completions(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, settings: GenerationSettings, seed: int
) -> Tensor:
    """``(N, P + T)`` token ids: the left-padded prompts followed by the sampled completions.

    Eval mode (no dropout) and no gradients; sampled under ``torch.manual_seed(seed)`` (the
    global random state is left as it was). ``T <= max_new_tokens``: ``generate`` stops when every
    row has produced the end-of-sequence token, and pads finished rows. Reads the device once per
    new token (whether every row has finished).

    Args:
        model: a Hugging Face causal LM (:func:`check_can_generate`).
        prompt_ids: ``(N, P)`` prompt token ids, LEFT-padded (generation continues from the last column).
        prompt_mask: ``(N, P)``: 1 on prompt tokens, 0 on the left padding.
        settings: :class:`GenerationSettings`.
        seed: the random state of the sampling (e.g. :func:`derived_seed` of the run's seed and step).
    """
    eos = end_of_sequence_id(model)
    assert eos is not None  # check_can_generate
    was_training = model.training
    model.eval()
    try:
        with seeded(seed, prompt_ids.device):
            return model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                temperature=settings.temperature if settings.do_sample else None,
                top_p=settings.top_p if settings.do_sample else None,
                top_k=0,  # no top-k cut, whatever the model's generation config says
                eos_token_id=eos,
                pad_token_id=pad_token_id(model),
            )
    finally:
        model.train(was_training)


def completion_batch(
    sequences: Tensor, prompt_mask: Tensor, eos_token_id: int, pad_token_id: int
) -> dict[str, Tensor]:
    """The right-padded causal-LM batch of generated ``sequences``; labels count exactly the generated tokens.

    Row ``i`` becomes its ``p_i`` prompt tokens, then its completion up to and including the first
    ``eos_token_id`` (or all ``T`` generated tokens if none), then padding (attention mask 0,
    label -100, id ``pad_token_id``). Labels are -100 on the prompt, so after the module's shift
    the counted positions are exactly those predicting a generated token (the first one is
    predicted from the last prompt token). Computed on the device without reading it.

    Args:
        sequences: ``(N, P + T)`` from :func:`generate_completions`.
        prompt_mask: ``(N, P)`` the prompts' (left-padded) attention mask.
        eos_token_id: the end-of-sequence id that ends a completion.
        pad_token_id: the id written into padding.
    """
    n, width = prompt_mask.shape
    total = sequences.shape[1]
    completion = sequences[:, width:]
    is_eos = completion == eos_token_id
    generated = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # up to and including the first EOS
    mask = torch.cat([prompt_mask.bool(), generated], dim=1)
    counted = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), generated], dim=1)
    # move each row's left padding to its end: column j reads column (j + pads_i) mod total
    pads = width - prompt_mask.long().sum(dim=1, keepdim=True)
    source = (torch.arange(total, device=sequences.device)[None, :] + pads) % total
    mask = mask.gather(1, source)
    counted = counted.gather(1, source)
    input_ids = torch.where(mask, sequences.gather(1, source), pad_token_id)
    labels = torch.where(counted, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels}
