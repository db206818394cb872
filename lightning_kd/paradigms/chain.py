"""Chains of distillation: each model is taught by the one before it.

One concept covers two paradigms:

- **Born-again networks** (Furlanello et al., "Born Again Neural Networks", ICML 2018):
  generation 0 learns from the labels, generation ``k`` of the same architecture learns from
  generation ``k - 1``; the generations' averaged predictions form the born-again ensemble.
- **Teacher assistants** (Mirzadeh et al., "Improved Knowledge Distillation via Teacher
  Assistant", AAAI 2020): teacher -> assistant of intermediate size -> student, so that no step
  bridges the whole capacity gap.

:func:`run_chain` trains the links in order with :class:`~lightning_kd.DistillationModule`:
link ``k`` is the student, link ``k - 1`` the frozen teacher, loaded from the checkpoint that
link ``k - 1`` wrote. The first link learns from the labels or is given by a checkpoint. The
``lightning-kd-chain`` command (:func:`lightning_kd.cli.chain_main`) runs a chain from one YAML file.

Each link keeps its files in ``<out_dir>/<name>/``: ``checkpoint.ckpt`` (written after every
epoch), ``version_*/metrics.csv`` (CSV logs) and ``result.json``. A link is *finished* once its
``result.json`` exists: it is written after the link's test.
Running the same chain with the same ``out_dir`` again reuses finished links and resumes an
unfinished one from its last checkpoint (written after every epoch). Once a link is trained
(or resumed) again, the links after it are trained from scratch: their teacher changed. An
unfinished link resumed with other ``epochs`` than its interrupted run had is finished with its
default cosine schedule re-planned to the new end (status ``"replanned"``); with fewer epochs
than it has already trained, it is refused.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_kd.callbacks.run_length import RunLength, RunTooShortError
from lightning_kd.losses import LossTerm
from lightning_kd.module import DistillationModule
from lightning_kd.teachers.ensemble import TeacherEnsemble
from lightning_kd.teachers.loading import load_weights

__all__ = [
    "ChainLink",
    "LinkResult",
    "chain_table",
    "ensemble_accuracy",
    "run_chain",
]

#: Trainer settings that the chain sets per link itself.
RESERVED_TRAINER_KEYS = ("callbacks", "default_root_dir")
CHECKPOINT_NAME = "checkpoint"  # <out_dir>/<link name>/checkpoint.ckpt
LinkStatus = Literal["trained", "resumed", "replanned", "given", "reused"]


@dataclass
class ChainLink:
    """One model of a chain and how it is obtained.

    Args:
        name: unique within the chain; names the link's folder ``<out_dir>/<name>/`` (checkpoint,
            results file, CSV logs).
        model: the network; the next link's teacher is a copy of it with this link's trained weights.
        epochs: training epochs (leave 0 when ``checkpoint`` is given).
        checkpoint: trained weights to use instead of training (a teacher trained elsewhere);
            any file :func:`~lightning_kd.teachers.load_weights` reads.
        losses: this link's loss terms; default: the chain's ``losses`` for a link with a teacher,
            cross-entropy for the first link.
        optimizer: ``params -> Optimizer``; default: the chain's ``optimizer`` (Adam 1e-3 if unset).
        lr_scheduler: ``optimizer -> LRScheduler``; default: cosine decay over the link's run.
        callbacks: extra callbacks of this link's Trainer.
    """

    name: str
    model: nn.Module
    epochs: int = 0
    checkpoint: str | None = None
    losses: list[LossTerm] | None = None
    optimizer: OptimizerCallable | None = None
    lr_scheduler: LRSchedulerCallable | None = None
    callbacks: list[pl.Callback] = field(default_factory=list)


@dataclass
class LinkResult:
    """What one link gave: test accuracy (fraction), its checkpoint, and how it was obtained.

    ``status`` is ``"trained"`` (from scratch), ``"resumed"`` (from its last checkpoint),
    ``"replanned"`` (resumed with another length than its interrupted run planned: from the resume
    on, the default learning rate followed the cosine of the new length, not one cosine throughout),
    ``"given"`` (``ChainLink.checkpoint``, tested only) or ``"reused"`` (finished in an earlier run).
    ``seconds_per_epoch`` times the training epochs of the run that finished the link (0 if given).
    ``planned_epochs``: the epochs of the interrupted run of a link resumed with other epochs (its
    own ``lr_scheduler`` then went on as restored, with a warning), else ``None``.
    """

    name: str
    teacher: str | None
    model: str
    parameters: int
    epochs: int
    accuracy: float
    checkpoint: str
    seconds_per_epoch: float
    status: LinkStatus
    planned_epochs: int | None = None


class _EpochTimer(pl.Callback):
    """Seconds per training epoch of one fit, counting only the epochs this fit ran (not resumed ones)."""

    def __init__(self) -> None:
        self.started, self.first_epoch, self.seconds_per_epoch = 0.0, 0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started, self.first_epoch = time.perf_counter(), trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = trainer.current_epoch - self.first_epoch
        self.seconds_per_epoch = (time.perf_counter() - self.started) / max(epochs, 1)


def _validate(links: Sequence[ChainLink], trainer: Mapping[str, Any]) -> None:
    if not links:
        raise ValueError("The chain has no links: give at least one ChainLink.")
    names = [link.name for link in links]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Link names must be unique (they name checkpoints); repeated: {repeated}.")
    for link in links:
        if link.checkpoint is not None and link.epochs:
            raise ValueError(
                f"Link {link.name!r} has both a checkpoint and epochs={link.epochs}: set epochs to 0 to use "
                "the checkpoint as it is, or drop the checkpoint to train the link."
            )
        if link.checkpoint is None and link.epochs < 1 and "max_epochs" not in trainer:
            raise ValueError(
                f"Link {link.name!r} has neither epochs nor a checkpoint: set epochs >= 1 to train it, "
                "or checkpoint to a file with its trained weights."
            )
    reserved = sorted(set(trainer) & set(RESERVED_TRAINER_KEYS))
    if reserved:
        raise ValueError(
            f"Trainer settings {reserved} are set per link by the chain: give callbacks in "
            "ChainLink.callbacks, and the output folder as out_dir."
        )


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    """Write atomically, so a results file is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)


