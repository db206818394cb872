"""Chains on MNIST-1D: born-again generations and teacher assistants against direct KD and the baseline.

    python benchmarks/chains.py --seeds 0 1 2                 # 10-15 minutes a seed on a busy 2-core machine
    python benchmarks/chains.py --seeds 0 --assistants cnn_small
    python benchmarks/chains.py --collect seed0.log seed1.log  # tabulate runs made in parallel

The setting is the quickstart's (4,500 training / 500 validation / 10,000 test samples; the
ConvNet1d teacher 60 epochs with Adam 1e-3; every other link 150 epochs with Adam 3e-3;
cosine decay, batch 128; every distilled link 0.1 CE + 0.9 KD at T = 4). Per seed:

- born-again networks (Furlanello et al., ICML 2018): generations 0, 1, 2 of the quickstart
  MLP student; generation 0 learns from the labels and is the baseline; the ensemble averages
  the three generations' probabilities;
- direct KD: teacher -> MLP student;
- TAKD (Mirzadeh et al., AAAI 2020): teacher -> assistant -> MLP student, one chain per
  assistant.

Every MLP of a seed starts from the same initial weights (``seed + 1``) and every link's fit
sees the same batch order (``run_chain(seed=seed + 1)``), so gains are paired per seed. The
chains resume: rerunning with the same --out-dir reuses finished links. Writes
benchmarks/results/chains.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import Runs, collect, mean_std, write_table
from torch import nn

from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.paradigms.chain import ChainLink, ensemble_accuracy, run_chain

RESULTS = Path(__file__).parent / "results" / "chains.md"
TEACHER_EPOCHS, STUDENT_EPOCHS = 60, 150
TEACHER_OPTIMIZER = functools.partial(torch.optim.Adam, lr=1e-3)
STUDENT_OPTIMIZER = functools.partial(torch.optim.Adam, lr=3e-3)

# assistants: the ConvNet1d teacher has 102k parameters (~95%), the MLP student 79k (~69% alone);
# cnn_small is the recipe mnist1d/paradigms/takd's
ASSISTANTS: dict[str, Callable[[], nn.Module]] = {
    "cnn_small": lambda: ConvNet1d(num_classes=10, widths=(16, 32, 32), hidden=64),
    "cnn_tiny": lambda: ConvNet1d(num_classes=10, widths=(4, 8, 8), hidden=16),
    "mlp_wide": lambda: MLP(in_features=40, num_classes=10, hidden=(512, 512)),
}


def student(seed: int) -> nn.Module:
    """The seed's MLP student, identical in every chain of the seed."""
    pl.seed_everything(seed + 1, verbose=False)
    return MLP(in_features=40, num_classes=10, hidden=(256, 256))


def assistant(name: str, seed: int) -> nn.Module:
    pl.seed_everything(seed + 1, verbose=False)
    return ASSISTANTS[name]()


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_seed(seed: int, assistants: list[str], out_dir: Path) -> Runs:
    """All chains of one seed; prints one line per row."""
    datamodule = MNIST1DDataModule(train_samples=5000)
    datamodule.setup("fit")  # generate the data once, outside the timed fits
    out = out_dir / f"seed{seed}"
    chain = functools.partial(
        run_chain, datamodule=datamodule, optimizer=STUDENT_OPTIMIZER, seed=seed + 1, progress=False
    )
    runs: Runs = {}

    def record(row: str, accuracy: float, seconds: float) -> None:
        runs[row] = {seed: (accuracy, seconds)}
        print(f"seed {seed} {row:18s} {100 * accuracy:6.2f}  {seconds:.3f} s/epoch", flush=True)

    generations = [ChainLink(f"gen{k}", student(seed), epochs=STUDENT_EPOCHS) for k in range(3)]
    for k, result in enumerate(chain(generations, out_dir=out / "born_again")):
        record(f"ban_gen{k}", result.accuracy, result.seconds_per_epoch)
    ensemble = ensemble_accuracy([g.model for g in generations], datamodule)
    record("ban_ensemble", ensemble, 0.0)

    pl.seed_everything(seed, verbose=False)
    teacher = ChainLink("teacher", ConvNet1d(num_classes=10), TEACHER_EPOCHS, optimizer=TEACHER_OPTIMIZER)
    (teacher_result, kd) = chain(
        [teacher, ChainLink("student", student(seed), STUDENT_EPOCHS)], out_dir=out / "kd"
    )
    record("teacher", teacher_result.accuracy, teacher_result.seconds_per_epoch)
    record("kd", kd.accuracy, kd.seconds_per_epoch)
    for name in assistants:
        given = ChainLink("teacher", ConvNet1d(num_classes=10), checkpoint=teacher_result.checkpoint)
        links = [
            given,
            ChainLink("assistant", assistant(name, seed), STUDENT_EPOCHS),
            ChainLink("student", student(seed), STUDENT_EPOCHS),
        ]
        _, assistant_result, takd = chain(links, out_dir=out / f"takd_{name}")
        record(f"assistant_{name}", assistant_result.accuracy, assistant_result.seconds_per_epoch)
        record(f"takd_{name}", takd.accuracy, takd.seconds_per_epoch)
    return runs


