"""Token-mean gradients: accumulation and DDP give the gradient of the whole global batch's token mean.

Every run takes one SGD step from the same weights; the expected step is computed here, in float64,
from the mean of CE 0.3 + KL 0.7 over ALL counted tokens of the global batch (11 + 2 + 6 + 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.language import TokenMeanGradients
from lightning_kd.language.token_view import shifted_targets
from tests.language.helpers import token_loader
from tests.language.token_mean_setup import LR, WEIGHTS, batch_of, models, module, samples, trainer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_token_mean.py"


def per_token_losses(
    chosen: list[dict[str, Any]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.nn.Module]:
    """Float64 (CE 0.3 + KL 0.7) of every counted token of ``chosen`` (one batch), and the student."""
    student, teacher = (model.double() for model in models())
    batch = batch_of(chosen)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_log = F.log_softmax(student(**inputs).logits[:, :-1], dim=-1)
    with torch.no_grad():
        teacher_log = F.log_softmax(teacher(**inputs).logits[:, :-1], dim=-1)
    mask, targets = shifted_targets(batch["labels"], batch["attention_mask"])
    ce = -student_log.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    return (WEIGHTS["ce"] * ce + WEIGHTS["kd"] * kl)[mask], dict(student.named_parameters()), student


def expected_step(chosen: list[dict[str, Any]], token_mean: bool = True) -> dict[str, torch.Tensor]:
    """Weights after one SGD step on the token mean of ``chosen`` (or the mean of per-sequence means)."""
    if token_mean:
        losses, params, _ = per_token_losses(chosen)
        loss = losses.mean()
    else:
        per_sequence = [per_token_losses([sample]) for sample in chosen]
        loss = torch.stack([losses.mean() for losses, _, _ in per_sequence]).mean()
        params = per_sequence[0][1]  # the same initial weights; sum the gradients of each copy instead
        grads = [
            torch.autograd.grad(losses.mean() / len(chosen), list(p.values()))
            for losses, p, _ in per_sequence
        ]
        return {
            name: (param - LR * sum(g[i] for g in grads)).detach()
            for i, (name, param) in enumerate(params.items())
        }
    grads = torch.autograd.grad(loss, list(params.values()))
    return {
        name: (param - LR * grad).detach() for (name, param), grad in zip(params.items(), grads, strict=True)
    }


def trained(
    chosen: list[dict[str, Any]], batch_size: int, accumulate: int, **kwargs: Any
) -> dict[str, torch.Tensor]:
    distilled = module()
    fit = trainer(accumulate_grad_batches=accumulate, **kwargs)
    fit.fit(distilled, token_loader(chosen, batch_size))
    assert fit.global_step == 1
    return dict(distilled.student.named_parameters())


def assert_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, rtol=0, atol=1e-6, msg=name)


def test_accumulating_4_micro_batches_equals_one_batch_and_the_token_mean() -> None:
    data = samples()
    whole, accumulated = trained(data, batch_size=4, accumulate=1), trained(data, batch_size=1, accumulate=4)
    expected = expected_step(data)
    assert_weights(whole, expected)
    assert_weights(accumulated, expected)
    naive = expected_step(data, token_mean=False)  # the mean of per-micro-batch means: another step
    assert max(float((naive[n] - expected[n]).abs().max()) for n in expected) > 1e-3


def test_gradient_clipping_sees_the_token_mean_gradient() -> None:
    data, clip = samples(), 0.05
    initial = {name: p.double() for name, p in models()[0].named_parameters()}
    step = {name: initial[name] - value for name, value in expected_step(data).items()}  # LR * gradient
    norm = (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in step.values()])))
        / LR
    )
    assert norm > clip  # the clipping acts
    factor = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
    expected = {name: initial[name] - factor * value for name, value in step.items()}
    assert_weights(trained(data, batch_size=1, accumulate=4, gradient_clip_val=clip), expected)


def test_a_partial_window_at_the_epoch_end_is_exact() -> None:
    data = samples()[:3]  # 3 micro-batches, accumulate_grad_batches=4: the step comes at the epoch end
    assert_weights(trained(data, batch_size=1, accumulate=4), expected_step(data))


def test_a_window_without_counted_tokens_leaves_the_weights_finite_and_unchanged() -> None:
    data = [{**sample, "prompt_length": len(sample["input_ids"])} for sample in samples()[:2]]  # all prompt
    initial = dict(models()[0].named_parameters())
    assert_weights(trained(data, batch_size=1, accumulate=2), {n: p.double() for n, p in initial.items()})


def test_two_ddp_processes_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_weights(torch.load(tmp_path / "student.pt", weights_only=True), expected_step(samples()))


@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0]])
def test_rescale_multiplies_by_k_w_over_the_window_count(counts: list[int]) -> None:
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.tensor([1.0, -2.0])
    normaliser = TokenMeanGradients()
    for count in counts:
        normaliser.count(torch.arange(4) < count)
    normaliser.rescale([parameter], accumulate_grad_batches=3, world_size=1)
    torch.testing.assert_close(parameter.grad, torch.tensor([1.0, -2.0]) * (3 / max(sum(counts), 1)))
    assert normaliser.tokens is None  # the next window starts anew
