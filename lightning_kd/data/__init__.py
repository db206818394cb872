"""Datamodules: data that ships inside packages (no download), and CIFAR-100 from local files."""

from lightning_kd.data.bpe import trained_bpe_tokenizer
from lightning_kd.data.cifar100 import CIFAR100DataModule
from lightning_kd.data.cross_tokenizer_text import PythonDocsCrossTokenizerText
from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.latent_noise import LatentNoiseDataModule
from lightning_kd.data.mnist1d import MNIST1DDataModule, generate_mnist1d
from lightning_kd.data.mnist_digits import MNISTDigitsDataModule
from lightning_kd.data.mnist_privileged import MNISTPrivilegedDataModule
from lightning_kd.data.prompts import PromptCollator, PythonDocsPrompts
from lightning_kd.data.python_docs import Document, document_split, python_docs_corpus
from lightning_kd.data.replayable import (
    BrightnessContrast,
    HorizontalFlip,
    PaddedCrop,
    RandomResizedCrop,
    ReplayableAugmentation,
    SignalNoise,
    SignalScale,
    SignalShift,
)
from lightning_kd.data.replayed_views import ReplayedViews, ReplayedViewsDataModule, ViewSampler
from lightning_kd.data.sentences import DocstringSentencesDataModule
from lightning_kd.data.splits import SplitsDataModule
from lightning_kd.data.text import PythonDocsText, TokenBlocks
from lightning_kd.data.two_views import (
    CIFAR100TwoViewDataModule,
    MNIST1DTwoViewDataModule,
    TwoViewBatch,
    TwoViews,
    collate_two_views,
)
from lightning_kd.data.unlabelled import InputsOnly, UnlabelledDataModule

__all__ = [
    "ViewSampler",
    "SignalShift",
    "SignalScale",
    "SignalNoise",
    "ReplayedViewsDataModule",
    "ReplayedViews",
    "ReplayableAugmentation",
    "RandomResizedCrop",
    "PaddedCrop",
    "HorizontalFlip",
    "BrightnessContrast",
    "CIFAR100DataModule",
    "CIFAR100TwoViewDataModule",
    "DocstringSentencesDataModule",
    "Document",
    "InputsOnly",
    "LatentNoiseDataModule",
    "MNIST1DDataModule",
    "MNIST1DTwoViewDataModule",
    "MNISTDigitsDataModule",
    "MNISTPrivilegedDataModule",
    "PythonDocsCrossTokenizerText",
    "PromptCollator",
    "PythonDocsPrompts",
    "PythonDocsText",
    "SplitsDataModule",
    "TokenBlocks",
    "TwoViewBatch",
    "TwoViews",
    "UnlabelledDataModule",
    "WithIndex",
    "collate_two_views",
    "document_split",
    "generate_mnist1d",
    "python_docs_corpus",
    "trained_bpe_tokenizer",
]
