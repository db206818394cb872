"""The ``lightning-kd`` command: LightningCLI over the package's training modules and any datamodule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

__all__ = ["DistillationCLI", "main"]


class DistillationCLI(LightningCLI):
    """LightningCLI over any LightningModule and any datamodule.

    The model is :class:`~lightning_kd.DistillationModule` (or a subclass),
    :class:`~lightning_kd.MutualLearningModule`, or any other LightningModule; model and data
    are chosen with ``class_path`` / ``init_args``; the optimizer and scheduler are the
    model's ``optimizer`` / ``lr_scheduler`` arguments. Other ``LightningCLI`` arguments
    (``args``, ``run``, ...) pass through.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            **kwargs,
        )


def main(args: ArgsType = None) -> None:
    """Run ``lightning-kd {fit,validate,test,predict} --config recipe.yaml``."""
    DistillationCLI(args=args)


if __name__ == "__main__":
    main()
