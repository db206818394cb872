"""The ``lightning-kd`` command: LightningCLI over DistillationModule and any datamodule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_kd.module import DistillationModule

__all__ = ["DistillationCLI", "main"]


class DistillationCLI(LightningCLI):
    """LightningCLI over :class:`~lightning_kd.DistillationModule` (or a subclass) and any datamodule.

    Both are chosen with ``class_path`` / ``init_args``; the optimizer and scheduler are the
    model's ``optimizer`` / ``lr_scheduler`` arguments. Other ``LightningCLI`` arguments
    (``args``, ``run``, ...) pass through.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            DistillationModule,
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
