"""Run the quickstart over several seeds; write mean +/- std of each accuracy and of the gain.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4

Each seed changes the initialisation of the teacher and of the students and the batch
order; the dataset stays the same (MNIST-1D, generator seed 42). The gain is paired: the
baseline and the KD student of one seed start from the same weights. Results go to
benchmarks/results/quickstart_seeds.md.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

from lightning_kd.quickstart import run_quickstart

RESULTS = Path(__file__).parent / "results" / "quickstart_seeds.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out-dir", default="runs/quickstart_seeds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    rows = []
    for seed in args.seeds:
        result = run_quickstart(seed=seed, out_dir=f"{args.out_dir}/seed{seed}", progress=False)
        rows.append(result)
        print(f"seed {seed}: {result.table().splitlines()[-2]}  ({result.seconds:.0f} s)", flush=True)

    def summary(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"

    lines = [
        "| seed | teacher | baseline | KD | gain | time (s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {s} | {100 * r.teacher:.2f} | {100 * r.baseline:.2f} | {100 * r.kd:.2f} "
            f"| {100 * r.gain:+.2f} | {r.seconds:.0f} |"
            for s, r in zip(args.seeds, rows, strict=True)
        ),
        f"| mean ± std | {summary([r.teacher for r in rows])} | {summary([r.baseline for r in rows])} "
        f"| {summary([r.kd for r in rows])} | {summary([r.gain for r in rows])} "
        f"| {statistics.mean(r.seconds for r in rows):.0f} |",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("MNIST-1D test accuracy (%), quickstart defaults\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
