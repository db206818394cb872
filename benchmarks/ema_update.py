"""Cost of one EMA-teacher update: the per-tensor loop over state dicts vs the fused update.

Both run side by side in one process, alternating, on the same student/teacher pair:
``reference_update`` is the straightforward loop (state dicts rebuilt each call, one ``lerp_``
per tensor); the module's ``update_ema_teacher`` pairs the tensors once and averages them in
one ``torch._foreach_lerp_``. Results go to benchmarks/results/ema_update.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from seeds import write_table

from lightning_kd import DistillationModule
from lightning_kd.models import MLP, create_cifar_model

RESULTS = Path(__file__).resolve().parent / "results" / "ema_update.md"


@torch.no_grad()
def reference_update(module: DistillationModule) -> None:
    teacher_state = module.teacher.state_dict(keep_vars=True)
    for name, value in module.student.state_dict(keep_vars=True).items():
        target = teacher_state[name]
        if target.is_floating_point():
            target.lerp_(value.detach(), 1.0 - module.ema_decay)
        else:
            target.copy_(value)


def median_us(update, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    students = {
        "MLP 40-256-256-10 (6 tensors)": MLP(in_features=40, num_classes=10, hidden=[256, 256]),
        "resnet8x4": create_cifar_model("resnet8x4", num_classes=100),
        "resnet32x4": create_cifar_model("resnet32x4", num_classes=100),
    }
    lines = [
        "# EMA teacher update: per-tensor loop vs fused",
        "",
        f"`benchmarks/ema_update.py` on {args.device}, {torch.get_num_threads()} thread(s): median time of "
        f"one update over {args.repeats} calls, alternated in {args.rounds} rounds, median of rounds.",
        "",
        "| student | tensors | loop (us) | fused (us) | fused / loop |",
        "|---|---|---|---|---|",
    ]
    for name, student in students.items():
        module = DistillationModule(student, teacher_mode="ema").to(args.device)
        loop, fused = [], []
        for _ in range(args.rounds):
            loop.append(median_us(lambda m=module: reference_update(m), args.repeats))
            fused.append(median_us(module.update_ema_teacher, args.repeats))
        tensors = len(module.student.state_dict())
        a, b = statistics.median(loop), statistics.median(fused)
        lines.append(f"| {name} | {tensors} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    write_table(lines, RESULTS)


if __name__ == "__main__":
    main()
