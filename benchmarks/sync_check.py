"""Host-device synchronisations in lightning_kd's training steps, found with CUDA's sync debug mode.

    python benchmarks/sync_check.py --device cuda --out OUT/sync_check.md
    python benchmarks/sync_check.py --quick          # CPU: runs the fits; nothing can be detected

For each library variant of ``benchmarks/step_overhead.py`` (``ours``, ``ours@log10``,
``ours+fitnet``, ``ours+cache`` with its filling epoch, ``mutual``) and workload, one
``Trainer.fit`` of ``--steps`` steps runs with ``torch.cuda.set_sync_debug_mode("warn")``. Each
synchronising call (``.item()``, ``bool()`` of a device tensor, a blocking device-to-host copy,
``nonzero``, ...) warns; every warning is recorded with its Python stack and the phase it came in:

- ``step``: from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, loss, backward,
  optimizer step, the module's hooks) of a step that is neither a logging step (Lightning's
  ``log_every_n_steps``) nor the first of an epoch. There must be none.
- ``log or first step``: the same window at a logging step or the first step of an epoch, where
  checks and logging may read values.
- ``between steps``: Lightning's own loop around the steps (batch transfer, logger connector,
  progress bar).

Writes a markdown report (``--out``): counts per phase, then every distinct stack of the ``step``
phase. Exits with status 1 when a step synchronised. The debug mode is "warn" rather than
"error", so that one run lists every synchronisation instead of stopping at the first.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from step_loops import WORKLOADS, LightningFit, Setting
from step_overhead import build, quiet

LIBRARY_VARIANTS = ("ours", "ours@log10", "ours+fitnet", "ours+cache", "mutual")
SYNC_MESSAGE = "synchroniz"  # torch: "called a synchronizing CUDA operation"


class SyncRecorder(pl.Callback):
    """Records every synchronising CUDA call of a fit with its stack and phase (see the module docstring)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.phase = "between steps"
        self.steps_checked = 0
        self.stacks: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._catcher: Any = None
        self._show = warnings.showwarning

    def record(self, message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if SYNC_MESSAGE in str(message):
            frames = traceback.format_stack()[:-2]  # without this method and warnings' own frame
            self.stacks[self.phase]["".join(frames[-14:])] += 1
        else:
            self._show(message, category, *args, **kwargs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        self._show = warnings.showwarning
        warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}.*")
        warnings.showwarning = self.record
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 or trainer._logger_connector.should_update_logs:
            self.phase = "log or first step"
        else:
            self.phase = "step"
            self.steps_checked += 1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.phase = "between steps"


def check(setting: Setting, name: str, enabled: bool) -> SyncRecorder:
    """One fit of the variant ``name`` (its cache-filling epoch too) under a :class:`SyncRecorder`."""
    variant = build(name, setting)
    assert isinstance(variant, LightningFit)
    recorder = SyncRecorder(enabled)
    variant.callbacks.append(recorder)
    variant.prepare()
    variant.fit(setting.warmup + setting.steps, [])
    return recorder


def report(results: list[tuple[str, str, SyncRecorder]], device: str, steps: int) -> str:
    """Markdown: one row per workload and variant, then every stack found inside a step."""
    phases = ("step", "log or first step", "between steps")
    lines = [
        f"Synchronising CUDA calls per phase of a fit of {steps} steps (`benchmarks/sync_check.py`, "
        f"`torch.cuda.set_sync_debug_mode('warn')`); device {device}, torch {torch.__version__}, "
        f"lightning {pl.__version__}.",
        "",
        "| workload | variant | steps checked | in a step | at a log or first step | between steps |",
        "|---|---|---|---|---|---|",
    ]
    details = []
    for workload, name, recorder in results:
        counts = [sum(recorder.stacks[phase].values()) for phase in phases]
        cells = " | ".join(map(str, counts)) if recorder.enabled else "not checked (no CUDA) | - | -"
        lines.append(f"| {workload} | {name} | {recorder.steps_checked} | {cells} |")
        for stack, count in recorder.stacks["step"].most_common():
            details += ["", f"{workload} / {name}: {count} synchronising calls at", "", "```", stack.rstrip()]
            details.append("```")
    if details:
        lines += ["", "Stacks of the synchronisations inside steps:", *details]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every check; write the report; 1 if any step synchronised, else 0."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="bf16-mixed")
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["small", "mid"])
    parser.add_argument("--variants", default=",".join(LIBRARY_VARIANTS))
    parser.add_argument("--steps", type=int, default=120, help="steps per fit (2 logging steps at 50)")
    parser.add_argument("--quick", action="store_true", help="4 steps, batch 2, 32-bit; prints only")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: print only)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch.")
    if args.device == "cpu":
        args.precision = "32-true"
    steps = 4 if args.quick else args.steps
    results = []
    with tempfile.TemporaryDirectory(prefix="sync_check_") as log_dir, quiet():
        for workload in args.workload:
            setting = Setting(
                WORKLOADS[workload],
                torch.device(args.device),
                args.precision,
                args.device == "cuda" and workload != "small",  # channels-last for the CNN pair
                2 if args.quick else WORKLOADS[workload].batch_size * (8 if args.device == "cuda" else 1),
                1,
                steps - 1,
                "csv",
                "eager",
                log_dir,
            )
            for name in args.variants.split(","):
                recorder = check(setting, name, enabled=args.device == "cuda")
                results.append((workload, name, recorder))
                print(f"{workload} {name}: {dict((k, sum(v.values())) for k, v in recorder.stacks.items())}")
    text = report(results, torch.cuda.get_device_name() if args.device == "cuda" else "cpu", steps)
    print(text)
    if args.out is not None and not args.quick:
        args.out.write_text(text)
    return int(any(recorder.stacks["step"] for _, _, recorder in results))


if __name__ == "__main__":
    sys.exit(main())
