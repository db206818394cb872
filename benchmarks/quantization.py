"""Quantization-aware distillation on MNIST-1D: the int8 MLP student with and without the teacher.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/quantization.py --seeds 0 1 2
    python benchmarks/quantization.py --collect seed0.log seed1.log   # tabulate runs made apart

The quickstart's setting (4,500 training / 500 validation / 10,000 test samples; ConvNet1d
teacher, 60 epochs; MLP 40-256-256-10 student, Adam 3e-3, cosine, batch 128; the epochs of the
students are ``--student-epochs``, 150 in benchmarks/paradigms.py). Per seed, every student
starts from the seed's same initial weights. Rows:

- float / float_kd: the float student, CE only / 0.1 CE + 0.9 KD (T = 4) from the frozen teacher.
- qat / qat_kd: the same two objectives, the student trained with int8 fake quantization
  (``QuantizationAwareTraining``, x86 backend, observers frozen for the last quarter of the
  epochs); the accuracy is the converted int8 student's (``quantized/test_acc``).
- ptq_kd: post-training static int8 quantization of the float_kd student (calibrated on 10
  training batches), no retraining.

Writes benchmarks/results/quantization.md: test accuracy mean ± std, the gain of KD for the
float and for the int8 student (paired per seed), and size and CPU latency of the float and
int8 students, measured side by side in this process.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from seeds import Runs, collect, mean_std, quiet_trainer, write_table

from lightning_kd import DistillationModule
from lightning_kd.callbacks import QuantizationAwareTraining
from lightning_kd.callbacks.report import checkpoint_bytes, latency_ms
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.quantization import evaluate_int8, post_training_int8
from lightning_kd.quickstart import fit_and_test

RESULTS = Path(__file__).parent / "results" / "quantization.md"
optimizer = functools.partial(torch.optim.Adam, lr=3e-3)
ROWS = ("float", "float_kd", "qat", "qat_kd", "ptq_kd")
COST_LINE = re.compile(r"^cost (\S+) (\d+) bytes ([\d.]+) ms batch1 ([\d.]+) ms batch128$")


def student(seed: int) -> MLP:
    """The seed's MLP student, the same initial weights in every row."""
    pl.seed_everything(seed + 1, verbose=False)
    return MLP(in_features=40, num_classes=10, hidden=(256, 256))


