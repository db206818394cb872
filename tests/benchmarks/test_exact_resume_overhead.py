"""benchmarks/exact_resume_overhead.py: the pair differs only in ExactResume; a smoke run tabulates both."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lightning_kd.callbacks.exact_resume import ExactResume

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "exact_resume_overhead.py"


def test_the_pair_differs_in_exact_resume_alone_and_a_smoke_run_writes_no_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = importlib.util.spec_from_file_location("exact_resume_overhead", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    results = script.RESULTS.read_text() if script.RESULTS.exists() else None
    data = script.MNIST1DDataModule(train_samples=270, val_samples=30, test_samples=30, batch_size=128)
    data.setup("fit")
    for module_class, rebuilt in ((script.DistillationModule, True), (script.WithoutExactResume, False)):
        module = module_class(script.MLP(num_classes=10), script.ConvNet1d(num_classes=10))
        trainer = script.pl.Trainer(
            max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0
        )
        trainer.fit(module, datamodule=data)
        assert any(isinstance(c, ExactResume) for c in trainer.callbacks) is rebuilt
        # the plain Lightning loader without it, torchdata's StatefulDataLoader with it
        assert (type(trainer.train_dataloader) is not DataLoader) is rebuilt
    monkeypatch.setattr(script, "MNIST1DDataModule", lambda batch_size: data)
    text = script.main(["--repeats", "1", "--epochs", "1"])
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| w")]
    assert [row[0].strip() for row in rows] == ["with ExactResume (default)", "without"]
    assert rows[1][2].strip() == "1.000x" and float(rows[0][1]) > 0
    assert (
        script.RESULTS.read_text() if script.RESULTS.exists() else None
    ) == results  # a smoke run writes none
