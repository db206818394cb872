"""The commands: ``lightning-kd`` (LightningCLI over any module and datamodule) and ``lightning-kd-chain``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from argparse import Action
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonargparse
import lightning.pytorch as pl
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only

import lightning_kd.models  # noqa: F401 - its networks are the known subclasses that --help lists
from lightning_kd.checkpoint_io import checkpoint_problem, earlier_checkpoints_hint, use_atomic_checkpoint_io
from lightning_kd.losses import LossTerm
from lightning_kd.paradigms.chain import ChainLink, LinkResult, chain_table, ensemble_accuracy, run_chain
from lightning_kd.recipes import RECIPES_DIR, copy_recipe, recipe_names, resolve_config

__all__ = [
    "DistillationArgumentParser",
    "DistillationCLI",
    "DistillationHelpFormatter",
    "build_chain_parser",
    "cache_tokens_command",
    "chain_main",
    "run_chain_command",
    "check_checkpoint_file",
    "construction_error",
    "link_latest",
    "fit_summary",
    "main",
    "recipes_command",
    "silence_unactionable_warnings",
    "with_recipe_paths",
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
    """Reject an unloadable ``--ckpt_path`` file before anything is built.

    The file is read record by record against the CRC-32s that ``torch.save`` stores
    (:func:`~lightning_kd.checkpoint_io.checkpoint_problem`): empty, truncated, foreign and
    damaged files are caught without unpickling anything. A directory is refused unless it holds
    a distributed checkpoint (``.metadata`` of ``torch.distributed.checkpoint``, as FSDP's
    sharded checkpoints, or DeepSpeed's ``latest``). Lightning's special values (``"last"``,
    ``"best"``, ...) are left to Lightning, whose loading the training modules check alike.

    Raises:
        ValueError: the path is a plain directory or an unloadable file.
    """
    if ckpt_path is None:
        return
    path = Path(ckpt_path)
    if path.is_dir():
        if (path / ".metadata").is_file() or (path / "latest").is_file():
            return
        raise ValueError(
            f"Cannot load --ckpt_path {str(ckpt_path)!r}: it is a directory, not a checkpoint file. Pass a "
            f"checkpoint file in it{earlier_checkpoints_hint(path) or ' (it holds no .ckpt file)'}."
        )
    if not path.is_file():
        return
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"Cannot load --ckpt_path {str(ckpt_path)!r}: {problem}. Pass an earlier checkpoint"
            f"{earlier_checkpoints_hint(path) or ' (e.g. runs/.../checkpoints/last.ckpt)'}, or drop "
            "--ckpt_path to start afresh."
        )


def construction_error(error: BaseException) -> BaseException | None:
    """The error a class raised while LightningCLI built it, dug out of jsonargparse's wrappers.

    jsonargparse reports a failing ``class_path`` constructor inside "Does not validate against
    any of the Union subtypes" (the error then sits on line 25 of 73); it chains the original as
    ``__cause__``. The first error of that chain raised outside jsonargparse is the
    constructor's own (e.g. a missing ``teacher_checkpoint``); ``None`` if there is none.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback = current.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        if traceback is not None and not Path(traceback.tb_frame.f_code.co_filename).is_relative_to(
            _JSONARGPARSE_DIR
        ):
            return current if current is not error else None
        current = current.__cause__
    return None


_JSONARGPARSE_DIR = Path(jsonargparse.__file__).resolve().parent


DESCRIPTION = (
    "Knowledge distillation with PyTorch Lightning (LightningCLI). Run a recipe that ships with "
    "lightning_kd by name, e.g. `lightning-kd fit --config mnist1d/teacher` then `lightning-kd fit "
    "--config mnist1d/kd`; `lightning-kd recipes` lists them and copies one out to edit. Each run "
    "writes runs/<recipe>/version_<n>/ and points runs/<recipe>/latest.ckpt at its checkpoint."
)


#: warnings a user of the commands can do nothing about (they come from the pinned libraries or
#: from data that ships with the package), silenced by the commands only, never by the library
UNACTIONABLE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 with torch >= 2.10
    r".*does not have many workers.*",  # the in-memory offline datasets need no worker processes
)


