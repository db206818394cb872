"""CIFAR-100 with the CRD benchmark's preprocessing, read from local files (download on request)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.splits import SplitsDataModule

if TYPE_CHECKING:
    from torchvision import transforms as T

__all__ = ["CIFAR100DataModule", "CIFAR100_MEAN", "CIFAR100_STD"]

#: per-channel mean and std of the CIFAR-100 training images (as used by the CRD benchmark).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

#: what torchvision's ``CIFAR100`` reads under ``<data_dir>/cifar-100-python``.
_FOLDER = "cifar-100-python"
_FILES = ("train", "test", "meta")
_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class CIFAR100DataModule(SplitsDataModule):
    """CIFAR-100 (50,000 training and 10,000 test images of 32x32, 100 classes) via torchvision.

    Preprocessing follows the CRD benchmark (HobbitLong/RepDistiller, ``dataset/cifar100.py``):
    training images get ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()`` (when
    ``augment``), then every split ``ToTensor()`` and ``Normalize`` with
    :data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`.

    Splits: ``train`` is the 50k training set; as in the benchmark there is no held-out
    validation set, so **the validation loader serves the 10k test split** (the benchmark
    reports the test accuracy of every epoch, and its "best" accuracy is selected on the test
    set). ``test_dataloader`` serves the same test split.

    Nothing is downloaded unless ``download=True``: the files are read from
    ``<data_dir>/cifar-100-python/{train,test,meta}`` (the extracted
    ``cifar-100-python.tar.gz``), and :meth:`prepare_data` / :meth:`setup` raise
    :class:`FileNotFoundError` when they are missing.

    Args:
        data_dir: folder holding (or receiving) ``cifar-100-python``.
        batch_size: batch size of every loader (64 in the benchmark).
        num_workers: dataloader workers.
        download: download and extract the archive in :meth:`prepare_data` if the files are
            missing (needs network access; torchvision checks the MD5 sums).
        augment: random crop + flip on the training split; without it, training images get
            the test preprocessing.
        return_index: training batches are ``(images, labels, sample_index)`` (for CRD's memory
            bank, :class:`~lightning_kd.data.WithIndex`).
    """

    num_classes = 100
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str | Path = "data/cifar100",
        batch_size: int = 64,
        num_workers: int = 2,
        download: bool = False,
        augment: bool = True,
        return_index: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.return_index = return_index
        self.data_dir = Path(data_dir)
        self.download = download
        self.augment = augment

    @property
    def dataset_folder(self) -> Path:
        """``<data_dir>/cifar-100-python``, where torchvision reads the files."""
        return self.data_dir / _FOLDER

    def _missing_files(self) -> list[str]:
        return [name for name in _FILES if not (self.dataset_folder / name).is_file()]

    def _require_files(self) -> None:
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-100 not found: {missing} missing in {str(self.dataset_folder)!r}. "
                f"Pass download=True (needs network access) to download it into {str(self.data_dir)!r}, "
                f"or place the extracted `{_FOLDER}` folder of {_URL} (files {list(_FILES)}) there, "
                f"or point data_dir at the folder that contains `{_FOLDER}`."
            )

    def prepare_data(self) -> None:
        """Download the dataset if ``download=True`` and it is missing; otherwise check the files exist.

        Raises:
            FileNotFoundError: files missing and ``download=False``.
        """
        if self.download and self._missing_files():
            from torchvision.datasets import CIFAR100

            for train in (True, False):
                CIFAR100(str(self.data_dir), train=train, download=True)
        self._require_files()

    def train_transform(self) -> T.Compose:
        """Preprocessing of training images (augmentation when ``augment``)."""
        from torchvision import transforms as T

        augmentation = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose([*augmentation, T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    @staticmethod
    def test_transform() -> T.Compose:
        """Preprocessing of test images: tensor, per-channel normalisation."""
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def setup(self, stage: str | None = None) -> None:
        """Load both splits from disk (once).

        Raises:
            FileNotFoundError: the files are missing (see :meth:`prepare_data`).
            RuntimeError: torchvision found the files corrupted (MD5 mismatch).
        """
        if self.datasets:
            return
        from torchvision.datasets import CIFAR100

        self._require_files()
        root = str(self.data_dir)
        train = CIFAR100(root, train=True, transform=self.train_transform())
        test = CIFAR100(root, train=False, transform=self.test_transform())
        self.datasets = {"train": WithIndex(train) if self.return_index else train, "val": test, "test": test}