def _make_trainer(
    link: ChainLink,
    out_dir: Path,
    settings: Mapping[str, Any],
    progress: bool,
    epochs: int | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """A Trainer for one link: fitting for ``epochs`` with a checkpoint after every epoch, or testing only."""
    options: dict[str, Any] = {
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "logger": CSVLogger(out_dir, name=link.name) if epochs else False,
    }
    options.update(settings)
    if not epochs:
        options.update(max_epochs=None, enable_checkpointing=False)
        return pl.Trainer(**options)
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / link.name, filename=CHECKPOINT_NAME, enable_version_counter=False
    )
    options.update(max_epochs=epochs, callbacks=[checkpoint, *callbacks, *link.callbacks])
    return pl.Trainer(**options)


def _module(
    link: ChainLink,
    teacher: ChainLink | None,
    teacher_checkpoint: str | None,
    losses: Sequence[LossTerm] | None,
    optimizer: OptimizerCallable | None,
) -> DistillationModule:
    if teacher is None:
        return DistillationModule(
            link.model,
            losses=link.losses,
            optimizer=link.optimizer or optimizer,
            lr_scheduler=link.lr_scheduler,
        )
    terms = link.losses if link.losses is not None else (copy.deepcopy(list(losses)) if losses else None)
    return DistillationModule(
        link.model,
        teacher=copy.deepcopy(teacher.model),
        teacher_checkpoint=teacher_checkpoint,
        losses=terms,
        optimizer=link.optimizer or optimizer,
        lr_scheduler=link.lr_scheduler,
    )


