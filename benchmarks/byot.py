"""Be Your Own Teacher self-distillation on MNIST-1D: baseline student vs. BYOT student, several seeds.

    python benchmarks/byot.py --seeds 0 1 2                  # about 15 minutes on 2 CPU cores
    python benchmarks/byot.py --methods mlp_baseline mlp_byot --seeds 0
    python benchmarks/byot.py --collect seed0.log seed1.log  # tabulate runs made in parallel

The setting is the quickstart's (4,500 training / 500 validation / 10,000 test samples,
students 150 epochs, Adam 3e-3 with cosine decay, batch 128); no teacher network. Two
students: the quickstart's MLP (one head, on the first hidden layer ``features.2``; the
deepest feature is the second hidden layer ``features``) and the small 1-D CNN of
``benchmarks/methods.py`` (heads on ``conv1``, ``conv2``, ``conv3``; deepest feature
``embedding``). BYOT is ``CrossEntropyTerm`` (weight 1) + ``BYOTTerm`` (alpha 0.3, T 3,
feature weight 1e-4: the defaults); ``*_byot_hint`` raises the feature weight to 1e-2. For
each seed, ``pl.seed_everything(seed + 1)`` precedes building each student, and the heads
are built with the random state forked, so baseline and BYOT students start from the same
weights and see the same batches. Writes benchmarks/results/byot.md: test accuracy of the
student (its own classifier) mean ± std, the gain over the same student's baseline (paired
per seed), each head's accuracy and the mean of all classifiers' logits (the authors'
"ensemble"), and training time per epoch relative to the baseline.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import write_table
from torch import nn

from lightning_kd.data import MNIST1DDataModule
from lightning_kd.losses import BYOTTerm, CrossEntropyTerm, LossTerm
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.module import DistillationModule
from lightning_kd.quickstart import fit_and_test

RESULTS = Path(__file__).parent / "results" / "byot.md"
STUDENT_EPOCHS, STUDENT_LR = 150, 3e-3
LAYERS = {"mlp": (["features.2"], "features"), "cnn": (["conv1", "conv2", "conv3"], "embedding")}


@dataclass
class Method:
    """A row of the table: which student, and the BYOT settings (``None``: the plain baseline)."""

    student: str
    byot: dict[str, float] | None = field(default=None)


METHODS: dict[str, Method] = {
    "mlp_baseline": Method("mlp"),
    "mlp_byot": Method("mlp", {}),
    "mlp_byot_hint": Method("mlp", {"feature_weight": 1e-2}),
    "cnn_baseline": Method("cnn"),
    "cnn_byot": Method("cnn", {}),
    "cnn_byot_hint": Method("cnn", {"feature_weight": 1e-2}),
}


def make_student(kind: str, seed: int) -> nn.Module:
    """The seed's student, identical across the methods of one seed."""
    pl.seed_everything(seed + 1, verbose=False)
    if kind == "mlp":
        return MLP(in_features=40, num_classes=10, hidden=(256, 256))
    return ConvNet1d(num_classes=10, widths=(16, 32, 32), hidden=64)


def head_accuracies(
    module: DistillationModule, term: BYOTTerm, datamodule: MNIST1DDataModule
) -> dict[str, float]:
    """Test accuracy of every classifier (``BYOTTerm.head_logits``) and of the mean of their logits."""
    module.eval()
    correct: dict[str, int] = {}
    total = 0
    with torch.no_grad():
        for inputs, targets in datamodule.test_dataloader():
            inputs, targets = inputs.to(module.device), targets.to(module.device)
            logits = term.head_logits(module.student, inputs)
            logits["ensemble"] = torch.stack(list(logits.values())).mean(dim=0)
            for name, value in logits.items():
                correct[name] = correct.get(name, 0) + int((value.argmax(dim=-1) == targets).sum())
            total += len(targets)
    return {name: count / total for name, count in correct.items()}


# method -> seed -> (accuracy, seconds per epoch, {classifier: accuracy})
Runs = dict[str, dict[int, tuple[float, float, dict[str, float]]]]
RUN_LINE = re.compile(r"^seed (\d+) (\S+)\s+([\d.]+)\s+([\d.]+) s/epoch(.*)$")


