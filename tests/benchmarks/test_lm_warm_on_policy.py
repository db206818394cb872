"""benchmarks/lm_warm_on_policy.py: every method continues the seed's supervised student; the measures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_warm_on_policy.py"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports lm_distillation and lm_methods beside it
    spec = importlib.util.spec_from_file_location("lm_warm_on_policy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_repeated_ngrams_counts_each_rows_repeats_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    labels = torch.tensor(
        [
            [-100, 1, 2, 3, 4, 1, 2, 3, 4],  # 4-grams 1234 2341 3412 4123 1234: one repeat of five
            [-100, -100, 5, 6, 7, 8, 1, 2, 3],  # 5678 6781 7812 8123: none (1234 is the other row's)
        ]
    )
    assert script.repeated_ngrams(labels, 4) == pytest.approx(1 / 9)
    assert script.repeated_ngrams(torch.tensor([[-100, 7, 7]]), 4) == 0.0  # no 4-gram at all


def test_quick_run_continues_each_seeds_student_alone_and_pairs_against_ce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    out = tmp_path / "runs"
    text = script.main(["--quick", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert set(records) == {f"seed0-{m}" for m in script.METHODS}
    start = json.loads((out / "start/records/seed0-alone.json").read_text())
    student = script.load_weights(script.gpt2(script.QUICK, script.QUICK.student_shape), start["checkpoint"])
    fingerprint = script.weights_fingerprint(student)
    for name, record in records.items():  # every run starts from the student alone's trained weights
        assert record["start_weights"] == fingerprint, name
        assert record["steps"] == (0 if name.endswith("-start") else script.QUICK.steps)
    assert records["seed0-start"]["test_perplexity"] == pytest.approx(start["test_perplexity"])
    assert records["seed0-gkd_1"]["generation_s"] > 0 and records["seed0-gkd_0"]["generation_s"] == 0
    for record in records.values():  # both scorers and the student itself scored the samples
        assert {"teacher_nll", "judge_nll", "own_nll"} <= set(record) and record["teacher_nll"] != record[
            "judge_nll"
        ]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line[:2] == "| "
    }
    ce, gkd = records["seed0-ce"], records["seed0-gkd_0.5"]
    row = rows[script.METHODS["gkd_0.5"].format(steps=script.QUICK.steps)]
    assert row[2].strip() == f"{ce['test_perplexity'] - gkd['test_perplexity']:+.2f}"
    assert row[4].strip() == f"{math.exp(ce['teacher_nll']) - math.exp(gkd['teacher_nll']):+.2f}"
    assert row[6].strip() == f"{math.exp(ce['judge_nll']) - math.exp(gkd['judge_nll']):+.2f}"
    assert "the real test continuations" in rows and "the teacher's own samples" in rows


def test_the_table_pairs_each_seed_with_its_own_ce_run_and_refuses_other_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = load_script(monkeypatch)

    def record(seed: int, perplexity: float, start: str = "same") -> dict:
        measures = {"teacher_nll": 1.0, "judge_nll": 2.0, "own_nll": 1.5, "repeated_4grams": 0.0}
        return {
            "test_perplexity": perplexity,
            "cpu_s": 1.0,
            "steps": 1,
            "start_weights": f"{start}{seed}",
            **measures,
        }

    # per seed 10, 20, 30 below CE: paired gains 20 ± 10, while the unpaired spread is 90
    ce = {0: record(0, 100.0), 1: record(1, 200.0), 2: record(2, 300.0)}
    kd = {0: record(0, 90.0), 1: record(1, 180.0), 2: record(2, 270.0)}
    lines = script.table({"ce": ce, "gkd_0": kd}, [0, 1, 2], script.QUICK)
    row = next(line for line in lines if "supervised KD" in line).split("|")
    assert row[3].strip() == "180.00 ± 90.00" and row[4].strip() == "+20.00 ± 10.00"
    assert row[6].strip() == "+0.00 ± 0.00"  # same teacher NLL everywhere: no gain
    kd[1] = record(1, 180.0, start="other")
    with pytest.raises(ValueError, match=r"gkd_0 and ce start from other student weights at seeds \[1\]"):
        script.table({"ce": ce, "gkd_0": kd}, [0, 1, 2], script.QUICK)


def _nll_by_hand(model: torch.nn.Module, rows: list[torch.Tensor], starts: list[int]) -> float:
    """float64 mean NLL of every row's tokens from ``starts[i]`` on, one unpadded row at a time."""
    nll, count = 0.0, 0
    for ids, first in zip(rows, starts, strict=True):
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].double()
        nll -= logits[first - 1 : -1].log_softmax(-1).gather(1, ids[first:, None]).sum().item()
        count += len(ids) - first
    return nll / count


def test_the_samples_are_drawn_from_the_seed_and_scored_against_a_float64_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    settings = script.QUICK
    torch.manual_seed(0)
    student = script.gpt2(settings, settings.student_shape)
    teacher = script.gpt2(settings, settings.teacher_shape)
    other = script.gpt2(settings, settings.teacher_shape)
    data = script.text_data(settings, str(tmp_path / "cache"))
    test, pad = data.datasets["test"], data.tokenizer.pad_token_id
    scorers = {"teacher": teacher, "judge": other}
    first = script.sample_measures(student, scorers, settings, test, pad, seed=3)
    assert script.sample_measures(student, scorers, settings, test, pad, seed=3) == first
    assert script.sample_measures(student, scorers, settings, test, pad, seed=4) != first
    assert first["teacher_nll"] != first["judge_nll"]
    # by hand: each sample is its test prompt, then generated tokens up to the first end-of-sequence
    n = min(script.SAMPLE_PROMPTS, len(test))
    reals = [test[i]["input_ids"][test[i]["attention_mask"].bool()] for i in range(n)]
    cuts = [min(script.prompt_length(settings), len(ids) - 1) for ids in reals]  # PromptCollator's cut
    batch = script.sampled_batch(student, settings, test, pad, seed=3)
    rows = [row[mask.bool()] for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    starts = [int((labels != -100).nonzero()[0]) for labels in batch["labels"]]
    assert starts == cuts and [row[:cut].tolist() for row, cut in zip(rows, cuts, strict=True)] == [
        ids[:cut].tolist() for ids, cut in zip(reals, cuts, strict=True)
    ]
    eos = script.end_of_sequence_id(student)
    for row, cut in zip(rows, cuts, strict=True):
        ends = (row[cut:] == eos).nonzero()
        assert len(ends) <= 1 and (len(ends) == 0 or int(ends[0]) == len(row) - cut - 1)  # EOS ends a row
        assert len(row) - cut <= script.new_tokens(settings)
    assert first["teacher_nll"] == pytest.approx(_nll_by_hand(teacher, rows, starts), rel=1e-5)
    assert first["judge_nll"] == pytest.approx(_nll_by_hand(other, rows, starts), rel=1e-5)
    assert first["own_nll"] == pytest.approx(_nll_by_hand(student, rows, starts), rel=1e-5)
    # the real continuations: the teacher's NLL of every token after the prompt
    real = script.sample_measures(None, {"teacher": teacher}, settings, test, pad, seed=None)
    assert real["teacher_nll"] == pytest.approx(_nll_by_hand(teacher, reals, cuts), rel=1e-5)
