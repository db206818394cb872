"""ReproducibleOrder: the former opt-in exact resume, now :class:`ExactResume` with a fixed seed."""

from __future__ import annotations

import warnings

from lightning_kd.callbacks.exact_resume import ExactResume

__all__ = ["ReproducibleOrder"]


class ReproducibleOrder(ExactResume):
    """Deprecated: every training module of the package resumes exactly by itself.

    Each module installs :class:`~lightning_kd.callbacks.exact_resume.ExactResume` (its seed:
    ``seed_everything``'s), which also covers mid-epoch checkpoints, loader workers and random
    transforms. ``ReproducibleOrder(seed)`` is kept for existing scripts and checkpoints: it is
    ``ExactResume(seed=seed)`` (the module then adds none), and warns once that it can be dropped.

    Args:
        seed: the run's seed; a resumed run must use the checkpoint's.
    """

    def __init__(self, seed: int = 0) -> None:
        warnings.warn(
            "ReproducibleOrder is deprecated: the training modules of lightning_kd resume exactly by "
            "default (ExactResume, seeded by seed_everything), mid-epoch too. Remove it, or pass "
            f"ExactResume(seed={seed}) to fix the seed.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(seed=seed)
