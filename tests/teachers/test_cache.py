"""TeacherOutputCache: exact reuse, no teacher forward after epoch 1, top-k, fingerprints, restarts, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.data import WithIndex
from lightning_kd.losses import CrossEntropyTerm, FitNetTerm, KDTerm
from lightning_kd.teachers import TeacherOutputCache
from lightning_kd.teachers.cache import topk_logits
from lightning_kd.teachers.fingerprints import dataset_fingerprint, input_signature, teacher_fingerprint
from tests.helpers import RandomDataModule, make_trainer, small_net

DDP_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_cache.py"


class IndexedDataModule(RandomDataModule):
    """RandomDataModule whose training batches are ``(inputs, targets, index)``."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(WithIndex(self._dataset()), batch_size=self.batch_size, shuffle=True)


class NoisyDataset(Dataset):
    """Random augmentation: fresh Gaussian noise on every read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i], i


def teacher_calls(module: DistillationModule) -> list[int]:
    """The epoch of every training-time teacher forward (the probe in ``on_train_start`` is in epoch 0)."""
    epochs: list[int] = []
    module.teacher.register_forward_pre_hook(
        lambda *_: epochs.append(module.trainer.current_epoch) if module.training else None
    )
    return epochs


def fit(module: DistillationModule, epochs: int = 2, **kwargs) -> None:
    make_trainer(max_epochs=epochs, limit_val_batches=0, **kwargs).fit(module, datamodule=IndexedDataModule())


def losses(features: bool) -> list:
    terms = [CrossEntropyTerm(weight=0.1), KDTerm(weight=0.9)]
    return [*terms, FitNetTerm("1", "1", weight=1.0)] if features else terms


def test_store_then_lookup_returns_the_teachers_outputs_exactly() -> None:
    teacher = small_net().eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        logits = teacher(x)
    cache = TeacherOutputCache()
    cache.open("fp", 10, logits[:1], {})
    indices = torch.tensor([7, 0, 3, 9, 2, 5])
    signature = input_signature(x, 6)
    assert cache.lookup(indices, signature) is None  # nothing stored yet
    cache.store(indices, logits, {}, signature)
    found, features = cache.lookup(indices[[2, 0, 5]], signature[[2, 0, 5]])
    assert torch.equal(found, logits[[2, 0, 5]]) and features == {}
    assert cache.lookup(torch.tensor([7, 1]), signature[:2]) is None  # index 1 missing
    assert cache.bytes_per_sample == 4 * 4 + 8 + 1  # 4 float32 logits, the input signature, the filled flag


@pytest.mark.parametrize("features", [False, True], ids=["kd", "kd+fitnet"])
def test_cached_fit_equals_uncached_fit_and_skips_the_teacher_after_epoch_one(features: bool) -> None:
    runs = {}
    for cached in (False, True):
        torch.manual_seed(0)
        teacher, student = small_net(), small_net()
        cache = TeacherOutputCache() if cached else None
        module = DistillationModule(student, teacher, losses=losses(features), teacher_cache=cache)
        calls = teacher_calls(module)
        torch.manual_seed(1)  # same shuffling in both runs
        fit(module)
        runs[cached] = (module, calls, cache)
    (plain, plain_calls, _), (module, calls, cache) = runs[False], runs[True]
    assert plain_calls.count(1) == 4  # without a cache: 64 samples / 16 per batch
    assert calls.count(0) == 1 + 4 and calls.count(1) == 0  # probe + epoch 0; none in epoch 1
    assert cache.complete
    with torch.no_grad():  # every stored row is the teacher's output for that sample
        x = IndexedDataModule().x
        torch.testing.assert_close(cache.arrays["logits"], module.teacher(x), rtol=0, atol=1e-6)
        if features:
            torch.testing.assert_close(cache.arrays["feature.1"], module.teacher[:2](x), rtol=0, atol=1e-6)
    for name, value in plain.student.state_dict().items():  # the same training, step by step
        torch.testing.assert_close(module.student.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_topk_logits_against_a_hand_computation() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]])
    cache = TeacherOutputCache(top_k=2)
    cache.open("fp", 1, logits, {})
    signature = input_signature(torch.zeros(1, 3), 1)
    cache.store(torch.tensor([0]), logits, {}, signature)
    rebuilt, _ = cache.lookup(torch.tensor([0]), signature)
    fill = math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-1.0)) - math.log(3)
    assert torch.allclose(rebuilt, torch.tensor([[3.0, fill, fill, fill, 2.0]]), atol=1e-6)
    # softmax at T = 1: top-2 probabilities kept, the rest of the mass spread evenly
    total = math.exp(3) + math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    tail = (math.exp(1) + 1 + math.exp(-1)) / total / 3
    expected = torch.tensor([[math.exp(3) / total, tail, tail, tail, math.exp(2) / total]])
    assert torch.allclose(rebuilt.softmax(-1).double(), expected.double(), atol=1e-6)
    assert cache.bytes_per_sample == 2 * 4 + 2 * 2 + 4 + 8 + 1  # values, int16 classes, tail, signature, flag
    with pytest.raises(ValueError, match="top-k logits need"):
        topk_logits(torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.long), torch.zeros(1), 5)
    with pytest.raises(ValueError, match="top_k=5 keeps every one"):
        TeacherOutputCache(top_k=5).open("fp", 1, logits, {})


def test_fingerprints_change_with_teacher_data_and_transform() -> None:
    teacher = small_net()
    before = teacher_fingerprint(teacher)
    with torch.no_grad():
        teacher[0].weight[0, 0] += 1e-6
    assert teacher_fingerprint(teacher) != before
    data = RandomDataModule()
    base = TensorDataset(data.x, data.y)
    assert dataset_fingerprint(base) == dataset_fingerprint(TensorDataset(data.x.clone(), data.y))
    assert dataset_fingerprint(base) != dataset_fingerprint(TensorDataset(data.x[:-1], data.y[:-1]))
    assert dataset_fingerprint(base) != dataset_fingerprint(TensorDataset(data.x * 2, data.y))
    transformed = WithIndex(base)
    transformed.transform = "Normalize(0.5)"
    assert dataset_fingerprint(transformed) != dataset_fingerprint(WithIndex(base))


def test_a_changed_teacher_rebuilds_a_stored_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = small_net()
    fit(DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(tmp_path)), epochs=1)
    assert json.loads((tmp_path / "meta.json").read_text())["complete"]
    module = DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(tmp_path))
    calls = teacher_calls(module)
    fit(module, epochs=1)
    assert calls.count(0) == 1  # the probe only: the stored cache was reused after a restart
    with torch.no_grad():
        teacher[0].weight.mul_(2.0)
    module = DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(tmp_path))
    calls = teacher_calls(module)
    with pytest.warns(UserWarning, match="rebuilding"):
        fit(module, epochs=1)
    assert calls.count(0) == 1 + 4
    with torch.no_grad():
        torch.testing.assert_close(
            module.teacher_cache.arrays["logits"], teacher(IndexedDataModule().x), rtol=0, atol=1e-6
        )


def test_random_augmentation_is_refused() -> None:
    data = RandomDataModule()
    with pytest.raises(ValueError, match="random augmentation"):
        dataset_fingerprint(NoisyDataset(data.x, data.y))

    class NoisyDataModule(RandomDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(NoisyDataset(self.x, self.y), batch_size=16)

    module = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache())
    with pytest.raises(ValueError, match="random augmentation"):
        make_trainer(limit_val_batches=0).fit(module, datamodule=NoisyDataModule())


def test_an_interrupted_build_is_not_used_as_complete(tmp_path: Path) -> None:
    class Interrupt(RuntimeError):
        pass

    class StopAfterTwoBatches(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                raise Interrupt

    torch.manual_seed(0)
    teacher = small_net()
    module = DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(tmp_path))
    with pytest.raises(Interrupt):
        fit(module, callbacks=[StopAfterTwoBatches()])
    assert not json.loads((tmp_path / "meta.json").read_text())["complete"]
    assert int(np.load(tmp_path / "filled.npy").sum()) == 2 * 16  # the two finished batches
    cache = TeacherOutputCache(tmp_path)
    module = DistillationModule(small_net(), teacher, teacher_cache=cache)
    calls = teacher_calls(module)
    fit(module)
    assert int(cache.arrays["filled"].sum()) == 64 and cache.complete
    assert 1 < calls.count(0) <= 1 + 4 and calls.count(1) == 0
    with torch.no_grad():
        torch.testing.assert_close(cache.arrays["logits"], teacher(IndexedDataModule().x), rtol=0, atol=1e-6)


def test_the_cache_needs_a_frozen_teacher_and_sample_indices() -> None:
    with pytest.raises(ValueError, match="teacher_mode='frozen'"):
        DistillationModule(
            small_net(), small_net(), teacher_mode="trainable", teacher_cache=TeacherOutputCache()
        )
    module = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache())
    with pytest.raises(KeyError, match="WithIndex"):
        make_trainer(limit_val_batches=0).fit(module, datamodule=RandomDataModule())


def test_ddp_processes_share_one_cache_file(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["complete"]
        assert rank["calls"].count(0) == 1 + 2  # probe + 32 samples / 16 per batch
        assert rank["calls"].count(1) == 0  # the other process's samples came from the shared file
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["complete"] and meta["bytes_per_sample"] == 4 * 4 + 8 + 2 * 4 + 1  # + checksums of 2 files
    with torch.no_grad():
        torch.testing.assert_close(ranks[0]["logits"], ranks[0]["teacher_logits"], rtol=0, atol=1e-6)


def test_a_stored_row_keeps_its_first_values_and_the_step_trains_on_them_as_stored() -> None:
    cache = TeacherOutputCache(top_k=2, dtype="float16")
    x = torch.randn(4, 8)
    first = torch.tensor([[0.1, 2.3, -1.7, 0.9], [1.1, -0.4, 0.3, 2.2]])
    cache.open("fp", 4, first[:1], {})
    signature = input_signature(x, 4)
    cache.store(torch.tensor([0, 1]), first, {}, signature[:2])
    stored = {name: array.clone() for name, array in cache.arrays.items()}
    # sample 1 again (as by another process, or computed in another batch composition), and sample 2
    again = torch.tensor([[5.0, 5.0, 5.0, 6.0], [0.5, 0.25, -2.0, 1.0]])
    cache.store(torch.tensor([1, 2]), again, {}, signature[[1, 2]])
    for name in ("topk_values", "topk_indices", "tail_logsumexp", "signature"):
        assert torch.equal(cache.arrays[name][1], stored[name][1]), name  # the first values stay
    assert bool(cache.arrays["filled"][2])
    logits, features = cache.served(torch.tensor([1, 2]))
    # what the step trains on, by hand: sample 1's top-2 (2.2 and 1.1) rounded to float16, and each of
    # the other two classes log((e^-0.4 + e^0.3) / 2), float32
    other = math.log((math.exp(-0.4) + math.exp(0.3)) / 2)
    half = [float(torch.tensor(v, dtype=torch.float16)) for v in (1.1, 2.2)]
    torch.testing.assert_close(logits[0], torch.tensor([half[0], other, other, half[1]]), rtol=0, atol=1e-6)
    assert features == {}
    # a stored row whose input is not the batch's: refused, nothing written
    before = {name: array.clone() for name, array in cache.arrays.items()}
    with pytest.raises(
        RuntimeError, match="The input of training sample 1 is not the input the teacher cache"
    ):
        cache.store(torch.tensor([3, 1]), again, {}, input_signature(x + 1, 4)[[3, 1]])
    for name, array in cache.arrays.items():
        assert torch.equal(array, before[name]), name


def test_a_fit_on_a_filled_top_k_float16_cache_repeats_the_fit_that_filled_it_bit_for_bit(
    tmp_path: Path,
) -> None:
    students = []
    for run in range(2):
        torch.manual_seed(0)
        teacher, student = small_net(), small_net()
        cache = TeacherOutputCache(tmp_path, top_k=2, dtype="float16")
        module = DistillationModule(student, teacher, losses=losses(features=True), teacher_cache=cache)
        calls = teacher_calls(module)
        torch.manual_seed(1)
        fit(module)
        assert calls.count(1) == 0 and calls.count(0) == (1 + 4 if run == 0 else 1)  # the second: probe only
        students.append(module.student.state_dict())
    # the filling fit trained on the top-2 logits and float16 features as stored, as the reading fit does
    for name, value in students[0].items():
        assert torch.equal(students[1][name], value), name


def test_a_fit_resumed_with_an_in_memory_cache_says_it_is_not_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache())
    fit(module, epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    torch.manual_seed(0)  # the same teacher
    resumed = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache())
    with pytest.warns(
        UserWarning, match=r"in-memory TeacherOutputCache \(directory=None\), which checkpoints"
    ):
        make_trainer(max_epochs=2, limit_val_batches=0, default_root_dir=tmp_path).fit(
            resumed, datamodule=IndexedDataModule(), ckpt_path=checkpoint
        )
    torch.manual_seed(0)  # a cache on disk, resumed: no word
    on_disk = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache(tmp_path / "c"))
    fit(on_disk, epochs=1, default_root_dir=tmp_path / "d", enable_checkpointing=True)
    torch.manual_seed(0)
    again = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache(tmp_path / "c"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=2, limit_val_batches=0, default_root_dir=tmp_path / "d").fit(
            again, datamodule=IndexedDataModule(), ckpt_path=next((tmp_path / "d/checkpoints").glob("*.ckpt"))
        )
    assert not [w for w in caught if "in-memory" in str(w.message)]
