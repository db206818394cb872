"""TeacherOutputCache against damaged files, changed data, wrong indices, rivals, full disks, read-only dirs.

Each test injects one fault and asserts the exact message or the correct result, and that the
files the fault did not touch (the other run's cache, a user's file in the directory) survive.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.data import WithIndex
from lightning_kd.teachers import TeacherOutputCache
from lightning_kd.teachers.cache import FORMAT_VERSION
from lightning_kd.teachers.fingerprints import input_signature
from tests.helpers import RandomDataModule, make_trainer, small_net

N = 8  # samples of the direct-API caches


def inputs_and_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, 8, generator=generator), torch.randn(N, 4, generator=generator)


def built(directory: Path, fingerprint: str = "teacher-a", rows: int = N) -> tuple[TeacherOutputCache, dict]:
    """A cache in ``directory`` holding ``rows`` samples (complete when ``rows == N``), and its data."""
    x, logits = inputs_and_logits()
    cache = TeacherOutputCache(directory)
    cache.open(fingerprint, N, logits[:1], {})
    indices = torch.arange(rows)
    cache.store(indices, logits[:rows], {}, input_signature(x[:rows], rows))
    cache.finish_epoch()
    return cache, {"x": x, "logits": logits}


def reopened(directory: Path, fingerprint: str = "teacher-a") -> TeacherOutputCache:
    cache = TeacherOutputCache(directory)
    cache.open(fingerprint, N, torch.zeros(1, 4), {})
    return cache


def row_offset(path: Path, row: int) -> tuple[int, int]:
    """(byte offset, byte length) of ``row`` in the ``.npy`` file at ``path``."""
    array = np.load(path, mmap_mode="r")
    return array.offset + row * array[0].nbytes, array[0].nbytes


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def test_a_truncated_file_rebuilds_the_cache_and_never_serves_zeros(tmp_path: Path) -> None:
    cache, _ = built(tmp_path)
    cache.release()
    (tmp_path / "notes.txt").write_text("mine")
    logits_file = tmp_path / "logits.npy"
    size = logits_file.stat().st_size
    os.truncate(logits_file, size - 40)
    with pytest.warns(
        UserWarning, match=rf"has damaged files \(logits.npy has {size - 40:,} bytes, expected "
    ):
        cache = reopened(tmp_path)
    assert not cache.complete and not bool(cache.arrays["filled"].any())  # rebuilt: nothing is served
    assert logits_file.stat().st_size == size and (tmp_path / "notes.txt").read_text() == "mine"
    x, _ = inputs_and_logits()
    assert cache.lookup(torch.arange(N), input_signature(x, N)) is None  # the teacher runs again


@pytest.mark.parametrize("fault", ["bit flip", "zeroed row"])
def test_a_damaged_row_is_an_error_naming_the_sample_and_file(tmp_path: Path, fault: str) -> None:
    cache, data = built(tmp_path)
    cache.release()
    if fault == "bit flip":
        offset, _ = row_offset(tmp_path / "logits.npy", 5)
        byte = (tmp_path / "logits.npy").read_bytes()[offset + 3]
        overwrite(tmp_path / "logits.npy", offset + 3, bytes([byte ^ 0x01]))  # one bit of logit [5, 0]
        files = "logits.npy"
    else:  # the row in every file, its checksum included, as a zero-filled hole would be
        for name in ("logits", "signature", "checksum"):
            offset, length = row_offset(tmp_path / f"{name}.npy", 5)
            overwrite(tmp_path / f"{name}.npy", offset, bytes(length))
        files = "logits.npy, signature.npy"
    cache = reopened(tmp_path)
    assert cache.complete
    signature = input_signature(data["x"], N)
    found, _ = cache.lookup(torch.tensor([0, 1]), signature[:2])  # undamaged rows are served exactly
    assert torch.equal(found, data["logits"][:2])
    with pytest.raises(RuntimeError) as error:
        cache.lookup(torch.tensor([2, 5]), signature[[2, 5]])
    assert str(error.value) == (
        f"The teacher cache in {tmp_path} is damaged: the row of training sample 5 in {files} does not match "
        "the checksum stored with it in checksum.npy (a file was changed, zeroed or corrupted after it was "
        f"written). Delete {tmp_path} to rebuild the cache; it holds only the teacher's outputs."
    )


def test_a_damaged_stored_row_in_a_batch_the_teacher_runs_on_is_named_not_trained_on(tmp_path: Path) -> None:
    # a partly filled cache (a killed run, another process): rows 0-3 stored, then row 2 damaged
    cache, data = built(tmp_path, rows=4)
    cache.release()
    offset, _ = row_offset(tmp_path / "logits.npy", 2)
    overwrite(tmp_path / "logits.npy", offset, np.float32(1000.0).tobytes())
    cache = reopened(tmp_path)
    signature = input_signature(data["x"], N)
    assert cache.lookup(torch.tensor([2, 6]), signature[[2, 6]]) is None  # row 6 missing: the teacher runs
    with pytest.raises(RuntimeError, match=r"is damaged: the row of training sample 2 in logits.npy"):
        cache.store(torch.tensor([2, 6]), data["logits"][[2, 6]], {}, signature[[2, 6]])
    assert not bool(cache.arrays["filled"][6])  # nothing written by the refused store
    cache.store(torch.tensor([6]), data["logits"][[6]], {}, signature[[6]])
    logits, _ = cache.served(torch.tensor([6]))  # rows the store just wrote need no second check
    assert torch.equal(logits, data["logits"][[6]])
    cache.release()


def test_a_changed_sample_is_caught_at_the_first_served_batch_or_the_epoch_end(tmp_path: Path) -> None:
    cache, data = built(tmp_path)
    cache = reopened(tmp_path)
    x = data["x"].clone()
    x[6, 2] += 1e-3  # a sample the fingerprint never reads
    signature = input_signature(x, N)
    message = "The input of training sample 6 is not the input the teacher cache stored for that index"
    found, _ = cache.lookup(torch.tensor([0, 1]), signature[:2])  # the first served batch is checked
    assert torch.equal(found, data["logits"][:2])
    cache.lookup(torch.tensor([3, 6]), signature[[3, 6]])  # compared on the device, read at epoch end
    with pytest.raises(RuntimeError, match=message) as error:
        cache.finish_epoch()
    assert f"delete {tmp_path} to rebuild it" in str(error.value) and "index_key=2" in str(error.value)
    cache = reopened(tmp_path)
    with pytest.raises(RuntimeError, match=message):
        cache.lookup(torch.tensor([6]), signature[[6]])  # in the first served batch: at once


def test_changed_unprobed_training_data_stops_a_fit(tmp_path: Path) -> None:
    class IndexedData(RandomDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(WithIndex(TensorDataset(self.x, self.y)), batch_size=16, shuffle=True)

    torch.manual_seed(0)
    teacher, data = small_net(), IndexedData()
    trainer_options = dict(max_epochs=1, limit_val_batches=0)
    make_trainer(**trainer_options).fit(
        DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(tmp_path)), datamodule=data
    )
    data.x[5] *= -1  # 5 is not one of the probed samples 0, 16, 32, 47, 63
    module = DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(tmp_path))
    with pytest.raises(RuntimeError, match="The input of training sample 5 is not the input"):
        make_trainer(**trainer_options).fit(module, datamodule=data)


def test_labels_as_index_are_refused_in_the_first_batch() -> None:
    module = DistillationModule(small_net(), small_net(), teacher_cache=TeacherOutputCache(index_key=1))
    with pytest.raises(
        RuntimeError, match=r"Two samples of one batch have index \d at index_key=1 but different"
    ):
        make_trainer(limit_val_batches=0).fit(module, datamodule=RandomDataModule())


def test_an_epoch_that_leaves_rows_empty_says_the_indices_may_be_wrong() -> None:
    x, logits = inputs_and_logits()
    cache = TeacherOutputCache()
    cache.open("fp", N, logits[:1], {})
    half, signature = torch.arange(N // 2), input_signature(x[: N // 2], N // 2)
    assert cache.lookup(half, signature) is None
    cache.store(half, logits[: N // 2], {}, signature)
    assert cache.lookup(half, signature) is not None  # 8 samples passed, rows 4..7 never named
    with pytest.warns(
        UserWarning, match="passed 8 samples through the teacher cache, as many as it has rows, "
    ):
        assert not cache.finish_epoch()


def test_duplicate_indices_of_one_sample_are_stored_once() -> None:
    x, logits = inputs_and_logits()
    cache = TeacherOutputCache()
    cache.open("fp", N, logits[:1], {})
    indices = torch.tensor([3, 1, 3])  # a sampler with replacement drew sample 3 twice
    rows = x[[3, 1, 3]]
    cache.store(indices, logits[[3, 1, 3]], {}, input_signature(rows, 3))
    found, _ = cache.lookup(torch.tensor([1, 3]), input_signature(x[[1, 3]], 2))
    assert torch.equal(found, logits[[1, 3]])


def open_for_another_teacher(directory: Path, sender: Any) -> None:
    """In a forked process: open ``directory`` for another teacher; send the refusal's message."""
    try:
        TeacherOutputCache(directory).open("teacher-b", N, torch.zeros(1, 4), {})
        sender.send("opened")
    except RuntimeError as error:
        sender.send(str(error))


