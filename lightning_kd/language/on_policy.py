r"""On-policy and mixed distillation of causal LMs: the student learns on completions it generates.

Generalized Knowledge Distillation (GKD; Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024, Algorithm 1): with probability
:math:`\lambda` a batch's outputs are sampled from the student for the batch's prompts (no gradient
through the sampling), the teacher scores prompt + completion, and the token divergence
:math:`D(p_T \| p_S)` is averaged over the generated tokens; otherwise the batch's own tokens are
used (supervised KD). :math:`\lambda = 0` is supervised KD, :math:`\lambda = 1` purely on-policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.language.causal_lm import CausalLMDistillationModule
from lightning_kd.language.generation import (
    GenerationSettings,
    check_can_generate,
    check_context,
    completion_batch,
    derived_seed,
    end_of_sequence_id,
    generate_completions,
    pad_token_id,
)
from lightning_kd.losses.base import LossTerm
from lightning_kd.losses.token_divergence import TokenDivergenceTerm
from lightning_kd.step_monitor import logs_this_step

__all__ = ["OnPolicyDistillationModule", "on_policy_batch"]


def on_policy_batch(seed: int, index: int, lmbda: float) -> bool:
    """Whether training batch ``index`` (counted over the fit) is on-policy: a draw from ``(seed, index)``.

    A host computation (SHA-256 of seed and index): the same on every process and after a resume,
    and no device value is read. About a fraction ``lmbda`` of the batches are on-policy.
    """
    return derived_seed(seed, "on-policy", index) / 2.0**63 < lmbda


class OnPolicyDistillationModule(CausalLMDistillationModule):
    r"""GKD: a fraction ``lmbda`` of training batches are completions the student samples itself.

    Agarwal et al., ICLR 2024 (Algorithm 1). Each training batch carries, besides the causal-LM
    batch (``input_ids``, ``attention_mask``, ``labels``: the supervised prompt + output, labels
    -100 on the prompt), its prompts LEFT-padded under ``prompt_key`` / ``prompt_mask_key``
    (:class:`~lightning_kd.data.PromptCollator` builds both). For an on-policy batch:

    1. the student samples a completion for every prompt (Hugging Face ``generate``, eval mode,
       no gradients; ``max_new_tokens``, ``temperature``, ``top_p``), each ending at its first
       end-of-sequence token;
    2. the batch becomes prompt + completion, right-padded, labels on the generated tokens only
       (:func:`~lightning_kd.language.generation.completion_batch`);
    3. the parent's step runs on it: the teacher scores prompt + completion and the loss terms
       average the divergence over the generated tokens (token-mean gradients as usual).

    Every generated completion is in that step's loss; nothing is generated for a supervised batch.
    With ``lmbda = 0`` the module is :class:`~lightning_kd.language.CausalLMDistillationModule`
    (same batches, same updates); on-policy batches need only teacher terms (a cross-entropy on
    the student's own samples would teach it its mistakes), so ``lmbda > 0`` refuses a term
    without a teacher.

    **Reproducibility.** Whether batch ``b`` (counted over the whole fit, so a resumed run goes on
    alike) is on-policy is :func:`on_policy_batch` ``(seed, b, lmbda)``; its completions are
    sampled under ``torch.manual_seed`` of a seed derived from ``(seed, b, rank)``: each DDP process
    generates for its own prompts, the same on every run with the same seed, and the global random
    state is left as it was.

    **Device reads.** ``generate`` waits for the device once per new token (whether every row has
    ended); the rest of the step reads nothing. ``train/generation_seconds`` (host time inside
    ``generate``), ``train/step_seconds`` (host time between logging steps) and
    ``train/on_policy_batches`` are logged at the logging steps, each over the steps since the
    previous one.

    Args:
        student: a Hugging Face causal LM (it generates).
        teacher: the teacher causal LM.
        losses: default: the generalized JSD with :math:`\beta = 0.5` (GKD's default), T = 1.
        lmbda: fraction of on-policy batches (the student's samples), in ``[0, 1]``.
        max_new_tokens: the most tokens sampled per prompt.
        temperature: the sampling temperature (GKD: 1.0).
        top_p: nucleus sampling; 1.0 samples the full distribution.
        seed: the seed of the draws; ``None``: the ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
        prompt_key: batch key of the left-padded prompt ids.
        prompt_mask_key: batch key of the prompts' attention mask.
        **kwargs: the arguments of :class:`~lightning_kd.language.CausalLMDistillationModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        losses: Sequence[LossTerm] | None = None,
        lmbda: float = 0.5,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prompt_key: str = "prompt_input_ids",
        prompt_mask_key: str = "prompt_attention_mask",
        **kwargs: Any,
    ) -> None:
        if not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda is the fraction of on-policy batches, in [0, 1]; got {lmbda}.")
        if losses is None and teacher is not None:
            losses = [TokenDivergenceTerm("kd", divergence="jsd", beta=0.5)]
        super().__init__(student, teacher, losses=losses, **kwargs)
        if self.teacher is None and kwargs.get("teacher_mode", "frozen") == "frozen":
            raise ValueError("On-policy distillation needs a teacher to score the student's completions.")
        if lmbda > 0:
            check_can_generate(self.student, "student")
            alone = [name for name, term in self.loss_terms.items() if not term.needs_teacher]
            if alone:
                raise ValueError(
                    f"Loss terms {alone} do not read the teacher: on an on-policy batch their targets "
                    "would be the student's own samples. Use teacher terms only (e.g. TokenDivergenceTerm), "
                    "or lmbda=0."
                )
        self.lmbda = float(lmbda)
        self.generation = GenerationSettings(max_new_tokens, temperature, top_p)
        self.seed = seed
        self.prompt_key = prompt_key
        self.prompt_mask_key = prompt_mask_key
        self._timing = {"generation": 0.0, "batches": 0, "since": time.perf_counter()}

    @property
    def draw_seed(self) -> int:
        """The seed of the on-policy draws and the sampling: ``seed``, else ``PL_GLOBAL_SEED``, else 0."""
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def prompts(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """``(prompt ids, prompt mask)`` of a training batch (shapes checked), or an error naming the fix."""
        missing = [key for key in (self.prompt_key, self.prompt_mask_key) if key not in batch]
        if missing:
            raise KeyError(
                f"An on-policy batch needs the prompts under {missing} (left-padded), but the batch has keys "
                f"{list(batch)}: collate with lightning_kd.data.PromptCollator, or set prompt_key and "
                "prompt_mask_key."
            )
        ids, mask = batch[self.prompt_key], batch[self.prompt_mask_key]
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"batch[{self.prompt_key!r}] {tuple(ids.shape)} and batch[{self.prompt_mask_key!r}] "
                f"{tuple(mask.shape)} must both be (N, P): the left-padded prompts and their attention mask."
            )
        return ids, mask

    def generated_batch(self, batch: Mapping[str, Any], index: int) -> dict[str, Tensor]:
        """The student's completions of ``batch``'s prompts as a causal-LM batch (labels: the generated)."""
        ids, mask = self.prompts(batch)
        check_context(self.student, "student", ids.shape[1], self.generation)
        seed = derived_seed(self.draw_seed, "generate", index, self.global_rank)
        started = time.perf_counter()
        sequences = generate_completions(self.student, ids, mask, self.generation, seed)
        self._timing["generation"] += time.perf_counter() - started
        self._timing["batches"] += 1
        eos = end_of_sequence_id(self.student)
        assert eos is not None  # check_can_generate
        return completion_batch(sequences, mask, eos, pad_token_id(self.student))

    def on_train_start(self) -> None:
        """Start the host clock of ``train/step_seconds``."""
        super().on_train_start()
        self._timing = {"generation": 0.0, "batches": 0, "since": time.perf_counter()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """On an on-policy batch (:func:`on_policy_batch`), the parent's step on the student's completions."""
        index = self.trainer.fit_loop.epoch_loop.total_batch_idx
        if self.lmbda > 0 and on_policy_batch(self.draw_seed, index, self.lmbda):
            batch = self.generated_batch(batch, index)
        loss = super().training_step(batch, batch_idx)
        if logs_this_step(self._trainer):
            self._log_timing()
        return loss

    def _log_timing(self) -> None:
        """Log the host seconds of generation and of the steps since the previous logging step."""
        now = time.perf_counter()
        timing = self._timing
        self.log("train/generation_seconds", torch.tensor(timing["generation"]))
        self.log("train/step_seconds", torch.tensor(now - timing["since"]))
        self.log("train/on_policy_batches", torch.tensor(float(timing["batches"])))
        self._timing = {"generation": 0.0, "batches": 0, "since": now}
