"""Distil the offline GPT-2 teacher into a 7x smaller student with each token divergence; held-out perplexity.

    OMP_NUM_THREADS=1 python benchmarks/lm_distillation.py --processes 2
    OMP_NUM_THREADS=1 python benchmarks/lm_distillation.py --teacher runs/lm_distillation/teacher.ckpt
    python benchmarks/lm_distillation.py --quick        # tiny sizes, a few steps: a smoke run

The settings are those of the recipes ``python_docs/teacher``, ``baseline`` and ``kd``:
``PythonDocsText`` (pydoc topics + standard-library docstrings, a 4,096-token BPE trained on the
training split, packed blocks of 128 tokens, batch 32), ``CausalLMDistillationModule``, AdamW
(lr 2e-3, weight decay 0.01), the learning rate warmed up linearly from 1% over the first 100
steps then constant (``LinearLR``, as in ``benchmarks/lm_sizing.py``; the module's default cosine
decay to 0 leaves these short runs far behind, see ``benchmarks/results/lm_distillation.md``),
gradient clipping at 1, dropout 0. The teacher (2.59M parameters) is trained once (or reused with
``--teacher``); then for each seed the student (0.37M) is trained alone (next-token CE) and
with 0.5 CE + 0.5 of each divergence of ``TokenDivergenceTerm`` at T = 1, for the same number of
steps. Within a seed every run starts from the same student weights and reads the same batches
in the same order (a data-loader generator seeded by the seed), so the gain alone - distilled is
paired. Perplexity is measured on the test split (and on the validation split, to compare with
``benchmarks/results/lm_sizing.md``). Training tokens/s are tokens of the training
batches per CPU second of the process (``time.process_time``) during ``fit``.

Each run writes its record to ``<out-dir>/records/<run>.json`` as soon as it ends, and a record
of the same settings is reused rather than rerun, so an interrupted benchmark continues where it
stopped; the table reports exactly the runs that have records.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import tokenizers
import torch
import transformers

from lightning_kd import CausalLMDistillationModule, TokenCrossEntropyTerm, TokenDivergenceTerm
from lightning_kd.data import PythonDocsText
from lightning_kd.data.text import describe_corpus
from lightning_kd.models import GPT2_SIZES, tiny_gpt2

RESULTS = Path(__file__).parent / "results" / "lm_distillation.md"

#: the divergences of TokenDivergenceTerm, in table order (jsd at beta 0.5, the skew KLs at skew 0.1)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run depends on, besides its seed and divergence (recorded with each run)."""

    teacher_shape: tuple[int, int, int] = tuple(GPT2_SIZES["teacher"].values())  # layers, width, heads
    student_shape: tuple[int, int, int] = tuple(GPT2_SIZES["student"].values())
    vocab_size: int = 4096
    block_size: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warm-up from 1% of lr, then constant
    teacher_steps: int = 750
    steps: int = 200
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    temperature: float = 1.0
    max_documents: int | None = None
    stdlib: str | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05


QUICK = Settings(
    teacher_shape=(1, 32, 2),
    student_shape=(1, 16, 2),
    vocab_size=512,
    block_size=32,
    batch_size=4,
    teacher_steps=3,
    steps=3,
    warmup_steps=2,
    max_documents=40,
    stdlib=str(Path(sysconfig.get_paths()["stdlib"]) / "json"),
    val_fraction=0.2,
    test_fraction=0.2,
)


def text_arguments(settings: Settings, cache_dir: str | None) -> dict[str, Any]:
    """The arguments of ``PythonDocsText`` (and the datamodules built on it) for ``settings``."""
    return dict(
        block_size=settings.block_size,
        vocab_size=settings.vocab_size,
        batch_size=settings.batch_size,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        cache_dir=cache_dir,
        stdlib=settings.stdlib,
        max_documents=settings.max_documents,
    )


def optimization(settings: Settings) -> dict[str, Any]:
    """Every run's optimizer and schedule: AdamW, warm-up from 1% over ``warmup_steps``, then constant."""
    return dict(
        optimizer=functools.partial(torch.optim.AdamW, lr=settings.lr, weight_decay=settings.weight_decay),
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.LinearLR, start_factor=0.01, total_iters=settings.warmup_steps
        ),
        lr_scheduler_interval="step",
    )


@functools.cache
def text_data(settings: Settings, cache_dir: str | None) -> PythonDocsText:
    """The datamodule, set up once per process."""
    data = PythonDocsText(**text_arguments(settings, cache_dir))
    data.setup("fit")
    return data


def gpt2(settings: Settings, shape: tuple[int, int, int]) -> torch.nn.Module:
    """A fresh GPT-2 of ``shape`` (as the recipes' GPT2Config: n_positions = block size, dropout 0)."""
    n_layer, n_embd, n_head = shape
    return tiny_gpt2(
        settings.vocab_size, n_positions=settings.block_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head
    )


