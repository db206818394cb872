"""Datamodules: data that ships inside packages (no download), and CIFAR-100 from local files."""

from lightning_kd.data.cifar100 import CIFAR100DataModule
from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.latent_noise import LatentNoiseDataModule
from lightning_kd.data.mnist1d import MNIST1DDataModule, generate_mnist1d
from lightning_kd.data.mnist_privileged import MNISTPrivilegedDataModule
from lightning_kd.data.splits import SplitsDataModule

__all__ = [
    "CIFAR100DataModule",
    "LatentNoiseDataModule",
    "MNIST1DDataModule",
    "MNISTPrivilegedDataModule",
    "SplitsDataModule",
    "WithIndex",
    "generate_mnist1d",
]
