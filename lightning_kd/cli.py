"""The commands: ``lightning-kd`` (LightningCLI over any module and datamodule) and ``lightning-kd-chain``."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only

from lightning_kd.losses import LossTerm
from lightning_kd.paradigms.chain import ChainLink, LinkResult, chain_table, ensemble_accuracy, run_chain

__all__ = [
    "DistillationCLI",
    "build_chain_parser",
    "chain_main",
    "check_checkpoint_file",
    "fit_summary",
    "main",
]


def fit_summary(trainer: Trainer, seconds: float, baseline_accuracy: float | None = None) -> str:
    """A few lines on a finished fit: teacher, baseline, student accuracy (or cosine), gain, time."""
    metrics = trainer.callback_metrics

    def percent(key: str) -> float | None:
        return 100 * float(metrics[key]) if key in metrics else None

    student, teacher = percent("val/acc"), percent("val/teacher_acc")
    rows = [("teacher (val/teacher_acc)", teacher), ("student (val/acc)", student)]
    if baseline_accuracy is not None:
        baseline = 100 * baseline_accuracy
        rows.insert(1, ("baseline (given)", baseline))
        rows.append(("gain over the baseline", None if student is None else student - baseline))
    lines = ["Fit finished:"]
    for name, value in rows:
        if value is not None:
            sign = "+" if name.startswith("gain") else ""
            lines.append(f"  {name:<26} {value:{sign}.2f}")
    if "val/cosine" in metrics:
        lines.append(f"  {'cosine to teacher (val)':<26} {float(metrics['val/cosine']):.4f}")
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint is not None else ""
    lines.append(f"  {'time':<26} {seconds:.0f} s ({trainer.current_epoch} epochs)")
    lines.append(f"  {'checkpoint':<26} {path or 'none written'}")
    return "\n".join(lines)


def check_checkpoint_file(ckpt_path: str | Path | None) -> None:
    """Reject a truncated or foreign ``--ckpt_path`` file before Lightning loads it.

    ``torch.save`` writes a zip archive (since PyTorch 1.6) whose directory sits at the end of
    the file, so reading that directory catches truncated and non-checkpoint files without
    unpickling anything. Lightning's special values (``"last"``, ``"best"``, ...) and paths that
    are not local files are left to Lightning.

    Raises:
        ValueError: the file is not a complete ``torch.save`` archive.
    """
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return
    try:
        with zipfile.ZipFile(ckpt_path) as archive:
            complete = any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        complete, reason = False, str(error)
    else:
        reason = "it holds no data.pkl"
    if not complete:
        raise ValueError(
            f"Cannot load --ckpt_path {str(ckpt_path)!r}: it is truncated or not a checkpoint "
            f"({reason}). "
            "Pass a complete .ckpt written by Lightning (e.g. runs/.../checkpoints/last.ckpt), or drop "
            "--ckpt_path to start afresh."
        )


class DistillationCLI(LightningCLI):
    """LightningCLI over any LightningModule and any datamodule.

    The model is :class:`~lightning_kd.DistillationModule` (or a subclass),
    :class:`~lightning_kd.MutualLearningModule`, or any other LightningModule; model and data
    are chosen with ``class_path`` / ``init_args``; the optimizer and scheduler are the
    model's ``optimizer`` / ``lr_scheduler`` arguments. After ``fit`` it prints
    :func:`fit_summary`; ``--baseline_accuracy 0.69`` (the student trained alone, a fraction)
    adds the gain. Other ``LightningCLI`` arguments (``args``, ``run``, ...) pass through.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--baseline_accuracy``: the student's accuracy without distillation, for the summary."""
        parser.add_argument(
            "--baseline_accuracy",
            type=float | None,
            default=None,
            help="validation accuracy (a fraction) of the student trained alone; the summary shows the gain",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check ``--ckpt_path`` (LightningCLI reads its hyperparameters right after)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))

    def before_fit(self) -> None:
        """Start the clock for the summary."""
        self._fit_started = time.perf_counter()

    @rank_zero_only
    def after_fit(self) -> None:
        """Print the end-of-fit summary."""
        baseline = self.config[self.subcommand].get("baseline_accuracy")
        print(fit_summary(self.trainer, time.perf_counter() - self._fit_started, baseline))


def build_chain_parser() -> ArgumentParser:
    """The ``lightning-kd-chain`` argument parser: one YAML (``--config``) describes the whole chain."""
    parser = ArgumentParser(
        prog="lightning-kd-chain",
        description="Train a chain of models, each distilled from the previous one "
        "(born-again networks, teacher assistants).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with the options below")
    parser.add_argument("--links", type=list[ChainLink], required=True, help="the chain, first link first")
    parser.add_argument("--data", type=pl.LightningDataModule, required=True, help="the datamodule")
    parser.add_argument("--out_dir", type=str, default="runs/chain", help="checkpoints, results files, logs")
    parser.add_argument(
        "--losses",
        type=list[LossTerm] | None,
        default=None,
        help="default losses of links with a teacher",
    )
    parser.add_argument("--optimizer", type=OptimizerCallable | None, default=None, help="default optimizer")
    parser.add_argument(
        "--trainer",
        type=dict[str, Any],
        default={},
        help="pl.Trainer settings for every link; max_epochs overrides every link's epochs",
    )
    parser.add_argument("--seed", type=int | None, default=0, help="seeds model creation and each link's fit")
    parser.add_argument("--ensemble", type=bool, default=False, help="also test the average of all links")
    parser.add_argument("--progress", type=bool, default=True, help="show Lightning's progress bars")
    return parser


def chain_main(args: Sequence[str] | None = None) -> list[LinkResult]:
    """Run ``lightning-kd-chain --config chain.yaml``: train the chain, print each link's accuracy."""
    parser = build_chain_parser()
    config = parser.parse_args(args)
    if config.seed is not None:
        pl.seed_everything(config.seed, verbose=False)
    # jsonargparse >= 4.49 names it `instantiate`, older versions `instantiate_classes`
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    chain = instantiate(config)
    results = run_chain(
        chain.links,
        chain.data,
        chain.out_dir,
        losses=chain.losses,
        optimizer=chain.optimizer,
        trainer=chain.trainer,
        seed=chain.seed,
        progress=chain.progress,
    )
    ensemble = None
    if chain.ensemble:
        ensemble = ensemble_accuracy([link.model for link in chain.links], chain.data, chain.trainer)
    print("\n" + chain_table(results, ensemble))
    return results


def main(args: ArgsType = None) -> None:
    """Run ``lightning-kd {fit,validate,test,predict} --config recipe.yaml``."""
    DistillationCLI(args=args)


if __name__ == "__main__":
    main()
