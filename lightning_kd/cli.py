"""The ``lightning-kd`` command: LightningCLI over DistillationModule and any datamodule."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_kd.module import DistillationModule

__all__ = ["main"]


def main(args: ArgsType = None) -> None:
    """Run ``lightning-kd {fit,validate,test,predict} --config recipe.yaml``.

    The model is a :class:`~lightning_kd.DistillationModule` or a subclass, the data any
    ``LightningDataModule``, both chosen with ``class_path`` / ``init_args``; the optimizer
    and scheduler are the model's ``optimizer`` / ``lr_scheduler`` arguments.
    """
    LightningCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
