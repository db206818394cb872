"""On-policy distillation from a supervised student (GKD's setting) against more supervised training.

    OMP_NUM_THREADS=1 python benchmarks/lm_warm_on_policy.py --teacher runs/lm_distillation/teacher.ckpt \\
        --processes 2    # --judge <another teacher.ckpt>: reuse one; otherwise trained here (seed 1)
    python benchmarks/lm_warm_on_policy.py --quick      # tiny sizes, a few steps: a smoke run

GKD (Agarwal et al., ICLR 2024) distils into a student that was first fine-tuned on the data; its
claim is about the text the student then *generates*. ``lm_methods.py`` starts on-policy runs from a
random student, whose first samples are noise. Here each seed's start is the student alone of
``lm_distillation.py`` (next-token CE, ``Settings.steps`` steps, kept as a checkpoint), and every
method trains it ``Settings.steps`` more steps on the same prompt batches (a 32-token prompt, the
block's continuation learned):

- ``ce``: next-token CE on the continuations (the reference of the paired gains);
- ``gkd_0``: supervised KD, the generalized JSD (beta 0.5, T = 1) on the continuations;
- ``gkd_0.5``, ``gkd_1``: that fraction of the batches on-policy (the student samples 96 tokens, T = 1,
  the divergence is taken on its tokens); the recipe ``python_docs/gkd``.

The measures of each run, on the test split:

- **test perplexity**: the student's on the test blocks (every token counted), as everywhere else;
- **the teacher's perplexity of the student's samples**: the student completes the first 32 tokens of
  ``SAMPLE_PROMPTS`` test blocks with 96 tokens (T = 1, a seed fixed per seed, the same for every
  method) and the teacher scores the completions: exp of its mean negative log-likelihood per
  generated token. It falls as the student's text becomes text the teacher would write. The
  on-policy runs minimise a divergence to this very teacher on their own samples, so this measure
  favours them by construction;
- **the judge's perplexity of the same samples**: the judge is a second teacher, trained like the
  first from another seed (``--judge``, or trained here), which no run learns from;
- **the student's perplexity of its own samples** (low: confident, narrow text) and the share of
  repeated 4-grams within a completion (loops), which also score well with a teacher.

For scale, the same measures of the real test continuations and of the teacher's own samples are
given.

Each run writes ``<out-dir>/records/<run>.json`` when it ends and is reused by a later call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_distillation import (  # noqa: E402
    QUICK,
    Settings,
    machine,
    optimization,
    same_settings,
    text_data,
    train_run,
    versions,
    weights_fingerprint,
)
from lm_methods import (  # noqa: E402
    GenerationClock,
    build,
    gpt2,
    mean_std,
    method_trainer,
    new_tokens,
    prompt_length,
    prompts_data,
    run_jobs,
)

from lightning_kd import CausalLMDistillationModule, TokenCrossEntropyTerm  # noqa: E402
from lightning_kd.data import PromptCollator  # noqa: E402
from lightning_kd.language.generation import (  # noqa: E402
    GenerationSettings,
    completion_batch,
    derived_seed,
    end_of_sequence_id,
    generate_completions,
    pad_token_id,
)
from lightning_kd.teachers.loading import load_weights  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lm_warm_on_policy.md"
SAMPLE_PROMPTS = 128
JUDGE_SEED = 1  # the judge: a teacher like lm_distillation's (seed 0), trained from this seed

#: method -> table label; "start" is the supervised student itself (no more steps)
METHODS: dict[str, str] = {
    "start": "the supervised student (the start)",
    "ce": "+ {steps} steps next-token CE (the reference)",
    "gkd_0": "+ {steps} steps supervised KD (GKD lmbda 0: JSD on the data)",
    "gkd_0.5": "+ {steps} steps on-policy, lmbda 0.5",
    "gkd_1": "+ {steps} steps on-policy, lmbda 1",
}


def sampled_batch(
    model: torch.nn.Module | None, settings: Settings, test: Any, pad_id: int, seed: int | None
) -> dict:
    """``model``'s completions of the first ``SAMPLE_PROMPTS`` test prompts as a causal-LM batch.

    Labels count exactly the generated tokens (up to and including the first end-of-sequence
    token); ``seed`` fixes the sampling (T = 1, no top-k or top-p cut). ``model=None``: the real
    continuations of the same prompts. ``pad_id``: the tokenizer's padding id.
    """
    rows = [test[i] for i in range(min(SAMPLE_PROMPTS, len(test)))]
    batch = PromptCollator(pad_id, prompt_length(settings))(rows)
    if model is None:
        return batch
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    generation = GenerationSettings(max_new_tokens=new_tokens(settings), temperature=1.0, top_p=1.0)
    sequences = generate_completions(model, ids, mask, generation, derived_seed(seed, "samples"))
    return completion_batch(sequences, mask, end_of_sequence_id(model), pad_token_id(model))


def mean_nll(scorer: torch.nn.Module, batch: dict) -> float:
    """``scorer``'s mean negative log-likelihood (nats, float64) per counted label of ``batch``."""
    scorer.eval()
    with torch.no_grad():
        logits = scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels.flatten(), ignore_index=-100))


