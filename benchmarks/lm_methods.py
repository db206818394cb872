"""LM distillation beyond word-level KD: on-policy, sequence-level, a top-k store, another tokenizer.

    OMP_NUM_THREADS=1 python benchmarks/lm_methods.py --teacher runs/lm_distillation/teacher.ckpt \\
        --baselines runs/lm_distillation/records --processes 2
    python benchmarks/lm_methods.py --quick        # tiny sizes, a few steps: a smoke run

The example of ``benchmarks/lm_distillation.py`` (its settings, teacher and student; the recipes
``python_docs/gkd``, ``seqkd``, ``kd_store``, ``uld_teacher`` and ``uld``), each method trained for
the same 200 steps from the same student start per seed, and reading the same batches in the same
order where the data are the same:

- **supervised** and **on-policy** (GKD, Agarwal et al., ICLR 2024), from the random student start
  (the recipe with ``student_checkpoint=null``; from the supervised student, as the recipe does by
  default: ``lm_warm_on_policy.py``): ``OnPolicyDistillationModule``
  with the generalized JSD (beta 0.5) at T = 1 on the blocks' continuations after a 32-token prompt;
  ``lmbda`` = 0 (supervised KD on the data), 0.5 and 1 (the student samples 96 tokens, T = 1, for that
  fraction of the batches, and the divergence is taken on its tokens).
- **sequence-level KD** (Kim & Rush, EMNLP 2016): the teacher completes every training block's first
  32 tokens with 96 tokens once (``SequenceKDData``), greedy (the recipe's) or sampled at T = 1; the
  student learns them with next-token CE.
- **the top-k store** (k = 8, 32, 128): ``lightning_kd.language.fill_token_store`` runs the teacher once
  over the training blocks; ``TokenStoreDistillationModule`` trains with 0.5 CE + 0.5 forward KL (T = 1,
  tail prior) without the teacher in memory. The live-teacher row of the same loss is
  ``lm_distillation.py``'s ``forward_kl`` (same seeds, start and batches).
- **ULD** (Boizard et al., 2024): a teacher of the same size trained on the same text with a 2,048-token
  BPE (the student's has 4,096) for the teacher's steps; the student learns with CE + 1.0 ULD (and
  + 0.1 ULD) on the positions paired on character offsets (``PythonDocsCrossTokenizerText``). Its data
  are text pieces that fit both tokenizers, not the blocks, so its reference is the same module with
  CE alone.

Perplexity is the student's on the test split of its data. Gains are paired: the same seed's student
alone (``lm_distillation.py``'s records for the blocks, ``uld_ce`` for the pieces) minus the method's.
CPU seconds per step are the process's (``time.process_time``) over ``fit``, one thread; on-policy
rows also give the host seconds spent generating. Bytes per token: what the teacher's signal costs on
disk per trained token (the store's files; the completions' shards per completed token).

Each run writes ``<out-dir>/records/<run>.json`` when it ends and is reused, not rerun, by a later call
with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_distillation import (  # noqa: E402
    QUICK,
    Settings,
    machine,
    optimization,
    same_settings,
    text_arguments,
    text_data,
    train_run,
    versions,
    weights_fingerprint,
)

from lightning_kd import (  # noqa: E402
    CausalLMDistillationModule,
    CrossTokenizerDistillationModule,
    OnPolicyDistillationModule,
    TokenCrossEntropyTerm,
    TokenDivergenceTerm,
    ULDTerm,
)
from lightning_kd.data import PythonDocsCrossTokenizerText, PythonDocsPrompts, PythonDocsText  # noqa: E402
from lightning_kd.language import (  # noqa: E402
    SequenceKDData,
    TokenStoreDistillationModule,
    TopKTokenStore,
    fill_token_store,
)
from lightning_kd.models import tiny_gpt2  # noqa: E402
from lightning_kd.step_monitor import logs_this_step  # noqa: E402
from lightning_kd.teachers.loading import load_weights  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lm_methods.md"
PROMPT_LENGTH = 32
NEW_TOKENS = 96
TEACHER_VOCABULARY = 2048  # ULD's teacher tokenizer (the student's: Settings.vocab_size)

#: method -> (table label, reference method for the paired gain); "alone" is lm_distillation's record
METHODS: dict[str, tuple[str, str]] = {
    "gkd_0": ("supervised KD (GKD lmbda 0, JSD on continuations)", "alone"),
    "gkd_0.5": ("on-policy, lmbda 0.5", "alone"),
    "gkd_1": ("on-policy, lmbda 1", "alone"),
    "seqkd": ("sequence-level KD (greedy completions, CE)", "alone"),
    "seqkd_sampled": ("sequence-level KD (sampled completions, T = 1, CE)", "alone"),
    "forward_kl": ("word-level KD, live teacher (0.5 CE + 0.5 forward KL)", "alone"),
    "store_8": ("the same from the top-k store, k = 8", "alone"),
    "store_32": ("the same from the top-k store, k = 32", "alone"),
    "store_128": ("the same from the top-k store, k = 128", "alone"),
    "uld_ce": ("text pieces of both tokenizers, CE alone", "uld_ce"),
    "uld": ("ULD, teacher of another tokenizer (CE + ULD)", "uld_ce"),
    "uld_w0.1": ("the same, ULD weight 0.1", "uld_ce"),
}
RUN_HERE = [m for m in METHODS if m != "forward_kl"]  # forward_kl and alone: lm_distillation.py's records


def prompts_data(settings: Settings, cache_dir: str | None) -> PythonDocsPrompts:
    """The blocks of ``text_data`` with a prompt of :func:`prompt_length` tokens in the training batches."""
    return PythonDocsPrompts(prompt_length=prompt_length(settings), **text_arguments(settings, cache_dir))


def prompt_length(settings: Settings) -> int:
    """``PROMPT_LENGTH`` tokens, or a quarter of a block if that is fewer (the --quick sizes)."""
    return min(PROMPT_LENGTH, settings.block_size // 4)


def gpt2(settings: Settings, shape: tuple[int, int, int], vocab_size: int | None = None) -> torch.nn.Module:
    n_layer, n_embd, n_head = shape
    return tiny_gpt2(
        vocab_size or settings.vocab_size,
        n_positions=settings.block_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
    )


def new_tokens(settings: Settings) -> int:
    return min(NEW_TOKENS, settings.block_size - prompt_length(settings))


class GenerationClock(pl.Callback):
    """Sums the module's ``train/generation_seconds`` (logged over the steps since the previous log)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        if logs_this_step(trainer) and "train/generation_seconds" in trainer.callback_metrics:
            self.seconds += float(trainer.callback_metrics["train/generation_seconds"])


