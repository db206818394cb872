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
    # the samples were scored by the teacher: a perplexity above 1 and below the vocabulary's uniform
    for record in records.values():
        assert 1 < math.exp(record["teacher_nll"]) < 10 * script.QUICK.vocab_size
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line[:2] == "| "
    }
    ce, gkd = records["seed0-ce"], records["seed0-gkd_0.5"]
    row = rows[script.METHODS["gkd_0.5"].format(steps=script.QUICK.steps)]
    assert row[2].strip() == f"{ce['test_perplexity'] - gkd['test_perplexity']:+.2f}"
    assert row[5].strip() == f"{math.exp(ce['teacher_nll']) - math.exp(gkd['teacher_nll']):+.2f}"
    assert "the real test continuations" in rows and "the teacher's own samples" in rows


def test_the_samples_are_drawn_from_the_seed_and_scored_against_a_float64_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    settings = script.QUICK
    torch.manual_seed(0)
    student = script.gpt2(settings, settings.student_shape)
    teacher = script.gpt2(settings, settings.teacher_shape)
    test = script.text_data(settings, str(tmp_path / "cache")).datasets["test"]
    first = script.sample_measures(student, teacher, settings, test, seed=3)
    assert script.sample_measures(student, teacher, settings, test, seed=3) == first
    assert script.sample_measures(student, teacher, settings, test, seed=4) != first
    # the real continuations: the teacher's NLL of every token after the prompt, by hand in float64
    real = script.sample_measures(None, teacher, settings, test, seed=None)
    nll, count = 0.0, 0
    for i in range(min(script.SAMPLE_PROMPTS, len(test))):
        row = test[i]
        ids = row["input_ids"][row["attention_mask"].bool()]
        prompt = min(script.prompt_length(settings), len(ids) - 1)  # PromptCollator's cut
        with torch.no_grad():
            logits = teacher(input_ids=ids[None]).logits[0].double()
        targets = ids[prompt:]
        nll -= logits[prompt - 1 : -1].log_softmax(-1).gather(1, targets[:, None]).sum().item()
        count += len(targets)
    assert real["teacher_nll"] == pytest.approx(nll / count, rel=1e-5)