def test_a_second_writer_is_refused_and_the_first_writers_files_survive(tmp_path: Path) -> None:
    cache, _ = built(tmp_path, rows=4)  # this process is building it (incomplete, exclusive lock)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    context = multiprocessing.get_context("fork")  # another process, without importing torch again
    receiver, sender = context.Pipe(duplex=False)
    other_run = context.Process(target=open_for_another_teacher, args=(tmp_path, sender))
    other_run.start()
    other_run.join(timeout=60)
    message = receiver.recv() if receiver.poll(0) else "no answer"
    assert other_run.exitcode == 0 and message.startswith(
        f"The teacher cache directory {tmp_path} is in use by another process (pid {os.getpid()} on host "
        f"{socket.gethostname()}, writing since "
    ), message
    assert "give this run its own directory (TeacherOutputCache(directory=...))" in message
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    cache.release()
    assert (tmp_path / "lock").read_bytes() == b""  # the writer's record goes with its lock


def test_readers_share_a_complete_cache_and_a_rebuild_waits_for_them(tmp_path: Path) -> None:
    cache, data = built(tmp_path)
    cache.release()
    other_run = os.open(tmp_path / "lock", os.O_RDONLY)  # another process reading the complete cache
    try:
        fcntl.flock(other_run, fcntl.LOCK_SH | fcntl.LOCK_NB)
        reader = reopened(tmp_path)  # a second reader is welcome
        found, _ = reader.lookup(torch.arange(N), input_signature(data["x"], N))
        assert torch.equal(found, data["logits"])
        reader.release()
        with pytest.raises(
            RuntimeError, match=r"in use by another process \(a run reading the complete teacher cache\)"
        ):
            reopened(tmp_path, "teacher-b")  # a rebuild needs the directory to itself
    finally:
        os.close(other_run)
    assert json.loads((tmp_path / "meta.json").read_text())["complete"]
    assert torch.equal(reopened(tmp_path).arrays["logits"], data["logits"])  # untouched


