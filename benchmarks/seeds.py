"""What the seed benchmarks share: the per-run line they print, reading it back, mean ± std.

Each benchmark prints one line per run (``seed 0 kd  72.10  0.139 s/epoch``) so that seeds
can run as separate processes and be tabulated later with ``--collect``.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

Runs = dict[str, dict[int, tuple[float, float]]]  # row -> seed -> (accuracy, seconds)
RUN_LINE = re.compile(r"^seed (\d+) (\S+)\s+([\d.]+)\s+([\d.]+) s/epoch$")


def collect(logs: list[Path], pattern: re.Pattern[str] = RUN_LINE) -> Runs:
    """The runs printed in the logs of earlier invocations (e.g. one seed per process)."""
    runs: Runs = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if match := pattern.match(line.strip()):
                seed, name, accuracy, seconds = match.groups()
                runs.setdefault(name, {})[int(seed)] = (float(accuracy) / 100, float(seconds))
    return runs


def mean_std(values: list[float], sign: str = "") -> str:
    """``mean ± std`` of accuracies (fractions) in points; ``sign="+"`` shows the sign of gains."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):{sign}.2f} ± {100 * spread:.2f}"


def write_table(lines: list[str], path: Path) -> None:
    """Write a Markdown table to ``path`` (creating its folder) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def quiet_trainer(epochs: int, **overrides: Any) -> pl.Trainer:
    """A CPU Trainer for ``epochs`` with no validation loop, logger, checkpoint or progress bar."""
    settings: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**settings, **overrides})
