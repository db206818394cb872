"""Datamodules for data that ships inside packages (no download)."""

from lightning_kd.data.mnist1d import MNIST1DDataModule, generate_mnist1d

__all__ = ["MNIST1DDataModule", "generate_mnist1d"]
