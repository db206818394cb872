"""benchmarks/lm_loss_memory.py: a --quick run measures every path, the losses agree, nothing is written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_loss_memory.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_loss_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # it imports memory.py beside it, as a run of the script does
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_quick_run_measures_every_path_and_their_losses_agree(tmp_path: Path) -> None:
    out = tmp_path / "lm_loss_memory.md"
    text = load_script().main(["--quick", "--out", str(out)])
    assert not out.exists()
    rows = [
        line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line
    ]
    cells = {(row[0].strip(), row[1].strip()): [c.strip() for c in row[2:]] for row in rows[1:]}
    assert set(cells) == {
        (p, d) for p in ("plain", "chunked", "fused", "liger") for d in ("forward_kl", "jsd")
    }
    for divergence in ("forward_kl", "jsd"):
        plain = float(cells[("plain", divergence)][4])
        assert plain > 0
        for path in ("chunked", "fused", "liger"):
            row = cells[(path, divergence)]
            if path == "liger" and row[0].startswith("left out"):  # where liger_kernel is not installed
                assert "liger_kernel does not import here" in row[0]
                continue
            assert float(row[4]) == pytest.approx(plain, rel=1e-5)
