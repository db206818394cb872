"""Report plumbing: figures are saved as PNG and sent to image loggers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from lightning_kd.callbacks.report.io import save_and_log_figure
from tests.helpers import PNG


def test_figures_are_saved_and_sent_to_image_loggers(tmp_path: Path) -> None:
    wandb, tensorboard = MagicMock(spec=WandbLogger), MagicMock(spec=TensorBoardLogger)
    trainer = SimpleNamespace(loggers=[wandb, tensorboard, CSVLogger(tmp_path)], global_step=7)
    figure = Figure()
    figure.add_subplot().plot([0, 1])
    path = save_and_log_figure(trainer, figure, tmp_path / "plots", "cka", "report/cka")
    assert path == tmp_path / "plots" / "cka.png" and path.read_bytes()[:8] == PNG
    wandb.log_image.assert_called_once_with(key="report/cka", images=[str(path)])
    tensorboard.experiment.add_figure.assert_called_once_with("report/cka", figure, global_step=7)
