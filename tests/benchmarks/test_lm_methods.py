"""benchmarks/lm_methods.py: a --quick run trains each kind of method from one student start, paired."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_methods.py"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports lm_distillation beside it
    spec = importlib.util.spec_from_file_location("lm_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_quick_run_pairs_each_method_with_the_student_alone_and_sizes_the_teachers_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    methods = ["gkd_1", "seqkd", "store_8", "uld_ce", "uld"]
    args = ["--quick", "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    text = script.main([*args, "--methods", *methods])
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs/records").glob("*.json")}
    assert set(records) == {f"seed0-{m}" for m in methods}
    alone = json.loads((tmp_path / "runs/lm_distillation/records/seed0-alone.json").read_text())
    for record in records.values():  # every method starts from the seed's student weights
        assert record["start_weights"] == alone["start_weights"] and record["steps"] == 3
    assert records["seed0-gkd_1"]["generation_s"] > 0  # every batch on-policy: generation was timed
    assert records["seed0-seqkd"]["generation_s"] == 0
    # the store's bytes per token: its files over its tokens; the completions' shards over their tokens
    store = tmp_path / "runs/store-k8"
    files = sum(p.stat().st_size for p in store.iterdir())
    assert records["seed0-store_8"]["bytes_per_token"] == pytest.approx(
        files / script.TopKTokenStore(store).positions
    )
    shards = sorted((tmp_path / "runs/seqkd_completions").glob("batch-*.pt"))
    tokens = sum(len(row) for shard in shards for row in torch.load(shard)["completions"])
    assert tokens > 0
    assert records["seed0-seqkd"]["bytes_per_token"] == pytest.approx(
        sum(shard.stat().st_size for shard in shards) / tokens
    )
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in text.splitlines()
        if line.startswith("| ")
    }
    gain = alone["test_perplexity"] - records["seed0-gkd_1"]["test_perplexity"]
    assert (
        rows["on-policy, lmbda 1"][2].strip() == f"{gain:+.2f}"
        and rows["on-policy, lmbda 1"][0].strip() == "1"
    )
    uld_gain = records["seed0-uld_ce"]["test_perplexity"] - records["seed0-uld"]["test_perplexity"]
    assert rows["ULD, teacher of another tokenizer (CE + ULD)"][2].strip() == f"{uld_gain:+.2f}"
    assert rows["on-policy, lmbda 0.5"][1].strip() == "not run"
    # the docs page includes the results under an h2 section: no h1 or h2 of its own
    assert not [line for line in text.splitlines() if line.startswith(("# ", "## "))]
    # --report tabulates the same records, training nothing
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    report = script.main([*args, "--methods", *methods, "--report"])
    assert [line for line in report.splitlines() if line.startswith("| ")] == [
        line for line in text.splitlines() if line.startswith("| ")
    ]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")} == stamps
    # a record whose student started elsewhere is not paired
    records["seed0-gkd_1"]["start_weights"] = "another"
    table = {"alone": {0: alone}, "gkd_1": {0: records["seed0-gkd_1"]}}
    with pytest.raises(ValueError, match="start from other student weights at seeds \\[0\\]"):
        script.table(table, [0])
