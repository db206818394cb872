"""HostBatchChecks: the checks that read a batch's values, run before Lightning moves the batch.

Reading a value on an accelerator waits for it, so the training modules check labels (and what
a teacher's role reads, e.g. a cache's sample indices) in ``on_before_batch_transfer``, while
the batch is still on the host. A datamodule with its own ``on_before_batch_transfer`` replaces
the module's (Lightning calls only one): the step then runs the checks itself.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from lightning_kd.batch_checks import class_targets

__all__ = ["OWN_HOOK_WARNING", "HostBatchChecks", "loop_stage"]

#: Lightning's warning that a module's ``on_before_batch_transfer`` runs when a datamodule is
#: given: intended here, silenced by :meth:`HostBatchChecks.prepare_host_checks`
OWN_HOOK_WARNING = r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed"


def loop_stage(trainer: Any) -> str | None:
    """The loop a batch is for as the batch checks name it ("training", "validation", "test"), or ``None``."""
    if trainer is None:
        return None
    if trainer.training:
        return "training"
    if trainer.validating or trainer.sanity_checking:
        return "validation"
    return "test" if trainer.testing else None


class HostBatchChecks:
    """Mixin of a LightningModule (listed before it): labels checked on the host, every batch.

    The module provides ``unpack_batch(batch) -> (inputs, targets)`` and ``num_classes``; it calls
    :meth:`reset_host_checks` in ``__init__``, :meth:`prepare_host_checks` in ``setup`` and
    :meth:`check_if_unchecked` at the start of each step. Override :meth:`check_batch` (calling
    ``super()``) to check more of a batch there.
    """

    def reset_host_checks(self) -> None:
        """Forget which loops had their device labels read (call in ``__init__``)."""
        self._labels_read_in: dict[str, int] = {}  # loop -> epoch whose device labels were read
        self._batch_checked = False  # whether check_batch ran on the batch of the coming step

    def prepare_host_checks(self) -> None:
        """Silence Lightning's warning about this hook and start a new run's epochs (call in ``setup``)."""
        warnings.filterwarnings("ignore", message=OWN_HOOK_WARNING)
        self._labels_read_in.clear()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check the batch while it is still on the host (:meth:`check_batch`), before Lightning moves it."""
        stage = loop_stage(self._trainer)
        if stage is not None and batch is not self.example_input_array:  # that one: the model summary's
            self.check_batch(batch, stage)
        return batch

    def check_batch(self, batch: Any, stage: str) -> None:
        """The labels' values (:func:`~lightning_kd.batch_checks.class_targets`), read on the host.

        In every batch on the host; labels that the data pipeline already put on an accelerator
        only in the first batch of each epoch of each loop, as reading them waits for the device.
        """
        targets = self.unpack_batch(batch)[1]
        if targets is not None:
            on_host = not isinstance(targets, Tensor) or targets.device.type == "cpu"
            if on_host or self._labels_read_in.get(stage) != self.current_epoch:
                self._labels_read_in[stage] = self.current_epoch
                class_targets(targets, self.num_classes, stage, read_values=True)
        self._batch_checked = True

    def check_if_unchecked(self, batch: Any, stage: str) -> None:
        """:meth:`check_batch` in the step where a datamodule's ``on_before_batch_transfer`` replaced ours."""
        if not self._batch_checked:
            self.check_batch(batch, stage)
        self._batch_checked = False