class CountTokens(pl.Callback):
    """Counts the real tokens (attention mask) of the training batches and fingerprints the first one."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first_batch: str | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self.tokens += int(batch["attention_mask"].sum())  # CPU tensors: no device wait
        if self.first_batch is None:
            self.first_batch = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights (the same start for every run of one seed)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().numpy().tobytes())
    return digest.hexdigest()[:16]


#: settings the teacher's training does not read: a teacher record is reused when only these differ
STUDENT_ONLY = ("student_shape", "steps", "ce_weight", "kd_weight", "temperature")


def same_settings(record: dict[str, Any], settings: Settings) -> bool:
    """Whether ``record`` was trained with ``settings`` (for a teacher: the settings it reads)."""
    ignored = STUDENT_ONLY if record["kind"] == "teacher" else ()
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    return {k: v for k, v in record["settings"].items() if k not in ignored} == {
        k: v for k, v in wanted.items() if k not in ignored
    }


def run_name(seed: int, divergence: str | None) -> str:
    return f"seed{seed}-{divergence or 'alone'}"


def train_run(
    settings: Settings,
    out_dir: str,
    cache_dir: str | None,
    kind: str,
    seed: int,
    divergence: str | None = None,
    teacher_checkpoint: str | None = None,
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Train one model (``kind``: teacher, alone or kd), test it, write and return its record.

    The teacher's checkpoint is always kept (``record["checkpoint"]``); another model's only with
    ``keep_checkpoint`` (e.g. a student alone that later runs continue from).
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    name = "teacher" if kind == "teacher" else run_name(seed, divergence)
    record_path = Path(out_dir) / "records" / f"{name}.json"
    settings_dict = dataclasses.asdict(settings)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if (
            same_settings(record, settings)
            and (kind == "teacher" or record["teacher_checkpoint"] == teacher_checkpoint)
            and (not keep_checkpoint or Path(record.get("checkpoint", "")).is_file())
        ):
            return record
    data = text_data(settings, cache_dir)
    pl.seed_everything(seed, verbose=False)
    if kind == "teacher":
        student, teacher, losses = gpt2(settings, settings.teacher_shape), None, [TokenCrossEntropyTerm("ce")]
        steps = settings.teacher_steps
    else:
        student, steps = gpt2(settings, settings.student_shape), settings.steps
        teacher, losses = None, [TokenCrossEntropyTerm("ce")]
        if kind == "kd":
            teacher = gpt2(settings, settings.teacher_shape)  # built after the student: same student start
            losses = [
                TokenCrossEntropyTerm("ce", weight=settings.ce_weight),
                TokenDivergenceTerm(
                    "kd", weight=settings.kd_weight, divergence=divergence, temperature=settings.temperature
                ),
            ]
    start_weights = weights_fingerprint(student)
    module = CausalLMDistillationModule(
        student,
        teacher,
        losses=losses,
        teacher_checkpoint=teacher_checkpoint if kind == "kd" else None,
        **optimization(settings),
    )
    counter = CountTokens()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter],
    )
    loader = torch.utils.data.DataLoader(
        data.datasets["train"],
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),  # the same batches in the same order for a seed
    )
    load_start, cpu, wall = os.getloadavg()[0], time.process_time(), time.time()
    trainer.fit(module, train_dataloaders=loader)
    cpu, wall = time.process_time() - cpu, time.time() - wall
    tested = trainer.test(module, dataloaders=data.test_dataloader(), verbose=False)[0]
    validated = trainer.test(module, dataloaders=data.val_dataloader(), verbose=False)[0]
    record = {
        "name": name,
        "kind": kind,
        "seed": seed,
        "divergence": divergence,
        "steps": trainer.global_step,
        "tokens": counter.tokens,
        "cpu_s": cpu,
        "wall_s": wall,
        "load": [load_start, os.getloadavg()[0]],
        "tokens_per_cpu_s": counter.tokens / cpu,
        "test_perplexity": tested["test/perplexity"],
        "val_perplexity": validated["test/perplexity"],
        "teacher_test_perplexity": tested.get("test/teacher_perplexity"),
        "parameters": sum(p.numel() for p in student.parameters()),
        "start_weights": start_weights,
        "first_batch": counter.first_batch,
        "teacher_checkpoint": teacher_checkpoint if kind == "kd" else None,
        "settings": settings_dict,
    }
    if kind == "teacher" or keep_checkpoint:
        record["checkpoint"] = str(Path(out_dir).resolve() / f"{name}.ckpt")
        trainer.save_checkpoint(record["checkpoint"])
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    print(
        f"{name}: test perplexity {record['test_perplexity']:.2f}, {record['steps']} steps, "
        f"{record['tokens_per_cpu_s']:,.0f} tokens/s, {cpu / 60:.1f} CPU-min",
        flush=True,
    )
    return record


def _mean_std(values: Sequence[float], sign: str = "") -> str:
    """``mean ± std`` over seeds (sample std); one value is printed alone."""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f} (one seed)"
    return f"{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def _val(*runs: dict[str, Any]) -> str:
    """The validation perplexity of ``runs`` (mean ± std), or "not measured" for records without it."""
    values = [r.get("val_perplexity") for r in runs]
    return "not measured" if None in values else _mean_std(values)


def table(
    records: Sequence[dict[str, Any]], teacher: dict[str, Any] | None, divergences: Sequence[str]
) -> str:
    """The perplexity / parameters / tokens-per-second table and the paired gains, from run records."""
    by_run = {(r["seed"], r["divergence"]): r for r in records}
    alone = {seed: r for (seed, divergence), r in by_run.items() if divergence is None}
    teacher_ppl = sorted({round(r["teacher_test_perplexity"], 4) for r in records if r["kind"] == "kd"})
    lines = [
        "| model | parameters | runs (seeds) | test perplexity | validation perplexity "
        "| train tokens/s (CPU) | vs alone | CPU min / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if teacher is not None:
        lines.append(
            f"| teacher (CE) | {teacher['parameters']:,} | 1 (0) | {teacher['test_perplexity']:.2f} "
            f"| {teacher['val_perplexity']:.2f} | {teacher['tokens_per_cpu_s']:,.0f} | "
            f"| {teacher['cpu_s'] / 60:.1f} |"
        )
    elif teacher_ppl:
        lines.append(f"| teacher (reused) | | 1 | {teacher_ppl[0]:.2f} | | | | |")
    alone_rate = statistics.mean(r["tokens_per_cpu_s"] for r in alone.values()) if alone else None
    for divergence in (None, *divergences):
        runs = sorted(
            (r for r in records if r["kind"] != "teacher" and r["divergence"] == divergence),
            key=lambda r: r["seed"],
        )
        if not runs:
            continue
        rate = statistics.mean(r["tokens_per_cpu_s"] for r in runs)
        label = "student alone (CE)" if divergence is None else f"student, 0.5 CE + 0.5 {divergence}"
        lines.append(
            f"| {label} | {runs[0]['parameters']:,} | {len(runs)} ({', '.join(str(r['seed']) for r in runs)}"
            ") "
            f"| {_mean_std([r['test_perplexity'] for r in runs])} | {_val(*runs)} | {rate:,.0f} "
            f"| {rate / alone_rate:.2f}x | {statistics.mean(r['cpu_s'] for r in runs) / 60:.1f} |"
            if alone_rate
            else f"| {label} | {runs[0]['parameters']:,} | {len(runs)} | "
            f"{_mean_std([r['test_perplexity'] for r in runs])} | {_val(*runs)} | {rate:,.0f} | | |"
        )
    seeds = sorted(alone)
    lines += [
        "",
        "Paired gain in test perplexity (student alone minus distilled student; within a seed both start "
        "from the same weights and read the same batches):",
        "",
        "| divergence | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    if not any(r["kind"] == "kd" for r in records):
        lines[-4:] = ["No distilled student has a record yet: no paired gains."]
    for divergence in divergences:
        gains = {
            s: alone[s]["test_perplexity"] - by_run[(s, divergence)]["test_perplexity"]
            for s in seeds
            if (s, divergence) in by_run
        }
        if gains:
            cells = " | ".join(f"{gains[s]:+.2f}" if s in gains else "not run" for s in seeds)
            lines.append(f"| {divergence} | {cells} | {_mean_std(list(gains.values()), '+')} |")
    if len(teacher_ppl) > 1:
        lines += ["", f"The distillation runs measured the teacher at different perplexities: {teacher_ppl}."]
    return "\n".join(lines)


def train_all(
    args: argparse.Namespace, settings: Settings, seeds: Sequence[int], divergences: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str]:
    """Train (or reuse) the teacher, then every student run; ``--processes`` at a time."""
    run = functools.partial(train_run, settings, args.out_dir, args.cache_dir)
    pool = multiprocessing.get_context("spawn").Pool(args.processes) if args.processes > 1 else None
    call = pool.apply_async if pool else (lambda f, a: _Done(f(*a)))
    try:
        # phase 1: the teacher and the students alone (they need no teacher) side by side
        teacher_job = call(run, ("teacher", 0)) if args.teacher is None else None
        alone_jobs = [call(run, ("alone", seed)) for seed in seeds]
        teacher = teacher_job.get() if teacher_job else reused_teacher(args.teacher)
        checkpoint = str(Path(args.teacher).resolve()) if args.teacher else teacher["checkpoint"]
        # phase 2: the distilled students, seed by seed (an interrupted run still has whole seeds)
        kd_jobs = [call(run, ("kd", seed, d, checkpoint)) for seed in seeds for d in divergences]
        return [job.get() for job in alone_jobs + kd_jobs], teacher, checkpoint
    finally:
        if pool:
            pool.close()
            pool.join()


def reused_teacher(path: str) -> dict[str, Any] | None:
    """The record of a teacher trained by this benchmark (``records/teacher.json`` beside it), if any."""
    record = Path(path).resolve().parent / "records" / "teacher.json"
    if record.is_file():
        teacher = json.loads(record.read_text())
        if teacher["checkpoint"] == str(Path(path).resolve()):
            return teacher
    return None


def finished_records(
    out_dir: Path, settings: Settings, seeds: Sequence[int], divergences: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str]:
    """The records of ``settings`` in ``out_dir`` for these seeds and divergences (``--report``)."""
    found = [json.loads(p.read_text()) for p in sorted((out_dir / "records").glob("*.json"))]
    found = [r for r in found if same_settings(r, settings)]
    teacher = next((r for r in found if r["kind"] == "teacher"), None)
    checkpoints = {r["teacher_checkpoint"] for r in found if r["kind"] == "kd"}
    if teacher is None and len(checkpoints) == 1:
        teacher = reused_teacher(next(iter(checkpoints)))
    records = [
        r
        for r in found
        if r["kind"] != "teacher" and r["seed"] in seeds and r["divergence"] in (None, *divergences)
    ]
    if not records:
        raise SystemExit(f"No records of these settings in {out_dir / 'records'}: nothing to report.")
    checkpoint = teacher["checkpoint"] if teacher else ", ".join(sorted(checkpoints)) or "none yet"
    return records, teacher, checkpoint


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def versions() -> str:
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {pl.__version__}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 steps, 1 seed, 2 divergences")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--divergences",
        nargs="*",
        choices=DIVERGENCES,
        default=None,
        help="none given: the students alone only",
    )
    parser.add_argument("--steps", type=int, default=None, help="student steps (default 200)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default 750)")
    parser.add_argument(
        "--teacher", default=None, help="reuse this teacher checkpoint instead of training one"
    )
    parser.add_argument("--processes", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--out-dir", default="runs/lm_distillation")
    parser.add_argument("--report", action="store_true", help="train nothing: tabulate the records there are")
    parser.add_argument(
        "--cache-dir", default=None, help="the tokenizer cache (default ~/.cache/lightning_kd)"
    )
    parser.add_argument(
        "--results", default=None, help=f"write the table here (default {RESULTS}; --quick: none)"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    overrides = {"steps": args.steps, "teacher_steps": args.teacher_steps}
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if args.divergences is not None:
        divergences = args.divergences
    else:
        divergences = ["forward_kl", "jsd"] if args.quick else list(DIVERGENCES)
    results = Path(args.results) if args.results else (None if args.quick else RESULTS)
    if args.report:
        records, teacher, checkpoint = finished_records(Path(args.out_dir), settings, seeds, divergences)
    else:
        records, teacher, checkpoint = train_all(args, settings, seeds, divergences)
    how = (
        "tabulated from earlier runs' records; " if args.report else f"{args.processes} run(s) in parallel, "
    )
    how += "one thread each; "
    loads = [load for r in [*records, *([teacher] if teacher else [])] for load in r["load"]]
    cpu_minutes = sum(r["cpu_s"] for r in [*records, *([teacher] if teacher else [])]) / 60
    text = "\n".join(
        [
            # no h1: docs/language-models.md includes this file under one of its h2 sections
            "### Offline language-model distillation: a GPT-2 teacher, a 7x smaller student, each divergence",
            "",
            "```bash",
            "OMP_NUM_THREADS=1 python benchmarks/lm_distillation.py "
            + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
            "```",
            "",
            f"Machine: {machine()}. Load average (1 min) at the starts and ends of the runs: "
            f"{min(loads):.2f} to {max(loads):.2f}; {how}"
            f"{cpu_minutes:.0f} CPU-minutes of training in all.",
            f"Versions: {versions()}.",
            f"Corpus: {json.dumps(describe_corpus(text_data(settings, args.cache_dir).documents))}.",
            f"Settings: {json.dumps(dataclasses.asdict(settings))}; teacher checkpoint {checkpoint}.",
            "",
            table(records, teacher, divergences),
            "",
        ]
    )
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(text)
    print(text)
    return text


class _Done:
    """A finished result with the ``get()`` of an ``AsyncResult`` (runs in this process)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


if __name__ == "__main__":
    main()