def fit_and_test_int8(
    module: DistillationModule, datamodule: MNIST1DDataModule, epochs: int
) -> tuple[float, float, float]:
    """Fit with QAT, test; (int8 test accuracy, fake-quant float test accuracy, seconds per epoch)."""
    qat = QuantizationAwareTraining(freeze_observers_epoch=epochs - epochs // 4, filename=None)
    trainer = quiet_trainer(epochs, callbacks=[qat], limit_val_batches=None)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = (time.perf_counter() - started) / epochs
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return metrics["quantized/test_acc"], metrics["test/acc"], seconds


def int8_test_accuracy(int8_model: torch.nn.Module, datamodule: MNIST1DDataModule) -> float:
    """Top-1 accuracy of an int8 model on the test split (CPU, x86 kernels)."""
    return evaluate_int8(int8_model, datamodule.test_dataloader())["acc"]


def costs(float_student: torch.nn.Module, int8_student: torch.nn.Module, repeats: int = 200) -> list[str]:
    """Size and median CPU latency of both students, timed alternately in this process."""
    example = torch.randn(128, 40)
    lines = []
    times: dict[str, dict[int, list[float]]] = {"float": {1: [], 128: []}, "int8": {1: [], 128: []}}
    torch.backends.quantized.engine = "x86"
    models = {"float": float_student.cpu().eval(), "int8": int8_student}
    for _, (name, model), size in itertools.product(range(5), models.items(), (1, 128)):
        times[name][size].append(latency_ms(model, example[:size], repeats=repeats // 5, warmup=5))
    for name, model in models.items():
        bytes_ = checkpoint_bytes(model)
        median = {size: statistics.median(values) for size, values in times[name].items()}
        lines.append(f"cost {name} {bytes_} bytes {median[1]:.4f} ms batch1 {median[128]:.4f} ms batch128")
    return lines


def run(seeds: list[int], teacher_epochs: int, student_epochs: int, out_dir: str) -> tuple[Runs, list[str]]:
    """Train the seed's teacher, then every row; print one line per run."""
    datamodule = MNIST1DDataModule()
    runs: Runs = {}
    cost_lines: list[str] = []

    def record(seed: int, name: str, accuracy: float, seconds: float) -> None:
        runs.setdefault(name, {})[seed] = (accuracy, seconds)
        print(f"seed {seed} {name:16s} {100 * accuracy:6.2f}  {seconds:.3f} s/epoch", flush=True)

    for seed in seeds:
        out = Path(out_dir) / f"seed{seed}"
        pl.seed_everything(seed, verbose=False)
        teacher = fit_and_test(
            "teacher", DistillationModule(ConvNet1d()), datamodule, teacher_epochs, out, False
        )
        record(seed, "teacher", teacher.accuracy, teacher.seconds_per_epoch)

        def with_teacher(checkpoint: str = teacher.checkpoint) -> dict[str, object]:
            return {"teacher": ConvNet1d(), "teacher_checkpoint": checkpoint}

        float_students = {}
        for name, kwargs in (("float", {}), ("float_kd", with_teacher())):
            module = DistillationModule(student(seed), optimizer=optimizer, **kwargs)
            result = fit_and_test(name, module, datamodule, student_epochs, out, False)
            float_students[name] = module.student
            record(seed, name, result.accuracy, result.seconds_per_epoch)
        for name, kwargs in (("qat", {}), ("qat_kd", with_teacher())):
            module = DistillationModule(student(seed), optimizer=optimizer, **kwargs)
            int8_accuracy, fake_quant_accuracy, seconds = fit_and_test_int8(
                module, datamodule, student_epochs
            )
            record(seed, name, int8_accuracy, seconds)
            record(seed, f"{name}_fakequant", fake_quant_accuracy, seconds)
        calibration = (batch[0] for batch in itertools.islice(datamodule.train_dataloader(), 10))
        int8_kd = post_training_int8(float_students["float_kd"], calibration)
        record(seed, "ptq_kd", int8_test_accuracy(int8_kd, datamodule), 0.0)
        if seed == seeds[0]:
            cost_lines = costs(float_students["float_kd"], int8_kd)
            print("\n".join(cost_lines), flush=True)
    return runs, cost_lines


def table(runs: Runs, cost_lines: list[str], teacher_epochs: int, student_epochs: int) -> list[str]:
    """Markdown: accuracy mean ± std, the paired gain of KD, and the size / latency table."""
    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    labels = {
        "teacher": "teacher (ConvNet1d, float)",
        "float": "float student",
        "float_kd": "float student + KD",
        "qat": "int8 student, QAT",
        "qat_kd": "int8 student, QAT + KD",
        "qat_fakequant": "(QAT student before conversion, fake-quant float)",
        "qat_kd_fakequant": "(QAT + KD student before conversion, fake-quant float)",
        "ptq_kd": "int8 student, post-training quantization of float + KD",
    }
    kd_pairs = {"float_kd": "float", "qat_kd": "qat", "qat_kd_fakequant": "qat_fakequant"}
    lines = [
        f"MNIST-1D test accuracy (%), 10,000 test samples, seeds {', '.join(map(str, seeds))}; MLP student "
        f"40-256-256-10, {student_epochs} epochs, Adam 3e-3, cosine, batch 128; teacher ConvNet1d, "
        f"{teacher_epochs} epochs. Gain of KD: with minus without the teacher, paired per seed "
        "(mean ± std over seeds; seeds with a positive gain).",
        "",
        "| student | seeds | accuracy | gain of KD | seeds with gain > 0 |",
        "|---|---|---|---|---|",
    ]
    for name in [n for n in labels if n in runs]:
        accuracy = [runs[name][s][0] for s in sorted(runs[name])]
        gain = positive = ""
        if name in kd_pairs and kd_pairs[name] in runs:
            base = runs[kd_pairs[name]]
            gains = [runs[name][s][0] - base[s][0] for s in sorted(set(runs[name]) & set(base))]
            gain, positive = mean_std(gains, "+"), f"{sum(g > 0 for g in gains)} / {len(gains)}"
        seeds_of_row = ", ".join(map(str, sorted(runs[name])))
        lines.append(f"| {labels[name]} | {seeds_of_row} | {mean_std(accuracy)} | {gain} | {positive} |")
    if cost_lines:
        parsed = {m[1]: m.groups()[1:] for m in map(COST_LINE.match, cost_lines) if m}
        (f_bytes, f_1, f_128), (q_bytes, q_1, q_128) = parsed["float"], parsed["int8"]
        lines += [
            "",
            "Size and CPU latency of the float + KD student and its int8 version (seed "
            f"{seeds[0]}), measured side by side in one process, {torch.get_num_threads()} thread(s), "
            "x86 backend; median of 200 timed forward passes, alternated in 5 rounds.",
            "",
            "| | float | int8 | int8 / float |",
            "|---|---|---|---|",
            f"| state dict (bytes) | {f_bytes} | {q_bytes} | {int(q_bytes) / int(f_bytes):.2f}x |",
            f"| latency, batch 1 (ms) | {float(f_1):.4f} | {float(q_1):.4f} | "
            f"{float(q_1) / float(f_1):.2f}x |",
            f"| latency, batch 128 (ms) | {float(f_128):.4f} | {float(q_128):.4f} | "
            f"{float(q_128) / float(f_128):.2f}x |",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--student-epochs", type=int, default=150)
    parser.add_argument("--out-dir", default="runs/benchmark_quantization")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the Markdown table goes")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="only tabulate the runs printed in these logs"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.collect:
        runs = collect(args.collect)
        cost_lines = [
            line for log in args.collect for line in log.read_text().splitlines() if COST_LINE.match(line)
        ]
    else:
        runs, cost_lines = run(args.seeds, args.teacher_epochs, args.student_epochs, args.out_dir)
    write_table(table(runs, cost_lines, args.teacher_epochs, args.student_epochs), args.results)


if __name__ == "__main__":
    main()
