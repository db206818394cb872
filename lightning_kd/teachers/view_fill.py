"""Filling a TeacherViewCache in a separate pass: the teacher alone, over every (sample, view)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from lightning_kd.model_io import call_model, select
from lightning_kd.teachers.fingerprints import input_signature
from lightning_kd.teachers.loading import freeze
from lightning_kd.teachers.view_cache import TeacherViewCache, view_cache_fingerprint

__all__ = ["fill_view_cache"]


@torch.no_grad()
def fill_view_cache(
    teacher: nn.Module,
    dataset: Any,
    cache: TeacherViewCache,
    batch_size: int = 256,
    input_key: Any = 0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> TeacherViewCache:
    """Run ``teacher`` (frozen in place, moved to ``device``) on every view of ``dataset``; store its logits.

    ``dataset`` is the :class:`~lightning_kd.data.ReplayedViews` the student will train on; the
    cache gets the fingerprint a training run computes (:func:`view_cache_fingerprint`), so a
    :class:`~lightning_kd.DistillationModule` with ``teacher_cache=cache`` (same directory) then
    reads it without running the teacher. Views already stored (an interrupted fill) are
    skipped; the cache is marked complete at the end and its lock released. ``input_key`` is
    where the teacher's input is in an item (the module's ``teacher_input_key``, or its
    ``input_key`` when that is unset).

    Raises:
        ValueError: ``dataset`` and ``cache`` disagree on the number of views.
        TypeError: the teacher does not return a logits tensor.
    """
    if dataset.views != cache.views:
        raise ValueError(
            f"The dataset replays {dataset.views} views per sample but the cache stores {cache.views}: give "
            "both the same number."
        )
    teacher = freeze(teacher).to(device)
    keys = [(index, view) for index in range(len(dataset)) for view in range(dataset.views)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=num_workers)
    probe = default_collate([dataset[keys[0]]])
    logits = _logits(teacher, select(probe, input_key, "input_key"), device)
    cache.open(
        view_cache_fingerprint(teacher, dataset),
        len(dataset),
        logits,
        num_params=dataset.augmentation.num_params,
    )
    try:
        if cache.complete:  # another pass (or run) stored every view already
            return cache
        for batch in loader:
            rows = cache.indices_of(batch)
            if bool(cache.arrays["filled"][rows].all()):
                continue
            inputs = select(batch, input_key, "input_key")
            signature = input_signature(_to(inputs, device), len(rows))
            cache.store(rows, _logits(teacher, inputs, device), {}, signature)
        cache.finish_epoch()
    finally:
        cache.release()
    return cache


def _to(inputs: Any, device: torch.device | str) -> Any:
    return inputs.to(device) if isinstance(inputs, Tensor) else inputs


def _logits(teacher: nn.Module, inputs: Any, device: torch.device | str) -> Tensor:
    output = call_model(teacher, _to(inputs, device))
    if not isinstance(output, Tensor):
        raise TypeError(
            f"The teacher returns a {type(output).__name__}; the view cache stores logits tensors."
        )
    return output