def _teacher(settings: Settings, checkpoint: str, vocab_size: int | None = None) -> torch.nn.Module:
    return load_weights(gpt2(settings, settings.teacher_shape, vocab_size), checkpoint)


def store_directory(out_dir: str, k: int) -> Path:
    return Path(out_dir) / f"store-k{k}"


def build(
    method: str, settings: Settings, out_dir: str, cache_dir: str | None, seed: int, teachers: dict[str, str]
) -> tuple[CausalLMDistillationModule, pl.LightningDataModule, dict[str, Any]]:
    """The module (its student built first, under ``seed``), its datamodule and what the record adds."""
    pl.seed_everything(seed, verbose=False)
    student = gpt2(settings, settings.student_shape)
    extra: dict[str, Any] = {"start_weights": weights_fingerprint(student)}
    common = optimization(settings)
    kd = [
        TokenCrossEntropyTerm("ce", weight=settings.ce_weight),
        TokenDivergenceTerm("kd", weight=settings.kd_weight, divergence="forward_kl", path="chunked"),
    ]
    if method.startswith("gkd_"):
        module = OnPolicyDistillationModule(
            student,
            gpt2(settings, settings.teacher_shape),
            losses=[TokenDivergenceTerm("kd", divergence="jsd", beta=0.5)],
            teacher_checkpoint=teachers["same"],
            lmbda=float(method.split("_")[1]),
            max_new_tokens=new_tokens(settings),
            seed=seed,
            **common,
        )
        return module, prompts_data(settings, cache_dir), extra
    if method.startswith("seqkd"):
        data = SequenceKDData(
            prompts_data(settings, cache_dir),
            gpt2(settings, settings.teacher_shape),
            output_dir=str(Path(out_dir) / f"{method}_completions"),
            teacher_checkpoint=teachers["same"],
            max_new_tokens=new_tokens(settings),
            do_sample=method == "seqkd_sampled",
            generation_batch_size=64,
        )
        module = CausalLMDistillationModule(student, losses=[TokenCrossEntropyTerm("ce")], **common)
        return module, data, extra
    if method.startswith("store_"):
        store = store_directory(out_dir, int(method.split("_")[1]))
        data = PythonDocsText(**text_arguments(settings, cache_dir), return_index=True)
        module = TokenStoreDistillationModule(student, store, losses=kd, **common)
        extra["bytes_per_token"] = _store_bytes(store)
        return module, data, extra
    if method.startswith("uld"):
        losses: list[Any] = [TokenCrossEntropyTerm("ce")]
        if method != "uld_ce":
            losses.append(ULDTerm("uld", weight=0.1 if method == "uld_w0.1" else 1.0))
        module = CrossTokenizerDistillationModule(
            student,
            _teacher(settings, teachers["other"], TEACHER_VOCABULARY),
            losses=losses,
            **common,
        )
        data = PythonDocsCrossTokenizerText(
            teacher_vocab_size=TEACHER_VOCABULARY, **text_arguments(settings, cache_dir)
        )
        return module, data, extra
    raise ValueError(f"unknown method {method!r}; choose from {RUN_HERE}")