def silence_unactionable_warnings() -> None:
    """Hide :data:`UNACTIONABLE_WARNINGS` for this process (the commands call it; importing does not)."""
    for message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class DistillationHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with each "known subclasses" list cut to this package's classes.

    A ``torch.nn.Module`` argument otherwise lists every subclass that torch, timm and the other
    imported libraries define (about 2,700 lines for ``--model.help``); any of them still works
    as a ``class_path``.
    """

    def _get_help_string(self, action: Action) -> str:
        help_string = super()._get_help_string(action)
        head, marker, tail = help_string.partition(", known subclasses: ")
        if not marker:
            return help_string
        paths, closing = (tail[:-1], ")") if tail.endswith(")") else (tail, "")
        names = paths.split(", ")
        ours = [name for name in names if name.startswith("lightning_kd.")]
        networks = [name for name in ours if name.startswith("lightning_kd.models.")]
        ours = networks or ours  # a network argument: the package's models, not its modules or terms
        if len(names) - len(ours) <= 10:
            return help_string
        shown = ", ".join(ours) if ours else "none of lightning_kd's"
        return f"{head}{marker}{shown}, and {len(names) - len(ours)} more: any class_path works{closing}"


class DistillationArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with :class:`DistillationHelpFormatter` (also for ``--model.help`` pages)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DistillationHelpFormatter)
        super().__init__(*args, **kwargs)


def link_latest(trainer: Trainer) -> Path | None:
    """Point ``latest.ckpt`` beside this run's folder at the checkpoint it wrote (best, else last).

    Runs of a recipe write their own folders (``runs/mnist1d/kd/version_3/checkpoints/kd.ckpt``),
    so no run overwrites another; ``runs/mnist1d/kd/latest.ckpt`` is the stable name later recipes
    read (a relative symbolic link, replaced atomically). Nothing is linked when the checkpoint
    is not in a ``checkpoints`` folder of a run, or none was written.
    """
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint is not None else ""
    if not path or Path(path).parent.name != "checkpoints":
        return None
    link = Path(path).parent.parent.parent / "latest.ckpt"
    temporary = link.with_name(f".latest-{os.getpid()}.ckpt")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(os.path.relpath(Path(path).resolve(), link.parent.resolve()))
    os.replace(temporary, link)
    return link


def earlier_run_checkpoint(trainer: Trainer) -> Path | None:
    """The newest checkpoint an earlier run of this recipe wrote, for ``--ckpt_path last``.

    Each run of a recipe writes its own ``version_<n>`` folder, so Lightning's ``"last"``, which
    looks only in this run's (new, empty) checkpoint folder, would find nothing and start afresh.
    When every checkpoint callback writes inside the run's folder (no ``dirpath`` of its own),
    the newest ``*.ckpt`` in ``<save_dir>/<name>/version_*/checkpoints/`` is the one to resume;
    ``None`` when there is none (a first run: Lightning starts afresh) or the folders are the user's.
    """
    logger = trainer.logger
    root = getattr(logger, "root_dir", None)
    callbacks = trainer.checkpoint_callbacks
    if root is None or not callbacks or any(getattr(c, "dirpath", None) is not None for c in callbacks):
        return None
    found = [
        path
        for path in Path(root).glob("version_*/checkpoints/*.ckpt")
        if not path.name.startswith(".") and path.is_file()
    ]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


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
        kwargs.setdefault("parser_class", DistillationArgumentParser)
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parser, introduced as this command rather than as "Lightning Trainer command line tool"."""
        kwargs.setdefault("description", DESCRIPTION)
        parser = super().init_parser(**kwargs)
        for action in parser._actions:
            if "--config" in action.option_strings:
                action.help = (
                    "a recipe's name (e.g. mnist1d/kd; `lightning-kd recipes` lists them) or a YAML file"
                )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--baseline_accuracy``: the student's accuracy without distillation, for the summary."""
        parser.add_argument(
            "--baseline_accuracy",
            type=float | None,
            default=None,
            help="validation accuracy (a fraction) of the student trained alone; the summary shows the gain",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse with shipped recipe names resolved in ``--config``, then check ``--ckpt_path``.

        LightningCLI reads the checkpoint's hyperparameters right after this.
        """
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
        else:  # the command line (or a list like it): parsed here, which LightningCLI would do alike
            self.config = parser.parse_args(with_recipe_paths(args))
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a constructor's own error is raised as itself.

        jsonargparse would report it inside its Union error (see :func:`construction_error`).
        """
        try:
            super().instantiate_classes()
        except ValueError as error:
            original = construction_error(error)
            if original is None:
                raise
            raise original from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """LightningCLI's trainer; any model gets :class:`~lightning_kd.checkpoint_io.AtomicCheckpointIO`."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to an earlier run's checkpoint; start the clock for the summary.

        See :func:`earlier_run_checkpoint`: a resumed recipe loads the newest checkpoint of its
        earlier runs and writes a new ``version_<n>`` folder (the earlier one keeps its files).
        """
        arguments = self.config_init[self.subcommand]
        if arguments.get("ckpt_path") == "last":
            earlier = earlier_run_checkpoint(self.trainer)
            if earlier is not None:
                arguments["ckpt_path"] = str(earlier)
                if self.trainer.is_global_zero:
                    print(f"--ckpt_path last: resuming from {earlier}, the newest checkpoint of this recipe.")
        self._fit_started = time.perf_counter()

    @rank_zero_only
    def after_fit(self) -> None:
        """Point the run's ``latest.ckpt`` at its checkpoint and print the end-of-fit summary."""
        latest = link_latest(self.trainer)
        baseline = self.config[self.subcommand].get("baseline_accuracy")
        print(fit_summary(self.trainer, time.perf_counter() - self._fit_started, baseline))
        if latest is not None:
            print(f"  {'latest of this recipe':<26} {latest}")


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


def chain_main(args: Sequence[str] | None = None) -> None:
    """The ``lightning-kd-chain`` command: :func:`run_chain_command`, exiting with status 0 on success.

    The console script exits with what this returns (``sys.exit(chain_main())``): ``None`` is
    status 0, while any other object (the results list) would be printed and exit with status 1.
    A failure raises, and so exits with status 1 and its error message.
    """
    run_chain_command(args)


def run_chain_command(args: Sequence[str] | None = None) -> list[LinkResult]:
    """Run ``lightning-kd-chain --config CHAIN``: a file or a recipe name (``mnist1d/paradigms/takd``).

    Trains the chain, prints each link's accuracy and returns the links' results.
    """
    silence_unactionable_warnings()
    parser = build_chain_parser()
    config = parser.parse_args(with_recipe_paths(args))
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


def with_recipe_paths(args: Sequence[str] | None) -> list[str]:
    """``args`` (default: the command line) with every ``--config`` recipe name replaced by its path."""
    args = sys.argv[1:] if args is None else list(args)
    resolved: list[str] = []
    for index, arg in enumerate(args):
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.removeprefix("--config="))
        elif index > 0 and args[index - 1] == "--config":
            arg = resolve_config(arg)
        resolved.append(arg)
    return resolved


