"""Every method recipe in configs/mnist1d/methods fits a few steps from YAML, on top of kd.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_kd.cli import main
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import TINY_MNIST1D_FIT

CONFIGS = RECIPES_DIR / "mnist1d"


METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))


SMALL = TINY_MNIST1D_FIT


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose runs/ holds a (briefly) trained teacher."""
    root = tmp_path_factory.mktemp("methods")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *SMALL])
    return root


def test_every_method_has_a_recipe() -> None:
    expected = {"dkd", "dist", "kd_standardized", "fitnet", "sp", "rkd", "pkt", "cc", "at", "nst", "fsp"}
    expected |= {"dkd_standardized", "mlkd", "mlkd_standardized", "ctkd"}
    assert expected <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_recipe_fits(method: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "kd.yaml"),
            "--config",
            str(CONFIGS / "methods" / f"{method}.yaml"),
            *SMALL,
        ]
    )
    checkpoint = torch.load(workdir / f"runs/mnist1d/{method}/latest.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    metrics = (workdir / f"runs/mnist1d/{method}/version_0/metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    term_columns = [c for c in header if c.startswith("train/loss_") and c != "train/loss_ce"]
    assert term_columns, header  # the method's own term was logged
    for row in metrics[1:]:
        values = dict(zip(header, row.split(","), strict=True))
        for column in term_columns:
            if values[column]:
                assert torch.isfinite(torch.tensor(float(values[column])))