def run_chain(
    links: Sequence[ChainLink],
    datamodule: pl.LightningDataModule,
    out_dir: str | Path,
    losses: Sequence[LossTerm] | None = None,
    optimizer: OptimizerCallable | None = None,
    trainer: Mapping[str, Any] | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> list[LinkResult]:
    """Train a chain of models, each distilled from the previous one; test each; return their results.

    Born-again networks (Furlanello et al., ICML 2018) are a chain of one architecture; teacher
    assistant KD (Mirzadeh et al., AAAI 2020) a chain teacher -> assistant -> student. Link
    ``k > 0`` trains ``DistillationModule(link.model, teacher=<copy of link k-1's model>,
    teacher_checkpoint=<link k-1's checkpoint>)``: the teacher is frozen and holds exactly the
    weights link ``k - 1`` ended with. With the default losses that is Hinton KD,
    ``0.1 CE + 0.9 T^2 KL(p_t^T || p_s^T)`` at ``T = 4``. The first link has no teacher.

    Resuming: a link whose results file ``<out_dir>/<name>/result.json`` exists is finished
    and reused (its weights are loaded into ``link.model``); the file records the link's
    teacher, model class, parameter count and epochs, and a mismatch with the chain given is an
    error. A link without a results file resumes from ``<out_dir>/<name>/checkpoint.ckpt`` if
    that exists. Links after a (re)trained link are trained from scratch.

    Args:
        links: the chain, first link first.
        datamodule: train, validation and test data of every link.
        out_dir: checkpoints, results files and CSV logs.
        losses: default loss terms of every link with a teacher (copied per link); default:
            ``DistillationModule``'s (0.1 CE + 0.9 KD at T = 4).
        optimizer: default optimizer of every link.
        trainer: ``pl.Trainer`` keyword arguments for every link (``accelerator``, ``precision``,
            ``limit_train_batches``, ``logger=False``, ...); ``max_epochs`` here overrides
            every link's ``epochs``.
        seed: ``pl.seed_everything(seed)`` before each link's fit, so a link's batch order does
            not depend on the links before it; ``None`` leaves the random state alone.
        progress: show Lightning's progress bars.

    Returns:
        One :class:`LinkResult` per link, in chain order.
    """
    settings = dict(trainer or {})
    _validate(links, settings)
    out_dir = Path(out_dir)
    epochs_override = settings.pop("max_epochs", None)
    results: list[LinkResult] = []
    upstream_reused = True  # a link is reused only if every link before it was
    for index, link in enumerate(links):
        teacher = links[index - 1] if index else None
        expected = {
            "name": link.name,
            "teacher": teacher.name if teacher else None,
            "model": type(link.model).__qualname__,
            "parameters": sum(p.numel() for p in link.model.parameters()),
            "epochs": 0 if link.checkpoint is not None else (epochs_override or link.epochs),
        }
        results_file = out_dir / link.name / "result.json"
        if upstream_reused and (reused := _reuse(results_file, expected, link)) is not None:
            results.append(reused)
            continue
        results_file.unlink(missing_ok=True)  # stale if present: never reuse it after a crash
        if link.checkpoint is not None:
            result, runner = _test_given(link, expected, datamodule, out_dir, settings, progress, optimizer)
        else:
            if seed is not None:
                pl.seed_everything(seed, verbose=False)
            module = _module(link, teacher, results[-1].checkpoint if results else None, losses, optimizer)
            result, runner = _fit_and_test(
                link, module, expected, datamodule, out_dir, settings, progress, resume=upstream_reused
            )
        if runner.is_global_zero:
            _write_json(results_file, asdict(result))
        results.append(result)
        upstream_reused = False
    return results


def _test_given(
    link: ChainLink,
    expected: Mapping[str, Any],
    datamodule: pl.LightningDataModule,
    out_dir: Path,
    settings: Mapping[str, Any],
    progress: bool,
    optimizer: OptimizerCallable | None,
) -> tuple[LinkResult, pl.Trainer]:
    """Load a link's given checkpoint into its model and test it."""
    assert link.checkpoint is not None
    load_weights(link.model, link.checkpoint)
    tester = _make_trainer(link, out_dir, settings, progress)
    (metrics,) = tester.test(_module(link, None, None, None, optimizer), datamodule=datamodule, verbose=False)
    result = LinkResult(
        **expected,
        accuracy=metrics["test/acc"],
        checkpoint=link.checkpoint,
        seconds_per_epoch=0.0,
        status="given",
    )
    return result, tester


def _fit_and_test(
    link: ChainLink,
    module: DistillationModule,
    expected: Mapping[str, Any],
    datamodule: pl.LightningDataModule,
    out_dir: Path,
    settings: Mapping[str, Any],
    progress: bool,
    resume: bool,
) -> tuple[LinkResult, pl.Trainer]:
    """Fit a link (from its last checkpoint if ``resume`` and one exists), then test it."""
    timer = _EpochTimer()
    fitter = _make_trainer(link, out_dir, settings, progress, expected["epochs"], [timer])
    last = out_dir / link.name / f"{CHECKPOINT_NAME}.ckpt"
    resume_from = last if resume and last.is_file() else None
    try:
        fitter.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except RunTooShortError as error:
        raise ValueError(
            f"Link {link.name!r} cannot be resumed with epochs={expected['epochs']}: {error} For this chain: "
            f"give the link at least the epochs it has done, or delete {str(last.parent)!r} to train it "
            "from scratch."
        ) from error
    run_length = next(c for c in fitter.callbacks if isinstance(c, RunLength))
    planned = (run_length.resumed or {}).get("max_epochs")
    (metrics,) = fitter.test(module, datamodule=datamodule, verbose=False)
    if not last.is_file():
        raise RuntimeError(
            f"Link {link.name!r} wrote no checkpoint {str(last)!r}: keep checkpointing enabled "
            "(enable_checkpointing=True) and at least one training batch per epoch."
        )
    result = LinkResult(
        **expected,
        accuracy=metrics["test/acc"],
        checkpoint=str(last),
        seconds_per_epoch=timer.seconds_per_epoch,
        status="replanned" if run_length.replanned_from else "resumed" if resume_from else "trained",
        planned_epochs=planned if resume_from and planned != expected["epochs"] else None,
    )
    return result, fitter


def _reuse(results_file: Path, expected: Mapping[str, Any], link: ChainLink) -> LinkResult | None:
    """The finished link's result with its weights loaded into ``link.model``, or ``None`` if unfinished."""
    if not results_file.is_file():
        return None
    stored = json.loads(results_file.read_text())
    recorded = dict(expected)
    if link.checkpoint is not None:
        recorded["checkpoint"] = link.checkpoint
    differences = {k: (stored.get(k), v) for k, v in recorded.items() if stored.get(k) != v}
    if differences:
        raise ValueError(
            f"{results_file} records link {link.name!r} of another chain (recorded vs now: {differences}). "
            "Use another out_dir, or delete that results file and the link's checkpoint to train it again."
        )
    if not Path(stored["checkpoint"]).is_file():
        raise FileNotFoundError(
            f"{results_file} marks link {link.name!r} as finished but its checkpoint "
            f"{stored['checkpoint']!r} is gone: delete the results file to train the link again."
        )
    load_weights(link.model, stored["checkpoint"])
    stored["status"] = "reused"
    return LinkResult(**stored)


def ensemble_accuracy(
    models: Sequence[nn.Module], datamodule: pl.LightningDataModule, trainer: Mapping[str, Any] | None = None
) -> float:
    """Test accuracy of the mean class probabilities of ``models`` (the born-again ensemble).

    The ensemble is a :class:`~lightning_kd.TeacherEnsemble` with equal weights, tested as the
    module's network.
    """
    settings = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    settings.update(trainer or {}, max_epochs=None, enable_checkpointing=False)
    tester = pl.Trainer(**settings)
    module = DistillationModule(TeacherEnsemble(models))
    (metrics,) = tester.test(module, datamodule=datamodule, verbose=False)
    return metrics["test/acc"]


def chain_table(results: Sequence[LinkResult], ensemble: float | None = None) -> str:
    """A plain-text table: one row per link (teacher, model, parameters, epochs, test accuracy, status)."""
    header = ("link", "teacher", "model", "params", "epochs", "test acc (%)", "s/epoch", "status")
    rows = [
        (
            r.name,
            r.teacher or "(labels)",
            r.model,
            f"{r.parameters:,}",
            str(r.epochs),
            f"{100 * r.accuracy:.2f}",
            f"{r.seconds_per_epoch:.2f}",
            r.status if r.planned_epochs is None else f"{r.status} (planned {r.planned_epochs} epochs)",
        )
        for r in results
    ]
    if ensemble is not None:
        rows.append((f"ensemble of {len(results)}", "", "", "", "", f"{100 * ensemble:.2f}", "", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