def recipes_command(args: Sequence[str]) -> None:
    """``lightning-kd recipes``: list the shipped recipes, or copy one out to edit."""
    parser = argparse.ArgumentParser(
        prog="lightning-kd recipes",
        description="The YAML recipes that ship with lightning_kd. Run one by name: "
        "`lightning-kd fit --config mnist1d/kd` (a file path works too).",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", help="list the recipes (the default)")
    copy = commands.add_parser("copy", help="copy a recipe out to edit it, then run it with --config FILE")
    copy.add_argument("name", help="a recipe name, e.g. mnist1d/kd")
    copy.add_argument("destination", nargs="?", help="a file or folder (default: NAME's file name, here)")
    options = parser.parse_args(list(args))
    if options.command == "copy":
        try:
            target = copy_recipe(options.name, options.destination)
        except (FileNotFoundError, FileExistsError) as error:
            parser.exit(2, f"lightning-kd recipes copy: {error}\n")
        print(f"Copied {options.name} to {target}; run it with: lightning-kd fit --config {target}")
        return
    print(f"Recipes shipped in {RECIPES_DIR} (run one with `lightning-kd fit --config NAME`):")
    for name in recipe_names():
        print(f"  {name}")


def cache_tokens_command(args: Sequence[str]) -> None:
    """``lightning-kd cache-tokens``: fill a top-k token store from a recipe's teacher and training data.

    The recipe (a name or a YAML file) gives ``model.init_args.teacher`` (and its
    ``teacher_checkpoint``) and ``data``; see :func:`~lightning_kd.language.fill_token_store`.
    """
    import yaml
    from torch import nn

    from lightning_kd.language.token_codec import DEFAULT_RESIDUAL_BITS
    from lightning_kd.language.token_store import fill_token_store
    from lightning_kd.teachers.loading import load_weights

    parser = argparse.ArgumentParser(
        prog="lightning-kd cache-tokens",
        description="Run a causal-LM teacher once over the training data and store its top-k next-token "
        "log-probabilities (compressed, sharded, verified; resumable). Train from the store with "
        "lightning_kd.language.TokenStoreDistillationModule.",
    )
    parser.add_argument(
        "--config", required=True, help="a recipe with a teacher and data (e.g. python_docs/kd)"
    )
    parser.add_argument("--directory", required=True, help="the store's folder")
    parser.add_argument("--teacher-checkpoint", help="the teacher's weights (default: the recipe's)")
    parser.add_argument("--k", type=int, default=128, help="log-probabilities kept per token (default 128)")
    parser.add_argument(
        "--residual-bits",
        default=",".join(f"{bits}x{ranks}" for bits, ranks in DEFAULT_RESIDUAL_BITS),
        help="quantised residual groups BITSxRANKS, rank 1 first (default %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per teacher call")
    parser.add_argument("--blocks-per-shard", type=int, default=64, help="blocks per shard")
    parser.add_argument("--device", default=None, help="where the teacher runs (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a store of another teacher or data")
    options = parser.parse_args(list(args))
    try:
        groups = [
            tuple(int(x) for x in group.split("x")) for group in options.residual_bits.split(",") if group
        ]
    except ValueError:
        parser.exit(
            2, f"lightning-kd cache-tokens: --residual-bits {options.residual_bits!r} is not BITSxRANKS,...\n"
        )
    recipe = yaml.safe_load(Path(resolve_config(options.config)).read_text())
    model = (recipe.get("model") or {}).get("init_args") or {}
    if "teacher" not in model or "data" not in recipe:
        parser.exit(
            2, f"lightning-kd cache-tokens: {options.config} names no model.init_args.teacher or data.\n"
        )
    checkpoint = options.teacher_checkpoint or model.get("teacher_checkpoint")
    builder = ArgumentParser()
    builder.add_argument("--teacher", type=nn.Module)
    builder.add_argument("--data", type=LightningDataModule)
    instantiate = getattr(builder, "instantiate", None) or builder.instantiate_classes
    built = instantiate(builder.parse_object({"teacher": model["teacher"], "data": recipe["data"]}))
    if checkpoint is not None:
        load_weights(built.teacher, checkpoint)
    data = built.data
    data.setup("fit")
    dataset = getattr(data, "datasets", {}).get("train") or data.train_dataloader().dataset
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    store = fill_token_store(
        built.teacher.to(device),
        dataset,
        options.directory,
        k=options.k,
        residual_bits=groups,
        tokenizer=getattr(data, "tokenizer", None),
        batch_size=options.batch_size,
        blocks_per_shard=options.blocks_per_shard,
        device=device,
        overwrite=options.overwrite,
        on_shard=lambda shard, total: print(f"shard {shard + 1}/{total} written", flush=True),
    )
    print(
        f"Stored {store.num_blocks} blocks x {store.block_size - 1} positions in {options.directory}: "
        f"{store.size_bytes:,} bytes, {store.bytes_per_token:.1f} bytes per token (k={options.k}, "
        f"V={store.codec.vocab_size}), {time.perf_counter() - started:.0f} s."
    )


def generate_command(args: Sequence[str]) -> None:
    """``lightning-kd generate --config RECIPE``: only the generation pass of a recipe's datamodule.

    For sequence-level KD (:class:`~lightning_kd.language.SequenceKDData`): the teacher's completions
    are written (or a killed pass resumed) without training; the same overrides as ``fit`` apply.
    """
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: lightning-kd generate --config RECIPE [overrides]\n\nRun the generation pass of RECIPE's "
            "datamodule (e.g. python_docs/seqkd: the teacher's completions) without training; a killed pass "
            "resumes. The device: CUDA if available, else the CPU."
        )
        return
    cli = DistillationCLI(args=list(args), run=False)
    generate = getattr(cli.datamodule, "generate", None)
    if not callable(generate):
        raise SystemExit(
            f"lightning-kd generate: the recipe's datamodule ({type(cli.datamodule).__name__}) has no "
            "generation pass; use a recipe whose data is lightning_kd.language.SequenceKDData "
            "(e.g. python_docs/seqkd)."
        )
    completions = generate("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{len(completions)} completions in {cli.datamodule.output_dir}")


def main(args: ArgsType = None) -> None:
    """Run ``lightning-kd fit|validate|test|predict --config RECIPE`` or another command.

    The others: ``recipes``, ``cache-tokens`` and ``generate`` (``lightning-kd NAME --help``).
    """
    silence_unactionable_warnings()
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list | tuple) and argv[:1] == ["recipes"]:
        recipes_command(argv[1:])
        return
    if isinstance(argv, list | tuple) and argv[:1] == ["cache-tokens"]:
        cache_tokens_command(argv[1:])
        return
    if isinstance(argv, list | tuple) and argv[:1] == ["generate"]:
        generate_command(argv[1:])
        return
    DistillationCLI(args=args)


if __name__ == "__main__":
    main()
