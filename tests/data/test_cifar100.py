"""CIFAR100DataModule on a tiny fake dataset in torchvision's on-disk format (no network)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR100

from lightning_kd.data import CIFAR100DataModule
from lightning_kd.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD

N_TRAIN, N_TEST = 10, 6
# every test image has one constant value per channel, so its normalised value is known
TEST_COLOURS = np.array([[0, 128, 255], [255, 0, 64], [10, 20, 30], [200, 100, 50], [1, 2, 3], [90, 80, 70]])


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_fake_cifar100(root: Path) -> dict[str, str]:
    """Write ``root/cifar-100-python/{train,test,meta}`` as torchvision reads them; return their MD5s."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(N_TRAIN, 3 * 32 * 32), dtype=np.uint8)
    test = np.repeat(TEST_COLOURS.astype(np.uint8), 32 * 32, axis=1)  # (N, 3072): R plane, G, B
    splits = {
        "train": (train, [i % 100 for i in range(N_TRAIN)]),
        "test": (test, [99 - i for i in range(N_TEST)]),
    }
    for name, (data, labels) in splits.items():
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name} batch",
            "fine_labels": labels,
            "coarse_labels": [label // 5 for label in labels],
            "data": data,
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [f"class_{i}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return {name: _md5(folder / name) for name in ("train", "test", "meta")}


@pytest.fixture
def fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake dataset under ``tmp_path/data``, with torchvision's expected MD5s set to the fake files'."""
    root = tmp_path / "data"
    md5 = _write_fake_cifar100(root)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    return root


def test_setup_and_batches(fake_cifar100: Path) -> None:
    dm = CIFAR100DataModule(data_dir=fake_cifar100, batch_size=4, num_workers=0)
    assert dm.num_classes == 100
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == N_TRAIN
    assert len(dm.datasets["val"]) == N_TEST  # validation = the test split, as in the benchmark

    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.long
    assert ((labels >= 0) & (labels < 100)).all()

    images, labels = next(iter(dm.val_dataloader()))
    assert labels.tolist() == [99, 98, 97, 96]
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    expected = (torch.tensor(TEST_COLOURS[:4], dtype=torch.float32).view(4, 3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(images, expected.expand(4, 3, 32, 32))

    test_images, test_labels = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(test_images, images)
    assert test_labels.tolist() == labels.tolist()


def test_augmentation_switch(fake_cifar100: Path) -> None:
    plain = CIFAR100DataModule(data_dir=fake_cifar100, num_workers=0, augment=False)
    plain.setup()
    image, _ = plain.datasets["train"][0]
    reference, _ = CIFAR100(str(fake_cifar100), train=True, transform=plain.test_transform())[0]
    torch.testing.assert_close(image, reference)  # no augmentation: the test preprocessing

    augmented = CIFAR100DataModule(data_dir=fake_cifar100, num_workers=0, augment=True)
    names = [type(t).__name__ for t in augmented.train_transform().transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert augmented.train_transform().transforms[0].padding == 4


def test_missing_files_error(tmp_path: Path) -> None:
    dm = CIFAR100DataModule(data_dir=tmp_path / "nowhere", num_workers=0)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match="download=True") as info:
            step()
        assert "cifar-100-python" in str(info.value)
        assert str(tmp_path / "nowhere") in str(info.value)


def test_download_only_when_asked(
    fake_cifar100: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_download(self: CIFAR100) -> None:  # stands in for the network download
        calls.append(self.root)
        if not (Path(self.root) / "cifar-100-python").exists():
            _write_fake_files_like(fake_cifar100, Path(self.root))

    monkeypatch.setattr(CIFAR100, "download", fake_download)

    # files present: nothing is downloaded even with download=True
    CIFAR100DataModule(data_dir=fake_cifar100, download=True, num_workers=0).prepare_data()
    assert calls == []

    # files missing, download=True: torchvision's download is called, then the data loads
    target = tmp_path / "fresh"
    dm = CIFAR100DataModule(data_dir=target, download=True, num_workers=0)
    dm.prepare_data()
    assert calls and all(Path(root) == target for root in calls)
    dm.setup()
    assert len(dm.datasets["train"]) == N_TRAIN


def _write_fake_files_like(source: Path, root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes((source / "cifar-100-python" / name).read_bytes())
