"""What a DataLoader rebuilt over another dataset or sampler keeps of the original."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader


def worker_settings(loader: DataLoader) -> dict[str, Any]:
    """The keyword arguments of ``loader`` other than its dataset, batching, sampling and generator.

    Workers, collate function, memory pinning, timeout, worker start-up and prefetching: what
    :class:`~lightning_kd.callbacks.exact_resume.ExactResume` (a ``StatefulDataLoader``) and
    :class:`~lightning_kd.data.UnlabelledDataModule` pass on when they rebuild a user's loader.
    """
    settings = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if hasattr(loader, "in_order"):  # torch >= 2.6
        settings["in_order"] = loader.in_order
    return settings
