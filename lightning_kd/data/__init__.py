"""Datamodules: data that ships inside packages (no download), and CIFAR-100 from local files."""

from lightning_kd.data.bpe import trained_bpe_tokenizer
from lightning_kd.data.cifar100 import CIFAR100DataModule
from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.latent_noise import LatentNoiseDataModule
from lightning_kd.data.mnist1d import MNIST1DDataModule, generate_mnist1d
from lightning_kd.data.mnist_digits import MNISTDigitsDataModule
from lightning_kd.data.mnist_privileged import MNISTPrivilegedDataModule
from lightning_kd.data.python_docs import Document, document_split, python_docs_corpus
from lightning_kd.data.sentences import DocstringSentencesDataModule
from lightning_kd.data.splits import SplitsDataModule
from lightning_kd.data.text import PythonDocsText, TokenBlocks
from lightning_kd.data.unlabelled import InputsOnly, UnlabelledDataModule

__all__ = [
    "CIFAR100DataModule",
    "DocstringSentencesDataModule",
    "Document",
    "InputsOnly",
    "LatentNoiseDataModule",
    "MNIST1DDataModule",
    "MNISTDigitsDataModule",
    "MNISTPrivilegedDataModule",
    "PythonDocsText",
    "SplitsDataModule",
    "TokenBlocks",
    "UnlabelledDataModule",
    "WithIndex",
    "document_split",
    "generate_mnist1d",
    "python_docs_corpus",
    "trained_bpe_tokenizer",
]