def test_a_read_only_directory_serves_a_complete_cache_and_refuses_an_incomplete_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    complete, data = built(tmp_path / "complete")
    complete.release()
    partial, _ = built(tmp_path / "partial", rows=4)
    partial.release()
    for directory in (tmp_path / "complete", tmp_path / "partial"):
        for path in [directory, *directory.iterdir()]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:  # root ignores the modes: let the cache see the directories as read-only
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real_access(path, mode))
    before = (tmp_path / "complete" / "logits.npy").read_bytes()
    try:
        cache = reopened(tmp_path / "complete")
        assert cache.complete and {array.mode for array in cache._memmaps} == {"c"}
        found, _ = cache.lookup(torch.arange(N), input_signature(data["x"], N))
        assert torch.equal(found, data["logits"])
        with pytest.raises(PermissionError) as error:
            reopened(tmp_path / "partial")
        assert str(error.value) == (
            f"The teacher cache in {tmp_path / 'partial'} is incomplete (4 of 8 samples stored) and its "
            "directory is read-only, so it cannot be finished. Make the directory writable, or give "
            "TeacherOutputCache a writable directory (the cache is built there)."
        )
    finally:
        for path in tmp_path.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert (tmp_path / "complete" / "logits.npy").read_bytes() == before


@pytest.mark.parametrize("where", ["free-space check", "posix_fallocate"])
def test_a_cache_larger_than_the_free_disk_is_an_error_naming_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    needed = N * (4 * 4 + 8 + 2 * 4 + 1) + 4 * 4096  # logits, signature, 2 checksums, filled; 4 KiB a header
    if where == "free-space check":
        monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
        free = 1000
    else:

        def full_disk(descriptor: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full_disk)
        free = None
    with pytest.raises(
        OSError, match=rf"The teacher cache needs {needed:,} bytes in {tmp_path} but its "
    ) as error:
        TeacherOutputCache(tmp_path).open("fp", N, torch.zeros(1, 4), {})
    assert error.value.errno == errno.ENOSPC
    assert "top_k (e.g. top_k=5 keeps 5 logits of each sample) or dtype='float16'" in str(error.value)
    if free is not None:
        assert f"has {free:,} bytes free" in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lock", "notes.txt"]  # no half-made cache
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "meta, reason",
    [
        ('{"format": 2, "fingerp', r"has an unreadable meta.json \(truncated or garbled\)"),
        (
            '{"format": 1, "fingerprint": "x", "complete": true}',
            rf"was written in format 1 \(this version reads {FORMAT_VERSION}\)",
        ),
        ("[]", r"has a meta.json without its fields \(format, fingerprint, complete\)"),
    ],
    ids=["truncated", "old format", "not an object"],
)
def test_an_unusable_meta_json_rebuilds_the_cache(tmp_path: Path, meta: str, reason: str) -> None:
    cache, data = built(tmp_path)
    cache.release()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "meta.json").write_text(meta)
    with pytest.warns(UserWarning, match=rf"The teacher cache in .* {reason}: rebuilding it."):
        cache = reopened(tmp_path)
    assert not cache.complete and not bool(cache.arrays["filled"].any())
    assert json.loads((tmp_path / "meta.json").read_text())["format"] == FORMAT_VERSION
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("top_k", [None, 2])
def test_float16_overflow_is_an_error_naming_the_fix(top_k: int | None) -> None:
    cache = TeacherOutputCache(top_k=top_k, dtype="float16")
    logits = torch.tensor([[1.0, 70000.0, -2.0, 0.5]])
    cache.open("fp", 1, logits, {})
    with pytest.raises(OverflowError) as error:
        cache.store(torch.tensor([0]), logits, {}, input_signature(logits, 1))
    assert str(error.value) == (
        "The teacher's logits reach 70000, beyond float16's largest value 65504: the cache would store them "
        "as inf. Use TeacherOutputCache(dtype='float32')."
    )
    assert not bool(cache.arrays["filled"].any())


def test_the_input_signature_is_exact_and_independent_of_the_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "image": torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=generator),
        "values": torch.randn(6, 5, generator=generator).double(),
        "mask": torch.rand(6, 7, generator=generator) > 0.5,
        "half": torch.randn(6, 3, generator=generator).half(),
    }
    whole = input_signature(inputs, 6)
    part = input_signature({key: value[[4, 1]] for key, value in inputs.items()}, 2)
    assert torch.equal(part, whole[[4, 1]]) and len(set(whole.tolist())) == 6
    for key in inputs:  # one changed bit in any leaf of sample 2 changes only its signature
        changed = {name: value.clone() for name, value in inputs.items()}
        last = changed[key][2].reshape(-1)[-1:]
        if key == "mask":
            last[0] = ~last[0]
        else:
            last.view(torch.uint8)[0] ^= 1
        signature = input_signature(changed, 6)
        assert signature[2] != whole[2] and torch.equal(signature[[0, 1, 3, 4, 5]], whole[[0, 1, 3, 4, 5]])