def _store_bytes(store: Path) -> float:
    return TopKTokenStore(store).bytes_per_token


def run_jobs(function: Callable[..., dict[str, Any]], jobs: Sequence[tuple], processes: int) -> list:
    """``function(*job)`` for every job: in ``processes`` spawned processes (a fresh one per job), or here."""
    if processes <= 1:
        return [function(*job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        return pool.starmap(function, jobs)


def method_trainer(settings: Settings, clock: GenerationClock) -> pl.Trainer:
    """The CPU trainer of every method: ``settings.steps`` steps, clipped at 1, logging every step."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=settings.steps,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )


def train_method(
    settings: Settings,
    out_dir: str,
    cache_dir: str | None,
    method: str,
    seed: int,
    teachers: dict[str, str],
) -> dict[str, Any]:
    """Train and test one (method, seed); write and return its record."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    name = f"seed{seed}-{method}"
    record_path = Path(out_dir) / "records" / f"{name}.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if same_settings(record, settings) and record["teachers"] == teachers:
            return record
    module, data, extra = build(method, settings, out_dir, cache_dir, seed, teachers)
    clock = GenerationClock()
    trainer = method_trainer(settings, clock)
    data.prepare_data()  # seqkd: the teacher's generation pass (once; timed apart from the fit)
    data.setup("fit")
    cpu, wall = time.process_time(), time.time()
    trainer.fit(module, datamodule=data)
    cpu, wall = time.process_time() - cpu, time.time() - wall
    tested = trainer.test(module, dataloaders=data.test_dataloader(), verbose=False)[0]
    if method.startswith("seqkd"):  # the completions' shards per completed token
        shards = sorted((Path(out_dir) / f"{method}_completions").glob("batch-*.pt"))
        tokens = sum(
            len(row) for shard in shards for row in torch.load(shard, weights_only=True)["completions"]
        )
        extra["bytes_per_token"] = sum(shard.stat().st_size for shard in shards) / tokens
    record = {
        "name": name,
        "kind": method,
        "seed": seed,
        "steps": trainer.global_step,
        "cpu_s": cpu,
        "wall_s": wall,
        "generation_s": clock.seconds,
        "load": [os.getloadavg()[0]],
        "test_perplexity": tested["test/perplexity"],
        "teachers": teachers,
        "settings": dataclasses.asdict(settings),
        **extra,
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    print(f"{name}: test perplexity {record['test_perplexity']:.2f}, {cpu / 60:.1f} CPU-min", flush=True)
    return record


def fill_stores(
    settings: Settings, out_dir: str, cache_dir: str | None, checkpoint: str, ks: Sequence[int]
) -> dict[int, float]:
    """Fill (or reuse) the top-k store of each k; the CPU seconds each fill took (kept beside the store)."""
    torch.set_num_threads(1)
    seconds = {}
    data = text_data(settings, cache_dir)
    teacher = _teacher(settings, checkpoint).eval()
    for k in ks:
        directory = store_directory(out_dir, k)
        timing = directory.with_suffix(".fill.json")
        meta = directory / "meta.json"
        complete = meta.is_file() and json.loads(meta.read_text()).get("complete") is True
        start = time.process_time()
        fill_token_store(teacher, data.datasets["train"], directory, k=k, tokenizer=data.tokenizer)
        if not complete or not timing.is_file():  # a complete store is checked, not filled: keep its time
            timing.write_text(json.dumps({"cpu_s": time.process_time() - start}))
        seconds[k] = json.loads(timing.read_text())["cpu_s"]
    return seconds


def mean_std(values: Sequence[float], sign: str = "") -> str:
    """``mean ± sd`` over seeds (sample sd), two decimals; one value alone."""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def table(records: dict[str, dict[int, dict[str, Any]]], seeds: Sequence[int]) -> list[str]:
    """Rows: perplexity mean ± std, paired gain over the reference, CPU s/step, bytes per token."""
    lines = [
        "| method | seeds | test perplexity | gain (paired) | CPU s / step | of which generation "
        "| bytes / token |",
        "|---|---|---|---|---|---|---|",
    ]
    alone = records.get("alone", {})
    done_alone = [s for s in seeds if s in alone]
    lines.append(
        f"| student alone (CE) | {len(done_alone)} | "
        f"{mean_std([alone[s]['test_perplexity'] for s in done_alone]) if done_alone else 'not run'} "
        f"| | {_per_step(alone, seeds)} | | |"
    )
    for method, (label, reference) in METHODS.items():
        runs = records.get(method, {})
        done = [s for s in seeds if s in runs]
        if not done:
            lines.append(f"| {label} | 0 | not run | | | | |")
            continue
        ppl = mean_std([runs[s]["test_perplexity"] for s in done])
        ref = records.get(reference, {})
        paired = [ref[s]["test_perplexity"] - runs[s]["test_perplexity"] for s in done if s in ref]
        unpaired = [s for s in done if s in ref and ref[s]["start_weights"] != runs[s]["start_weights"]]
        if unpaired:
            raise ValueError(f"{method} and {reference} start from other student weights at seeds {unpaired}")
        gain = mean_std(paired, "+") if paired and method != reference else ""
        generation = [runs[s].get("generation_s", 0.0) / runs[s]["steps"] for s in done]
        gen = f"{statistics.mean(generation):.3f}" if any(generation) else ""
        size = runs[done[0]].get("bytes_per_token")
        lines.append(
            f"| {label} | {len(done)} | {ppl} | {gain} | {_per_step(runs, done)} | {gen} | "
            f"{'' if size is None else f'{size:.0f}'} |"
        )
    return lines


def _per_step(runs: dict[int, dict[str, Any]], seeds: Sequence[int]) -> str:
    values = [runs[s]["cpu_s"] / runs[s]["steps"] for s in seeds if s in runs]
    return f"{statistics.mean(values):.3f}" if values else ""


def _recorded_checkpoint(directory: Path) -> str:
    """The checkpoint of the teacher that ``lm_distillation.train_run`` recorded in ``directory``."""
    record = directory / "records" / "teacher.json"
    if not record.is_file():
        raise FileNotFoundError(
            f"--report: no teacher record at {record}; train it first (run without --report)."
        )
    return json.loads(record.read_text())["checkpoint"]


def _recorded_runs(
    out: Path, settings: Settings, seeds: Sequence[int], methods: Sequence[str], teachers: dict[str, str]
) -> list[dict[str, Any]]:
    """The records in ``out/records`` of these seeds and methods, settings and teachers."""
    runs = []
    for seed in seeds:
        for method in methods:
            path = out / "records" / f"seed{seed}-{method}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                if same_settings(record, settings) and record["teachers"] == teachers:
                    runs.append(record)
    return runs


def _baseline_records(
    directory: Path, seeds: Sequence[int], settings: Settings, teacher: str
) -> dict[str, dict[int, Any]]:
    """lm_distillation.py's records of the students alone and of live forward KL from ``teacher``."""
    out: dict[str, dict[int, Any]] = {"alone": {}, "forward_kl": {}}
    for seed in seeds:
        for kind in out:
            path = directory / f"seed{seed}-{kind}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                if same_settings(record, settings) and record["teacher_checkpoint"] in (None, teacher):
                    out[kind][seed] = record
    return out


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 steps, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", choices=RUN_HERE, default=None)
    parser.add_argument(
        "--teacher", default=None, help="the teacher of lm_distillation.py (trained if not given)"
    )
    parser.add_argument(
        "--baselines",
        default=None,
        help="lm_distillation.py's records folder (alone, forward_kl); default: run here",
    )
    parser.add_argument("--processes", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--out-dir", default="runs/lm_methods")
    parser.add_argument(
        "--cache-dir", default=None, help="the tokenizer cache (default ~/.cache/lightning_kd)"
    )
    parser.add_argument(
        "--results", default=None, help=f"write the table here (default {RESULTS}; --quick: none)"
    )
    parser.add_argument("--report", action="store_true", help="train nothing: tabulate the records there are")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = args.methods or RUN_HERE
    out = Path(args.out_dir)
    common = dict(out_dir=str(out / "lm_distillation"), cache_dir=args.cache_dir)
    ks = [int(m.split("_")[1]) for m in methods if m.startswith("store_")]
    baselines = Path(args.baselines) if args.baselines else out / "lm_distillation" / "records"
    if args.report:
        teacher = args.teacher or _recorded_checkpoint(out / "lm_distillation")
        teachers = {"same": str(Path(teacher).resolve()), "other": _recorded_checkpoint(out / "uld_teacher")}
        done = _recorded_runs(out, settings, seeds, methods, teachers)
        timings = [store_directory(str(out), k).with_suffix(".fill.json") for k in ks]
        fills = {
            k: json.loads(t.read_text())["cpu_s"] for k, t in zip(ks, timings, strict=True) if t.is_file()
        }
    else:
        teacher = args.teacher or train_run(settings, kind="teacher", seed=0, **common)["checkpoint"]
        other_settings = dataclasses.replace(settings, vocab_size=TEACHER_VOCABULARY)
        other = train_run(other_settings, str(out / "uld_teacher"), args.cache_dir, "teacher", 0)[
            "checkpoint"
        ]
        teachers = {"same": str(Path(teacher).resolve()), "other": other}
        if not args.baselines:
            for seed in seeds:
                train_run(settings, kind="alone", seed=seed, **common)
                train_run(
                    settings,
                    kind="kd",
                    seed=seed,
                    divergence="forward_kl",
                    teacher_checkpoint=teacher,
                    **common,
                )
        fills = fill_stores(settings, str(out), args.cache_dir, teacher, ks) if ks else {}
        jobs = [(settings, str(out), args.cache_dir, m, s, teachers) for s in seeds for m in methods]
        done = run_jobs(train_method, jobs, args.processes)
    records = _baseline_records(baselines, seeds, settings, teachers["same"])
    for record in done:
        records.setdefault(record["kind"], {})[record["seed"]] = record
    text = "\n".join(
        [
            # no h1: docs/language-models.md includes this file under one of its h2 sections
            "### On-policy, sequence-level, stored and cross-tokenizer distillation on the example",
            "",
            f"Seeds {', '.join(map(str, seeds))} (column seeds: how many have a record), "
            f"{settings.steps} steps each, student {settings.student_shape}, "
            f"teacher {settings.teacher_shape} (layers, width, heads), V = {settings.vocab_size}; "
            + ("tabulated from the runs' records" if args.report else f"{args.processes} run(s) in parallel")
            + ", one thread each. Store fills (CPU s): "
            + ", ".join(f"k = {k}: {s:.0f}" for k, s in fills.items()),
            "",
            *table(records, seeds),
            "",
            f"Machine: {machine()}. {versions()}.",
            "",
        ]
    )
    results = Path(args.results) if args.results else (None if args.quick else RESULTS)
    if results is not None:
        results.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