def sample_measures(
    model: torch.nn.Module | None,
    scorers: dict[str, torch.nn.Module],
    settings: Settings,
    test: Any,
    pad_id: int,
    seed: int | None,
) -> dict[str, float]:
    """Each scorer's NLL of ``model``'s samples (``<name>_nll``), the model's own, and their repeats."""
    batch = sampled_batch(model, settings, test, pad_id, seed)
    measures = {f"{name}_nll": mean_nll(scorer, batch) for name, scorer in scorers.items()}
    if model is not None:
        measures["own_nll"] = mean_nll(model, batch)
    return {**measures, "repeated_4grams": repeated_ngrams(batch["labels"][:, 1:], 4)}


def repeated_ngrams(labels: torch.Tensor, n: int) -> float:
    """Of all counted n-grams (labels != -100) of all rows, the share seen earlier in the same row."""
    repeated = total = 0
    for row in labels:
        tokens = row[row != -100].tolist()
        seen: set[tuple[int, ...]] = set()
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / max(total, 1)


def warm_start(settings: Settings, out_dir: str, cache_dir: str | None, seed: int) -> dict[str, Any]:
    """``lm_distillation.py``'s student alone of ``seed``, trained here with its checkpoint kept."""
    return train_run(settings, str(Path(out_dir) / "start"), cache_dir, "alone", seed, keep_checkpoint=True)


def continue_method(
    settings: Settings,
    out_dir: str,
    cache_dir: str | None,
    method: str,
    seed: int,
    scorers: dict[str, str],
) -> dict[str, Any]:
    """Train the seed's supervised student ``settings.steps`` more steps by ``method``; measure it.

    ``scorers``: the checkpoints of ``"teacher"`` (the one distilled from) and ``"judge"`` (another
    teacher, trained from another seed), each scoring the student's samples.
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    name = f"seed{seed}-{method}"
    record_path = Path(out_dir) / "records" / f"{name}.json"
    start = warm_start(settings, out_dir, cache_dir, seed)
    start_student = load_weights(gpt2(settings, settings.student_shape), start["checkpoint"])
    start_weights = weights_fingerprint(start_student)
    if record_path.is_file():  # reused only if made with these settings, scorers and start
        record = json.loads(record_path.read_text())
        if (
            same_settings(record, settings)
            and record.get("scorers") == scorers
            and record["start_weights"] == start_weights
        ):
            return record
    if method in ("start", "ce"):
        pl.seed_everything(seed, verbose=False)  # as build() does: the same batches as the other methods
        module = CausalLMDistillationModule(
            gpt2(settings, settings.student_shape),
            losses=[TokenCrossEntropyTerm("ce")],
            **optimization(settings),
        )
        data = prompts_data(settings, cache_dir)
    else:
        module, data, _ = build(method, settings, out_dir, cache_dir, seed, {"same": scorers["teacher"]})
    module.student.load_state_dict(start_student.state_dict())
    clock = GenerationClock()
    trainer = method_trainer(settings, clock)
    data.setup("fit")
    cpu = time.process_time()
    if method != "start":
        trainer.fit(module, datamodule=data)
    cpu = time.process_time() - cpu
    tested = trainer.test(module, dataloaders=data.test_dataloader(), verbose=False)[0]
    models = {
        role: load_weights(gpt2(settings, settings.teacher_shape), path) for role, path in scorers.items()
    }
    pad_id = data.tokenizer.pad_token_id
    record = {
        "name": name,
        "kind": method,
        "seed": seed,
        "steps": trainer.global_step,
        "cpu_s": cpu,
        "generation_s": clock.seconds,
        "test_perplexity": tested["test/perplexity"],
        "start_test_perplexity": start["test_perplexity"],
        "start_weights": start_weights,
        **sample_measures(module.student, models, settings, data.datasets["test"], pad_id, seed),
        "scorers": scorers,
        "settings": dataclasses.asdict(settings),
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    print(f"{name}: test perplexity {record['test_perplexity']:.2f}, {cpu / 60:.1f} CPU-min", flush=True)
    return record


def references(
    settings: Settings, cache_dir: str | None, scorers: dict[str, str], seeds: Sequence[int]
) -> list[str]:
    """Rows of the real continuations and of the teacher's own samples (one per seed), for scale."""
    data = text_data(settings, cache_dir)
    test, pad_id = data.datasets["test"], data.tokenizer.pad_token_id
    models = {
        role: load_weights(gpt2(settings, settings.teacher_shape), path) for role, path in scorers.items()
    }
    real = sample_measures(None, models, settings, test, pad_id, None)
    own = [sample_measures(models["teacher"], models, settings, test, pad_id, seed) for seed in seeds]

    def ppl(runs: Sequence[dict[str, float]], key: str) -> str:
        return mean_std([math.exp(run[key]) for run in runs])

    real_row = f"| {ppl([real], 'teacher_nll')} | | {ppl([real], 'judge_nll')} | | |"
    own_row = f"| {ppl(own, 'teacher_nll')} | | {ppl(own, 'judge_nll')} | | {ppl(own, 'own_nll')} |"
    return [
        f"| the real test continuations | | | {real_row} {real['repeated_4grams']:.3f} | |",
        f"| the teacher's own samples | {len(own)} | | {own_row} "
        f"{statistics.mean(m['repeated_4grams'] for m in own):.3f} | |",
    ]