def run_methods(seeds: list[int], names: list[str], out_dir: str, epochs: int = STUDENT_EPOCHS) -> Runs:
    """Train every method's student for every seed; print one line per run."""
    datamodule = MNIST1DDataModule()
    datamodule.prepare_data()
    datamodule.setup("fit")
    probe = next(iter(datamodule.train_dataloader()))
    optimizer = functools.partial(torch.optim.Adam, lr=STUDENT_LR)
    runs: Runs = {name: {} for name in names}
    for seed in seeds:
        out = Path(out_dir) / f"seed{seed}"
        for name in names:
            method = METHODS[name]
            losses: list[LossTerm] = [CrossEntropyTerm()]
            term = None
            if method.byot is not None:
                shallow, deep = LAYERS[method.student]
                term = BYOTTerm(shallow, deep, **method.byot)
                losses.append(term)
            module = DistillationModule(
                make_student(method.student, seed), losses=losses, optimizer=optimizer
            )
            with torch.random.fork_rng():  # the heads' initialisation leaves the batch order alone
                module.build_terms(probe)
            result = fit_and_test(name, module, datamodule, epochs, out, False)
            heads = head_accuracies(module, term, datamodule) if term is not None else {}
            runs[name][seed] = (result.accuracy, result.seconds_per_epoch, heads)
            extra = "".join(f" {key}={100 * value:.2f}" for key, value in heads.items())
            speed = f"{result.seconds_per_epoch:.3f} s/epoch"
            print(f"seed {seed} {name:14s} {100 * result.accuracy:6.2f}  {speed}{extra}", flush=True)
    return runs


def collect(logs: list[Path]) -> Runs:
    """The runs printed in the logs of earlier invocations (e.g. one seed per process)."""
    runs: Runs = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if match := RUN_LINE.match(line.strip()):
                seed, name, accuracy, seconds, extra = match.groups()
                heads = {k: float(v) / 100 for k, v in (item.split("=") for item in extra.split())}
                runs.setdefault(name, {})[int(seed)] = (float(accuracy) / 100, float(seconds), heads)
    return runs


def table(runs: Runs) -> list[str]:
    """Markdown: accuracy mean ± std, paired gain over the same student's baseline, heads, time."""

    def mean_std(values: list[float], sign: str = "") -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):{sign}.2f} ± {100 * spread:.2f}"

    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    lines = [
        f"MNIST-1D test accuracy (%) of the student's own classifier, seeds {', '.join(map(str, seeds))}; "
        "gain (paired by seed) and time per epoch relative to the same student's baseline. "
        "Heads: each shallow classifier's accuracy and the mean of all classifiers' logits (ensemble). "
        "Reproduce with `python benchmarks/byot.py --seeds 0 1 2`.",
        "",
        "| method | accuracy | gain | seeds with gain > 0 | heads | time / epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name in [n for n in METHODS if n in runs]:
        per_seed = runs[name]
        baseline = f"{METHODS[name].student}_baseline"
        accuracy = [per_seed[s][0] for s in sorted(per_seed)]
        gain, positive, time = "", "", ""
        if name == baseline:
            time = f"1.00x ({statistics.mean(v[1] for v in per_seed.values()):.2f} s)"
        elif baseline in runs:
            paired = sorted(set(per_seed) & set(runs[baseline]))
            gains = [per_seed[s][0] - runs[baseline][s][0] for s in paired]
            gain = mean_std(gains, sign="+")
            positive = f"{sum(g > 0 for g in gains)} / {len(gains)}"
            ratio = statistics.mean(per_seed[s][1] for s in paired) / statistics.mean(
                runs[baseline][s][1] for s in paired
            )
            time = f"{ratio:.2f}x"
        head_names = [key for key in per_seed[min(per_seed)][2] if key != "final"]
        heads = ", ".join(
            f"{key} {mean_std([per_seed[s][2][key] for s in sorted(per_seed)])}" for key in head_names
        )
        lines.append(f"| {name} | {mean_std(accuracy)} | {gain} | {positive} | {heads} | {time} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--epochs", type=int, default=STUDENT_EPOCHS, help="student epochs (150 in the table)"
    )
    parser.add_argument("--out-dir", default="runs/benchmark_byot")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="only tabulate the runs printed in these logs (no training)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    runs = (
        collect(args.collect)
        if args.collect
        else run_methods(args.seeds, args.methods, args.out_dir, args.epochs)
    )
    lines = table(runs)
    write_table(lines, args.results)


if __name__ == "__main__":
    main()
