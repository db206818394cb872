"""benchmarks/step_overhead.py: its --quick smoke run times every asked variant and writes nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_overhead.py"
VARIANTS = ["hand", "torchdistill", "bare+log1", "ours", "ours+cache", "hand_mutual", "mutual"]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_overhead"] = module  # dataclasses look their module up by name
    sys.path.insert(0, str(SCRIPT.parent))  # it imports step_loops.py beside it, as a run of the script does
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["step_overhead"]
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_quick_run_times_every_variant_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "step_overhead.md"
    text = load_script().main(
        [
            "--quick",
            "--workload",
            "small",
            "--logger",
            "none",
            "--variants",
            ",".join(VARIANTS),
            "--out",
            str(out),
        ]
    )
    assert not out.exists()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert set(VARIANTS) <= set(rows)
    for name in ("hand", "hand_mutual"):  # each baseline's own ratios are exactly 1
        assert [cell.strip() for cell in rows[name][2:4]] == ["1.00", "1.00"]
    for name in set(VARIANTS) - {"torchdistill"}:
        assert float(rows[name][1]) > 0  # CPU ms per step
    # torchdistill is timed where it is installed, else named as left out with the reason
    assert "left out" in rows["torchdistill"][0] or float(rows["torchdistill"][1]) > 0