def paired(runs: Runs, row: str, reference: str) -> str:
    """Mean ± std over seeds of ``row - reference``, and how many seeds are positive."""
    seeds = sorted(set(runs.get(row, {})) & set(runs.get(reference, {})))
    if not seeds:
        return ""
    gains = [runs[row][s][0] - runs[reference][s][0] for s in seeds]
    return f"{mean_std(gains)} ({sum(g > 0 for g in gains)}/{len(gains)} > 0)"


def table(runs: Runs) -> list[str]:
    """Markdown: accuracy, gain over the baseline (generation 0) and over direct KD, paired by seed."""
    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    lines = [
        f"MNIST-1D test accuracy (%), seeds {', '.join(map(str, seeds))}, in the quickstart setting (4,500 / "
        "500 / 10,000 samples; teacher 60 epochs Adam 1e-3, every other link 150 epochs Adam 3e-3, cosine, "
        "batch 128; distilled links 0.1 CE + 0.9 KD at T = 4): mean ± std over seeds. Gains are paired "
        "per seed (mean ± std, and the seeds with a positive gain); the baseline is born-again generation "
        "0. Times per epoch are rough: other jobs shared the 2 CPU cores.",
        "",
        "| row | model | accuracy | gain over baseline | gain over direct KD | time / epoch (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row, per_seed in runs.items():
        model = "MLP 256-256"
        if row == "teacher":
            model = f"ConvNet1d ({parameters(ConvNet1d(num_classes=10)):,} parameters)"
        elif row.startswith("assistant_"):
            built = ASSISTANTS[row.removeprefix("assistant_")]()
            model = f"{type(built).__name__} ({parameters(built):,} parameters)"
        accuracy = mean_std([per_seed[s][0] for s in sorted(per_seed)])
        is_mlp = model == "MLP 256-256" and row != "ban_gen0"
        if row == "ban_gen0":
            model = f"MLP 256-256 ({parameters(student(0)):,} parameters)"
        elif row == "ban_ensemble":
            model = "mean of generations 0-2"
        gain = paired(runs, row, "ban_gen0") if is_mlp else ""
        over_kd = paired(runs, row, "kd") if is_mlp and row != "kd" else ""
        seconds = statistics.mean(v[1] for v in per_seed.values())
        lines.append(
            f"| {row} | {model} | {accuracy} | {gain} | {over_kd} | {f'{seconds:.2f}' if seconds else ''} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--assistants", nargs="+", default=list(ASSISTANTS), choices=list(ASSISTANTS))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmark_chains"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="only tabulate the runs printed in these logs (no training)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.collect:
        runs = collect(args.collect)
    else:
        runs = {}
        for seed in args.seeds:
            for row, per_seed in run_seed(seed, args.assistants, args.out_dir).items():
                runs.setdefault(row, {}).update(per_seed)
    lines = table(runs)
    write_table(lines, args.results)


if __name__ == "__main__":
    main()
