"""The fused LM-head path: a causal LM's last hidden states and output head instead of its logits.

A term that sets :attr:`~lightning_kd.losses.LossTerm.reads_hidden_states` computes the logits it
needs itself (a chunk at a time), so the module runs the model's base (``model.base_model``, the
transformer without its head) and hands the term ``head`` and ``hidden``: the ``(N, L, V)`` logits
are never formed. This is only the same objective when the model's logits ARE
``get_output_embeddings()(last hidden state)``: :func:`check_no_logit_transform` refuses the known
config settings that soft-cap or scale them when the module is built, and
:func:`check_head_reproduces_logits` compares the two on the first training batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.model_io import call_model, logits_of

__all__ = [
    "LOGIT_TRANSFORMS",
    "check_head_reproduces_logits",
    "check_no_logit_transform",
    "hidden_state_call",
    "last_hidden_state",
    "output_head",
]

#: Hugging Face config settings that change the logits after the output head, with their neutral values
#: (Gemma 2/3 soft-cap them, Cohere scales them, Granite divides them)
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
#: what the errors of the fused path's checks tell the user to do
_FIX = (
    "so terms on the fused LM-head path (reads_hidden_states) would train another objective: give them "
    "path='plain' or path='chunked'."
)
#: how many tokens of the first sequence :func:`check_head_reproduces_logits` compares
CHECKED_TOKENS = 8
#: largest difference allowed between fused and real logits, relative to the largest real logit
#: (bf16 autocast rounds both alike; a scale or soft-cap differs by far more)
RELATIVE_TOLERANCE = 1e-2


def hidden_state_call(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any]:
    """What to call for ``model``'s last hidden states without its head: ``(module, inputs)``.

    A Hugging Face model's ``base_model`` (the transformer without the LM head); a model without
    one is called itself with ``output_hidden_states=True`` (its logits are then formed).
    """
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base, inputs
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"{type(model).__name__} has no base_model, so its hidden states are asked for with "
            "output_hidden_states=True, which needs dict batches (input_key as a list of keys)."
        )
    return model, {**inputs, "output_hidden_states": True}


def last_hidden_state(output: Any) -> Tensor:
    """The ``(N, L, H)`` last hidden state in a base model's output, or the last of its ``hidden_states``."""
    hidden = output.get("last_hidden_state") if isinstance(output, Mapping) else None
    hidden = hidden if hidden is not None else getattr(output, "last_hidden_state", None)
    if hidden is None:
        states = output.get("hidden_states") if isinstance(output, Mapping) else None
        states = states if states is not None else getattr(output, "hidden_states", None)
        if not states:
            raise ValueError(
                f"A {type(output).__name__} carries neither last_hidden_state nor hidden_states: the fused "
                "LM-head path needs a Hugging Face causal LM (or a model returning hidden_states)."
            )
        hidden = states[-1]
    return hidden


def output_head(model: nn.Module, role: str, terms: list[str]) -> nn.Module:
    """``model.get_output_embeddings()``: the ``nn.Linear`` that maps hidden states to logits.

    Raises:
        ValueError: the model has none; the message names the terms and the fix.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"Loss terms {terms} read the {role}'s hidden states and output head (the fused LM-head path), "
            f"but the {role} ({type(model).__name__}) has no get_output_embeddings(): give these terms "
            "path='plain' (or 'chunked'), or use a Hugging Face causal LM."
        )
    return head


def check_no_logit_transform(model: nn.Module, role: str) -> None:
    """Refuse a model whose config transforms its logits after the head (:data:`LOGIT_TRANSFORMS`).

    Raises:
        ValueError: the message names the model, the setting and the fix.
    """
    config = getattr(model, "config", None)
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise ValueError(
                f"The {role} ({type(model).__name__}) transforms its logits after its output head "
                f"(config.{name}={value}), {_FIX}"
            )


def check_head_reproduces_logits(model: nn.Module, inputs: Mapping[str, Any], role: str) -> None:
    """Check that ``head(last hidden state)`` equals ``model``'s logits on a few tokens (eval mode, no grad).

    Compares the first :data:`CHECKED_TOKENS` tokens of the first sequence.

    Raises:
        ValueError: they differ (the model soft-caps, scales or post-processes its logits); the
            message names the model and the fix (the plain or chunked path).
    """
    sliced = {
        key: value[:1, :CHECKED_TOKENS] if isinstance(value, Tensor) and value.ndim >= 2 else value
        for key, value in inputs.items()
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            real = logits_of(call_model(model, sliced)).float()
            module, base_inputs = hidden_state_call(model, sliced)
            hidden = last_hidden_state(call_model(module, base_inputs))
            fused = output_head(model, role, []).forward(hidden).float()
    finally:
        model.train(was_training)
    scale = float(real.abs().max())
    difference = float((fused - real).abs().max()) if fused.shape == real.shape else float("inf")
    if not difference <= RELATIVE_TOLERANCE * scale + 1e-6:
        raise ValueError(
            f"The {role} ({type(model).__name__}) does not compute its logits as get_output_embeddings() of "
            f"its last hidden state: on {real.shape[1]} tokens they differ by up to {difference:.3g} "
            f"(largest logit {scale:.3g}). It soft-caps, scales or post-processes its logits, {_FIX}"
        )