def _with_gain(
    runs: dict[int, dict[str, Any]],
    ce: dict[int, dict[str, Any]],
    done: Sequence[int],
    paired: Sequence[int],
    key: str,
    scale: Any,
) -> str:
    """``mean ± sd | paired gain over ce`` of ``scale(record[key])`` (the gain blank without pairs)."""
    gain = mean_std([scale(ce[s][key]) - scale(runs[s][key]) for s in paired], "+") if paired else ""
    return f"{mean_std([scale(runs[s][key]) for s in done])} | {gain}"


def table(
    records: dict[str, dict[int, dict[str, Any]]], seeds: Sequence[int], settings: Settings
) -> list[str]:
    """Per method, mean ± sd over seeds: each measure and its gain over ``ce`` (paired by seed)."""
    lines = [
        "| run | seeds | test perplexity | its gain over CE | teacher's perplexity of the samples | its gain "
        "| judge's perplexity of the samples | its gain | student's perplexity of its samples "
        "| repeated 4-grams | CPU s / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ce = records.get("ce", {})
    for method, template in METHODS.items():
        label = template.format(steps=settings.steps)
        runs = records.get(method, {})
        done = [s for s in seeds if s in runs]
        if not done:
            lines.append(f"| {label} | 0 | not run | | | | | | | | |")
            continue
        unpaired = [s for s in done if s in ce and ce[s]["start_weights"] != runs[s]["start_weights"]]
        if unpaired:
            raise ValueError(f"{method} and ce start from other student weights at seeds {unpaired}")
        paired = [s for s in done if s in ce and method != "ce"]
        test, teacher, judge = (
            _with_gain(runs, ce, done, paired, key, scale)
            for key, scale in (("test_perplexity", float), ("teacher_nll", math.exp), ("judge_nll", math.exp))
        )
        steps = [runs[s]["cpu_s"] / runs[s]["steps"] for s in done if runs[s]["steps"]]
        own = mean_std([math.exp(runs[s]["own_nll"]) for s in done])
        lines.append(
            f"| {label} | {len(done)} | {test} | {teacher} | {judge} | {own} | "
            f"{statistics.mean(runs[s]['repeated_4grams'] for s in done):.3f} | "
            f"{f'{statistics.mean(steps):.3f}' if steps else ''} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 steps, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--teacher", default=None, help="lm_distillation.py's teacher (trained if not given)")
    parser.add_argument(
        "--judge", default=None, help="another teacher that scores the samples (trained here if not given)"
    )
    parser.add_argument("--processes", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--out-dir", default="runs/lm_warm_on_policy")
    parser.add_argument(
        "--cache-dir", default=None, help="the tokenizer cache (default ~/.cache/lightning_kd)"
    )
    parser.add_argument(
        "--results", default=None, help=f"write the table here (default {RESULTS}; --quick: none)"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out_dir)
    teacher = (
        args.teacher or train_run(settings, str(out / "teacher"), args.cache_dir, "teacher", 0)["checkpoint"]
    )
    judge = (
        args.judge
        or train_run(settings, str(out / "judge"), args.cache_dir, "teacher", JUDGE_SEED)["checkpoint"]
    )
    scorers = {"teacher": str(Path(teacher).resolve()), "judge": str(Path(judge).resolve())}
    for seed in seeds:  # the starts first: the parallel runs share them
        warm_start(settings, str(out), args.cache_dir, seed)
    jobs = [(settings, str(out), args.cache_dir, m, s, scorers) for s in seeds for m in args.methods]
    done = run_jobs(continue_method, jobs, args.processes)
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for record in done:
        records.setdefault(record["kind"], {})[record["seed"]] = record
    starts = records.get("start", {})
    start_ppl = (
        mean_std([starts[s]["test_perplexity"] for s in seeds if s in starts]) if starts else "not run"
    )
    text = "\n".join(
        [
            "#### Measured: from the supervised student, more steps by each method",
            "",
            f"Seeds {', '.join(map(str, seeds))}. Each seed's start is its student alone "
            f"({settings.steps} CE steps, test perplexity {start_ppl}); each run trains it "
            f"{settings.steps} more steps. Student "
            f"{settings.student_shape}, teacher {settings.teacher_shape} (layers, width, heads), "
            f"V = {settings.vocab_size}; samples: {SAMPLE_PROMPTS} test prompts of {prompt_length(settings)} "
            f"tokens, {new_tokens(settings)} new tokens at T = 1; {args.processes} run(s) in parallel, "
            "one thread each.",
            "",
            *table(records, seeds, settings),
            *references(settings, args.cache_dir, scorers, seeds),
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
