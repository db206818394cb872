"""MutualLearningModule: peers that learn together from the labels and from each other (DML)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.batch_checks import (
    check_logits,
    check_separate,
    class_indices,
    class_targets,
    explain_forward_error,
    probabilities_message,
    probability_rows,
)
from lightning_kd.callbacks.exact_resume import default_exact_resume
from lightning_kd.callbacks.run_length import RunLength
from lightning_kd.checkpoint_io import use_atomic_checkpoint_io
from lightning_kd.diagnosis import CheckFinite, non_finite_cause, non_finite_loss_error
from lightning_kd.host_checks import HostBatchChecks
from lightning_kd.losses.base import checked_temperature
from lightning_kd.losses.functional import kd_loss
from lightning_kd.model_io import BatchKey, infer_num_classes, logits_of, select
from lightning_kd.module_setup import (
    check_equal_training_batches,
    configure_optimization,
    hparams_given_by_cli,
)
from lightning_kd.step_monitor import (
    MonitorReadings,
    Reading,
    StepMonitor,
    checked_finite_setting,
    logs_this_step,
)

__all__ = ["MutualLearningModule"]


class MutualLearningModule(HostBatchChecks, MonitorReadings, pl.LightningModule):
    r"""Deep mutual learning: any number of peers, each taught by the labels and the others.

    Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018. Peer :math:`k` minimises

    .. math::
        \mathcal{L}_k = w_{ce}\,\mathrm{CE}(z_k, y) + w_{kd}\,\frac{1}{K-1}\sum_{l \ne k}
        T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_l/T) \,\|\, \mathrm{softmax}(z_k/T)\big)

    with the other peers' logits :math:`z_l` detached, so the sum over peers that the single
    optimizer minimises gives every peer exactly the gradient of its own loss. All peers
    step together on predictions of the same batch; the paper updates them in turn, each with
    the others' predictions recomputed after the previous update (K forward passes per peer
    instead of one).

    Logged: ``train/loss``, ``train/loss_peer<k>`` (at Lightning's logging steps, read from the
    device in one transfer: no other step waits for it); ``val|test/acc_peer<k>`` for every peer,
    ``val|test/acc`` of peer 0 (what ``forward`` and ``predict`` use) and
    ``val|test/acc_ensemble`` of the peers' averaged probabilities. Every peer is a submodule,
    so checkpoints hold all of them.

    Args:
        peers: two or more networks over the same classes (any architectures).
        temperature: softening temperature :math:`T` (the paper: 1).
        ce_weight: :math:`w_{ce}`.
        kd_weight: :math:`w_{kd}`.
        num_classes: number of classes; default: inferred from the peers.
        input_key: where the inputs are in a batch: an index for tuples, a key for dicts.
        target_key: where the labels are in a batch.
        optimizer: a callable ``params -> Optimizer``; default Adam with lr 1e-3.
        lr_scheduler: a callable ``optimizer -> LRScheduler``; default: cosine decay to 0.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when ``lr_scheduler`` steps.
        cosine_decay: use the default cosine decay when ``lr_scheduler`` is ``None``.
        check_finite: stop with an error naming the first step whose loss was NaN/Inf, each
            peer's loss and the cause: ``True`` (read at the logging steps, epoch ends, checkpoint
            saves and the end of training), ``"step"`` (read in every step) or ``False``.
    """

    def __init__(
        self,
        peers: Sequence[nn.Module],
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        num_classes: int | None = None,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        cosine_decay: bool = True,
        check_finite: CheckFinite = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=None if hparams_given_by_cli() else ["peers", "optimizer", "lr_scheduler"]
        )
        if len(peers) < 2:
            raise ValueError(f"Mutual learning needs at least two peers, got {len(peers)}.")
        check_separate(
            {f"peer {k}": peer for k, peer in enumerate(peers)},
            "they would be one network learning from itself",
        )
        self.peers = nn.ModuleList(peers)
        self.temperature = checked_temperature(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.input_key = input_key
        self.target_key = target_key
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.cosine_decay = cosine_decay
        self.check_finite = checked_finite_setting(check_finite)
        #: what the training steps record on the device, read at the logging steps and epoch ends
        self.monitor = StepMonitor(check_finite=check_finite is True)
        self.reset_host_checks()
        self.num_classes = num_classes if num_classes is not None else self._infer_num_classes()
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes={self.num_classes}: classification needs at least 2 classes. For a binary task "
                "give the peers 2 outputs (e.g. nn.Linear(features, 2)) and use labels 0/1."
            )

        def accuracy() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=self.num_classes, average="micro")

        names = [f"{stage}_acc_peer{k}" for stage in ("val", "test") for k in range(len(peers))]
        names += ["val_acc_ensemble", "test_acc_ensemble"]
        self.metrics = nn.ModuleDict({name: accuracy() for name in names})

    def _infer_num_classes(self) -> int:
        found = {infer_num_classes(peer) for peer in self.peers}
        if None in found or len(found) != 1:
            raise ValueError(
                f"Cannot infer one class count from the peers (found {sorted(map(str, found))}): build all "
                "peers over the same classes and pass num_classes=."
            )
        return found.pop()

    def setup(self, stage: str) -> None:
        """Make Lightning's default checkpoint IO :class:`~lightning_kd.checkpoint_io.AtomicCheckpointIO`.

        Lightning's warning that this module has an ``on_before_batch_transfer`` is silenced.
        """
        use_atomic_checkpoint_io(self.trainer)
        self.prepare_host_checks()

    def forward(self, inputs: Any) -> Any:
        """Peer 0's output."""
        return self.peers[0](inputs)

    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of a batch, by ``input_key`` / ``target_key``."""
        return select(batch, self.input_key, "input_key"), select(batch, self.target_key, "target_key")

    def peer_logits(self, inputs: Any) -> list[Tensor]:
        """Every peer's logits on ``inputs``; a failure caused by the inputs is re-raised with its fix."""
        try:
            return [logits_of(peer(inputs)) for peer in self.peers]
        except (RuntimeError, ValueError) as error:
            explained = explain_forward_error(
                error, [(f"peer {k}", peer, inputs) for k, peer in enumerate(self.peers)]
            )
            if explained is not None:
                raise explained from error
            raise

    def peer_losses(self, logits: Sequence[Tensor], targets: Tensor) -> list[Tensor]:
        """Every peer's loss (see the class docstring), in the order of ``logits``."""
        losses = []
        for k, own in enumerate(logits):
            mimicry = sum(
                kd_loss(own, other.detach(), self.temperature) for j, other in enumerate(logits) if j != k
            )
            ce = F.cross_entropy(own.float(), targets)
            losses.append(self.ce_weight * ce + self.kd_weight * mimicry / (len(logits) - 1))
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step of every peer; each peer's loss and the sum are recorded, logged at the logging steps."""
        self.check_if_unchecked(batch, "training")
        inputs, targets = self.unpack_batch(batch)
        targets = class_targets(targets, self.num_classes, "training", read_values=False)
        logits = self.peer_logits(inputs)
        if batch_idx == 0 and self.global_step == 0:
            for k, peer_logits in enumerate(logits):
                check_logits(peer_logits, f"peer {k}", self.num_classes)
                self.monitor.defer_warning(probability_rows(peer_logits), probabilities_message(f"peer {k}"))
        losses = self.peer_losses(logits, targets)
        total = torch.stack(losses).sum()
        if self.check_finite == "step" and not torch.isfinite(total):
            values = {f"peer{k}": loss for k, loss in enumerate(losses)}
            raise non_finite_loss_error(
                "peer losses", self.global_step, values, self.non_finite_cause(batch, logits)
            )
        recorded = {f"train/loss_peer{k}": loss for k, loss in enumerate(losses)}
        self.monitor.record(self.global_step, {**recorded, "train/loss": total})
        if logs_this_step(self._trainer):
            self.log_reading(self.read_monitor(batch, logits))
        return total

    def non_finite_cause(self, batch: Any, logits: Sequence[Tensor] | None) -> str:
        """What made the peers' loss NaN/Inf (:func:`~lightning_kd.diagnosis.non_finite_cause`).

        Without ``logits`` (found after the step), only the settings and the weights are read.
        """
        return non_finite_cause(
            batch if logits is not None else None,
            {f"peer {k}": peer for k, peer in enumerate(self.peers)},
            {f"peer {k}": peer_logits for k, peer_logits in enumerate(logits or [])},
            settings={
                "temperature": self.temperature,
                "ce_weight": self.ce_weight,
                "kd_weight": self.kd_weight,
            },
            trained=[f"peer {k}" for k in range(len(self.peers))],
            samples=int(logits[0].shape[0]) if logits and logits[0].ndim else None,
        )

    def non_finite_error(
        self, reading: Reading, batch: Any = None, logits: Sequence[Tensor] | None = None
    ) -> FloatingPointError:
        """The error for a NaN/Inf peer loss.

        ``batch`` and ``logits``: the current step's, diagnosed when the loss was found in that step.
        """
        assert reading.first_bad is not None
        same_step = reading.first_bad == reading.last_step
        values = {f"peer{k}": reading.bad_values[f"train/loss_peer{k}"] for k in range(len(self.peers))}
        cause = self.non_finite_cause(batch, logits if same_step else None)
        return non_finite_loss_error(
            "peer losses", reading.first_bad, values, cause, found_at=reading.last_step
        )

    def on_train_epoch_end(self) -> None:
        """Read the epoch's records (raise for a NaN/Inf loss); the last losses go to ``callback_metrics``."""
        self.log_reading(self.read_monitor(), epoch_end=True)

    def on_train_end(self) -> None:
        """Raise for a NaN/Inf loss not yet read."""
        self.read_monitor()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """During a fit, raise for a NaN/Inf loss not yet read, before anything is written."""
        self.read_before_saving()

    def evaluate(self, batch: Any, stage: str) -> None:
        """Every peer's accuracy and the ensemble's on one held-out batch, under ``stage/``."""
        inputs, targets = self.unpack_batch(batch)
        targets = class_targets(targets, self.num_classes, stage, read_values=False)  # values: in the step
        logits = self.peer_logits(inputs)
        loss = F.cross_entropy(logits[0].float(), targets)
        targets = class_indices(targets)
        for k, peer_logits in enumerate(logits):
            check_logits(peer_logits, f"peer {k}", self.num_classes)
            self.metrics[f"{stage}_acc_peer{k}"](peer_logits, targets)
            self.log(f"{stage}/acc_peer{k}", self.metrics[f"{stage}_acc_peer{k}"], prog_bar=k == 0)
        mean_probs = torch.stack([peer_logits.float().softmax(dim=-1) for peer_logits in logits]).mean(dim=0)
        self.metrics[f"{stage}_acc_ensemble"](mean_probs, targets)
        self.log(f"{stage}/acc_ensemble", self.metrics[f"{stage}_acc_ensemble"])
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc_peer0"])
        self.log(f"{stage}/loss", loss, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Every peer's accuracy and the peers' ensemble accuracy (labels checked in :meth:`check_batch`)."""
        self.check_if_unchecked(batch, "validation")
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """As validation, under ``test/``."""
        self.check_if_unchecked(batch, "test")
        self.evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Peer 0's logits."""
        inputs = select(batch, self.input_key, "input_key")
        return logits_of(self.peers[0](inputs))

    def configure_callbacks(self) -> list[pl.Callback]:
        """In a fit, follow a resumed run's length and resume exactly.

        :class:`~lightning_kd.callbacks.run_length.RunLength` and
        :class:`~lightning_kd.callbacks.exact_resume.ExactResume`, given to fits only.
        """
        fitting = self._trainer is None or self._trainer.state.fn == "fit"
        return [RunLength(), *default_exact_resume(self._trainer)] if fitting else []

    def on_train_start(self) -> None:
        """Check that the DDP processes have equal numbers of training batches; start the step records."""
        check_equal_training_batches(self.trainer)
        self.monitor.reset()

    def configure_optimizers(self) -> Any:
        """All peers in one optimizer (each peer's gradient comes from its own loss only)."""
        return configure_optimization(
            self,
            list(self.parameters()),
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.lr_scheduler_interval,
            self.cosine_decay,
        )
