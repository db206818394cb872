"""TeacherViewCache: a frozen teacher's top-k soft labels per (sample, augmented view), replayed.

FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022)
and ReLabel (Yun et al., CVPR 2021) store, per sample, a number of augmented views (their
parameters) with the teacher's soft labels, and replay a stored view at training time, so the
teacher never runs again. Beyer et al. ("Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022) warn that a fixed set of views lets the student overfit: ``views`` is
the knob.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_kd.teachers.cache import TeacherOutputCache
from lightning_kd.teachers.fingerprints import PROBE_SAMPLES, dataset_fingerprint, teacher_fingerprint

__all__ = ["VIEW_FORMAT_VERSION", "TeacherViewCache", "view_cache_fingerprint"]

#: version of the view rows' layout and meaning; part of the fingerprint, so another version rebuilds
VIEW_FORMAT_VERSION = 1


def view_cache_fingerprint(teacher: nn.Module, dataset: Any) -> str:
    """SHA-256 of the teacher's weights, the un-augmented data, the augmentation's ``repr`` and ``views``.

    ``dataset`` is a :class:`~lightning_kd.data.ReplayedViews`; its wrapped dataset is
    fingerprinted by :func:`~lightning_kd.teachers.fingerprints.dataset_fingerprint` (which
    refuses a dataset that is itself randomly augmented).
    """
    parts = [
        teacher_fingerprint(teacher),
        dataset_fingerprint(dataset.dataset),
        repr(dataset.augmentation),
        f"views={dataset.views}",
        f"input_key={dataset.input_key!r}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _key_values(batch: Any, key: int | str, what: str) -> Tensor:
    try:
        values = batch[key]
    except (KeyError, IndexError, TypeError):
        raise KeyError(
            f"TeacherViewCache reads each sample's {what} at {key!r}, which the batch lacks. Train on "
            "lightning_kd.data.ReplayedViews (ReplayedViewsDataModule): its tuple batches are (inputs, "
            "targets, index, view, params): index_key=2, view_key=3, params_key=4 (dicts: 'index', "
            "'view', 'view_params')."
        ) from None
    if not isinstance(values, Tensor):
        raise ValueError(f"TeacherViewCache: the batch item at {key!r} ({what}) is not a tensor.")
    return values.cpu()


class TeacherViewCache(TeacherOutputCache):
    """A frozen teacher's soft labels for ``views`` replayable augmented views of every training sample.

    Give it to ``DistillationModule(..., teacher_cache=TeacherViewCache(...))`` and train on
    :class:`~lightning_kd.data.ReplayedViewsDataModule` (or a loader of
    :class:`~lightning_kd.data.ReplayedViews` with a :class:`~lightning_kd.data.ViewSampler`):
    every batch carries each item's sample index, view and the view's parameters. A batch whose
    views are all stored is served from the cache (no teacher forward); a batch with any view not
    stored yet runs the teacher and stores its views (so a training run fills the cache in its
    first epochs), or fill it beforehand with
    :func:`~lightning_kd.teachers.view_fill.fill_view_cache`.

    Rows: one per ``(index, view)``, at ``index * views + view``, each with the teacher's logits
    (``top_k=k``: the ``k`` largest, their class ids and the log-sum-exp of the rest, rebuilt by
    :func:`~lightning_kd.teachers.cache.topk_logits`, which spreads the tail mass uniformly), the
    view's ``float32`` parameters, and the :func:`~lightning_kd.teachers.fingerprints.input_signature`
    of the view the teacher saw. Everything else (files, CRC-32 per row, ``filled`` mask, one
    writer per directory, space reserved up front, rebuild on another fingerprint or format) is
    :class:`~lightning_kd.teachers.cache.TeacherOutputCache`'s.

    What is never served: a view the teacher did not see. A row is served only when it is
    filled, its stored parameters equal the batch's (checked on the host at every lookup), and
    the signature of the batch's input equals the stored one (compared on the device, read at
    the first served batch and at every epoch end). Any difference is a ``RuntimeError``
    naming the sample and view. The fingerprint (:func:`view_cache_fingerprint`) covers the
    teacher's weights, :data:`~lightning_kd.teachers.fingerprints.PROBE_SAMPLES` samples of the
    un-augmented data, the augmentation's ``repr`` (ops, settings, seed), ``views`` and
    :data:`VIEW_FORMAT_VERSION`.

    Hooked teacher features are not stored (a view's features would cost what its input costs):
    terms that read teacher layers are refused.

    Args:
        directory: where the memory-mapped files live; ``None`` keeps the cache in CPU memory.
        views: stored views per sample (the dataset's ``views`` must match).
        top_k: keep only the ``k`` largest logits per view (``0 < k < C``); ``None``: all.
        dtype: storage dtype of the logits, ``"float32"`` or ``"float16"``.
        index_key: where a batch holds the sample indices (a position, or a key of dict batches).
        view_key: where it holds the views.
        params_key: where it holds the views' parameters.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        views: int = 4,
        top_k: int | None = None,
        dtype: Literal["float32", "float16"] = "float32",
        index_key: int | str = 2,
        view_key: int | str = 3,
        params_key: int | str = 4,
    ) -> None:
        super().__init__(directory, top_k, dtype, index_key)
        if views < 1:
            raise ValueError(f"views must be a positive number of views per sample, got {views}.")
        self.views, self.view_key, self.params_key = views, view_key, params_key
        self.num_samples = 0
        self.num_params = 0
        self._batch_params: Tensor | None = None  # the parameters of the batch last read by indices_of

    def open(
        self,
        fingerprint: str,
        num_samples: int,
        example_logits: Tensor,
        example_features: Mapping[str, Tensor] | None = None,
        strategy: Any = None,
        num_params: int = 1,
    ) -> None:
        """Open (or create) ``num_samples * views`` rows of ``num_params`` view parameters each.

        ``fingerprint`` is :func:`view_cache_fingerprint`; see :meth:`TeacherOutputCache.open`.
        """
        if example_features:
            raise ValueError(
                "TeacherViewCache stores the teacher's soft labels only, not hooked features (got "
                f"{sorted(example_features)}): use terms that read the teacher's logits, or "
                "teacher_cache=None."
            )
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1 (the view's parameters), got {num_params}.")
        self.num_samples, self.num_params = num_samples, num_params
        super().open(
            f"views|{VIEW_FORMAT_VERSION}|{fingerprint}",
            num_samples * self.views,
            example_logits,
            {},
            strategy,
        )

    def _layout(self, num_samples: int, num_classes: int, features: Mapping[str, Tensor]) -> dict[str, Any]:
        """The base class's files plus ``params`` (checksummed like them); int8 class ids for C <= 127."""
        base = super()._layout(num_samples, num_classes, features)
        layout = {name: spec for name, spec in base.items() if name not in ("checksum", "filled")}
        if "topk_indices" in layout and num_classes <= torch.iinfo(torch.int8).max:  # one byte per class id
            layout["topk_indices"] = ("int8", layout["topk_indices"][1])
        layout["params"] = ("float32", [num_samples, self.num_params])
        if "checksum" in base:
            layout["checksum"] = ("int32", [num_samples, len(layout)])
        layout["filled"] = base["filled"]
        return layout

    @property
    def bytes_per_view(self) -> int:
        """Bytes one stored view takes (logits, parameters, signature, checksums, ``filled``)."""
        return super().bytes_per_sample

    @property
    def bytes_per_sample(self) -> int:
        """Bytes one sample's ``views`` take."""
        return self.bytes_per_view * self.views

    # ----------------------------------------------------------------- use
    def indices_of(self, batch: Any) -> Tensor:
        """The batch's rows ``index * views + view``, checked; keeps the batch's view parameters."""
        indices = _key_values(batch, self.index_key, "index")
        views = _key_values(batch, self.view_key, "view")
        params = _key_values(batch, self.params_key, "view parameters")
        for values, name in ((indices, "index"), (views, "view")):
            if values.dtype.is_floating_point or values.dim() != 1:
                raise ValueError(f"TeacherViewCache: the batch's {name} values are not a 1-D integer tensor.")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise IndexError(
                f"TeacherViewCache holds {self.num_samples} samples (the training dataset's length) but a "
                f"batch has index {int(indices.max())}: the indices must be positions in the training "
                "dataset."
            )
        if len(views) and (int(views.min()) < 0 or int(views.max()) >= self.views):
            raise IndexError(
                f"TeacherViewCache stores {self.views} views per sample but a batch has view "
                f"{int(views.max())}: give the dataset and the cache the same number of views."
            )
        if params.shape != (len(indices), self.num_params):
            raise ValueError(
                f"The batch's view parameters have shape {tuple(params.shape)}, expected "
                f"({len(indices)}, {self.num_params}): is params_key={self.params_key!r} the parameters?"
            )
        self._batch_params = params.float()
        return indices * self.views + views

    def lookup(
        self, indices: Tensor, signature: Tensor, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Logits of the rows ``indices`` (from :meth:`indices_of`); ``None`` if one is not stored.

        Raises:
            RuntimeError: a stored view's parameters differ from the batch's, a row does not match
                its checksum, or (read at the first served batch) the input differs from the stored one.
        """
        found = super().lookup(indices, signature, device)  # rows checked against their CRC first
        if found is not None and self._batch_params is not None:  # on the host: read by indices_of
            self._check_params(indices, self._batch_params)
        return found

    def _check_params(self, indices: Tensor, params: Tensor) -> None:
        """Raise if the stored parameters of the rows ``indices`` differ from ``params`` (host tensors)."""
        stored = self.arrays["params"][indices]
        differs = (stored != params).any(dim=1)
        if bool(differs.any()):
            index, view = divmod(int(indices[differs][0]), self.views)
            raise RuntimeError(
                f"Training sample {index}, view {view}: the batch's view parameters "
                f"{params[differs][0].tolist()} differ from those the teacher cache stored "
                f"({stored[differs][0].tolist()}), so the view is not the one the teacher saw (the "
                f"augmentation's drawing changed since the cache was built). {self._rebuild_advice()}"
            )

    def store(
        self, indices: Tensor, logits: Tensor, features: Mapping[str, Tensor], signature: Tensor
    ) -> None:
        """Store the rows ``indices`` not stored yet, with the view parameters read by :meth:`indices_of`.

        A stored view is never written again: its first soft labels stay (the teacher's logits of
        one view differ in their last bits with the batch they were computed in). So every step
        that serves a view gets the same values, in any run that reads the cache; and under DDP,
        a view that two processes see in one epoch (a ``DistributedSampler`` pads the epoch with
        repeated items) is written by the first (not guaranteed in one step: see
        :class:`~lightning_kd.TeacherOutputCache`). The rows the batch holds already are checked
        instead: their parameters and input signature must be the batch's.

        Raises:
            RuntimeError: a view of the batch is stored with other parameters or another input.
        """
        params = self._batch_params
        if params is None or len(params) != len(indices):
            raise RuntimeError(
                "TeacherViewCache.store needs the view parameters of the same batch: call indices_of(batch) "
                "first."
            )
        stored = self.arrays["filled"][indices]
        if bool(stored.any()):
            self._check_params(indices[stored], params[stored])
        super().store(indices, logits, features, signature)  # checks stored rows' inputs, writes new ones

    def _batch_rows(self, keep: Tensor) -> dict[str, Tensor]:
        """The view parameters of the batch positions ``keep`` (read by :meth:`indices_of`)."""
        return {"params": self._batch_params[keep]}

    def _verify_rows(self, indices: Tensor, rows: Mapping[str, Tensor]) -> None:
        wrong = self.arrays["checksum"][indices].numpy() != self._checksums(indices, rows)
        bad = np.flatnonzero(wrong.any(axis=1))
        if len(bad):
            index, view = divmod(int(indices[bad[0]]), self.views)
            files = ", ".join(f"{self._checked[c]}.npy" for c in np.flatnonzero(wrong[bad[0]]))
            raise RuntimeError(
                f"The teacher view cache in {self.directory} is damaged: the row of training sample {index}, "
                f"view {view} in {files} does not match the checksum stored with it in checksum.npy (a file "
                f"was changed, zeroed or corrupted after it was written). Delete {self.directory} to rebuild "
                "the cache; it holds only the teacher's outputs."
            )

    def check_inputs(self, first_mismatch: int | None = None) -> None:
        """Raise if a served view's input differed from the one the teacher saw (reads the device flag)."""
        if first_mismatch is None:
            first_mismatch = int(self._first_mismatch) if self._first_mismatch is not None else None
        self._first_mismatch = None
        if first_mismatch is None or first_mismatch >= len(self.arrays["filled"]):
            return
        index, view = divmod(first_mismatch, self.views)
        raise RuntimeError(
            f"Training sample {index}, view {view}: the input replayed now is not the view the teacher "
            "saw when the cache stored it: the augmentation's code or a library's version changed, or "
            f"the sample's data changed (the fingerprint reads only {PROBE_SAMPLES} samples), or the "
            f"batch values at index_key={self.index_key!r} / view_key={self.view_key!r} are not the "
            f"keys that ReplayedViews gave. {self._rebuild_advice()}"
        )

    def _rebuild_advice(self) -> str:
        if self.directory is None:
            return "Use a new TeacherViewCache."
        return f"Delete {self.directory} to rebuild the cache."

    def view_params(self, index: int, view: int) -> Tensor:
        """The stored parameters of view ``view`` of sample ``index`` (a copy).

        Raises:
            LookupError: the view is not stored.
        """
        row = index * self.views + view
        if (
            not 0 <= index < self.num_samples
            or not 0 <= view < self.views
            or not bool(self.arrays["filled"][row])
        ):
            raise LookupError(f"The teacher view cache holds no view {view} of sample {index}.")
        return self.arrays["params"][row].clone()

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory"
        return (
            f"TeacherViewCache({where}, views={self.views}, top_k={self.top_k}, dtype={self.dtype}, "
            f"index_key={self.index_key!r}, view_key={self.view_key!r}, params_key={self.params_key!r})"
        )
