"""Checkpoints: frozen teacher left out (or kept), round trips, resume, atomic writes, checked reads."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.serialization import config as serialization_config

from lightning_kd import DistillationModule
from lightning_kd.checkpoint_io import AtomicCheckpointIO, atomic_save, checkpoint_problem
from lightning_kd.teachers import load_weights
from tests.helpers import RandomDataModule, fit_to_checkpoint, make_trainer, small_net


@pytest.fixture
def trained_teacher(tmp_path: Path) -> Path:
    """A teacher trained by the module itself (no teacher): its network is saved under `student.`."""
    return fit_to_checkpoint(DistillationModule(small_net(hidden=32)), tmp_path / "teacher", epochs=2)


def test_teacher_checkpoint_round_trip(trained_teacher: Path, tmp_path: Path) -> None:
    teacher = small_net(hidden=32)
    module = DistillationModule(small_net(), teacher, teacher_checkpoint=trained_teacher)
    saved = torch.load(trained_teacher, weights_only=True)["state_dict"]
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, saved[f"student.{name}"]), name

    student_ckpt = fit_to_checkpoint(module, tmp_path / "student")
    state = torch.load(student_ckpt, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teacher.") for key in state)

    # the teacher comes back from its own source: the teacher_checkpoint
    restored = DistillationModule.load_from_checkpoint(
        student_ckpt, student=small_net(), teacher=small_net(hidden=32)
    )
    for name, tensor in module.student.state_dict().items():
        assert torch.equal(tensor, restored.student.state_dict()[name]), name
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, restored.teacher.state_dict()[name]), name


def test_save_teacher_keeps_it_and_costs_its_size(trained_teacher: Path, tmp_path: Path) -> None:
    def build(save_teacher: bool) -> DistillationModule:
        return DistillationModule(small_net(), small_net(hidden=512), save_teacher=save_teacher)

    without = fit_to_checkpoint(build(False), tmp_path / "without")
    with_teacher = fit_to_checkpoint(build(True), tmp_path / "with")
    state = torch.load(with_teacher, weights_only=True)["state_dict"]
    assert any(key.startswith("teacher.") for key in state)
    teacher_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("teacher."))
    growth = with_teacher.stat().st_size - without.stat().st_size
    assert growth >= teacher_bytes  # the teacher's tensors are what the flag adds


def test_co_trained_teacher_is_always_saved(tmp_path: Path) -> None:
    module = DistillationModule(small_net(), small_net(), teacher_mode="trainable")
    state = torch.load(fit_to_checkpoint(module, tmp_path), weights_only=True)["state_dict"]
    assert any(key.startswith("teacher.") for key in state)


def test_resume_without_teacher_in_checkpoint(tmp_path: Path) -> None:
    teacher = small_net()
    first = fit_to_checkpoint(DistillationModule(small_net(), teacher), tmp_path / "a", epochs=1)
    module = DistillationModule(small_net(), teacher)
    trainer = make_trainer(max_epochs=2)
    with pytest.warns(UserWarning, match="Resumed with another run length"):  # 1 epoch planned, now 2
        trainer.fit(module, datamodule=RandomDataModule(), ckpt_path=first)
    assert trainer.current_epoch == 2 and trainer.global_step == 8


def test_teacher_checkpoint_of_another_architecture(trained_teacher: Path) -> None:
    with pytest.raises(
        ValueError, match=r"does not fit Sequential.*of another shape.*\(32, 8\) vs model \(16, 8\)"
    ):
        DistillationModule(small_net(), small_net(hidden=16), teacher_checkpoint=trained_teacher)


def test_truncated_teacher_checkpoint(trained_teacher: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained_teacher.read_bytes()[:200])
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        DistillationModule(small_net(), small_net(hidden=32), teacher_checkpoint=broken)


def _flip_tensor_bytes(path: Path) -> str:
    """Flip 4 bytes in the middle of the checkpoint's largest tensor; returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    data = bytearray(path.read_bytes())
    header = record.header_offset  # the local header: 30 bytes, then the name and the extra field
    name_length, extra_length = struct.unpack("<HH", data[header + 26 : header + 30])
    start = header + 30 + name_length + extra_length + record.file_size // 2
    data[start : start + 4] = bytes(byte ^ 0xFF for byte in data[start : start + 4])
    path.write_bytes(data)
    return record.filename


def test_flipped_bytes_in_a_checkpoint_stop_the_resume_and_the_teacher_load(tmp_path: Path) -> None:
    good = fit_to_checkpoint(DistillationModule(small_net()), tmp_path / "ckpt")
    earlier = shutil.copy(good, good.with_name("epoch=0.ckpt"))
    record = _flip_tensor_bytes(good)
    # torch.load alone takes the damaged tensor as it is
    damaged, intact = (torch.load(p, weights_only=True)["state_dict"] for p in (good, earlier))
    assert any(not torch.equal(damaged[k], intact[k]) for k in intact)

    expected = (
        f"Cannot load checkpoint '{good}': its bytes changed after it was written (Bad CRC-32 for file "
        f"'{record}': the file was damaged on disk or in a copy). Pass an earlier checkpoint as ckpt_path "
        f"(--ckpt_path), e.g. 'epoch=0.ckpt' in '{good.parent}', or run without it to start afresh."
    )
    trainer = make_trainer(max_epochs=2)
    with pytest.raises(ValueError) as error:
        trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule(), ckpt_path=good)
    assert str(error.value) == expected
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the module's default
    with pytest.raises(
        ValueError, match=rf"Cannot read checkpoint '{re.escape(str(good))}': its bytes changed"
    ):
        load_weights(small_net(), good)


def test_an_empty_last_ckpt_names_the_earlier_checkpoint(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, filename="epoch0")
    make_trainer(callbacks=[checkpoint], enable_checkpointing=True).fit(
        DistillationModule(small_net()), datamodule=RandomDataModule()
    )
    (tmp_path / "last.ckpt").write_bytes(b"")  # as a kill during Lightning's cross-filesystem copy leaves it
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, filename="epoch0")
    trainer = make_trainer(max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True)
    with pytest.raises(ValueError) as error:
        trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule(), ckpt_path="last")
    assert str(error.value) == (
        f"Cannot load checkpoint '{tmp_path / 'last.ckpt'}': it is empty (0 bytes), left by a save that was "
        f"cut off. Pass an earlier checkpoint as ckpt_path (--ckpt_path), e.g. 'epoch0.ckpt' in "
        f"'{tmp_path}', or run without it to start afresh."
    )


@pytest.mark.parametrize("fault", ["directory", "truncated"])
def test_a_directory_or_a_truncated_file_as_ckpt_path(trained_teacher: Path, fault: str) -> None:
    if fault == "directory":
        path, message = (
            trained_teacher.parent,
            "it is a directory, not a checkpoint file. Pass a checkpoint file in it",
        )
    else:
        path = trained_teacher.with_name("truncated.ckpt")
        path.write_bytes(trained_teacher.read_bytes()[:-100])
        message = "it is truncated or not a checkpoint (File is not a zip file). Pass an earlier checkpoint"
    with pytest.raises(ValueError) as error:
        make_trainer().fit(
            DistillationModule(small_net(hidden=32)), datamodule=RandomDataModule(), ckpt_path=path
        )
    assert str(error.value) == (
        f"Cannot load checkpoint '{path}': {message} as ckpt_path (--ckpt_path), e.g. 'model.ckpt' in "
        f"'{trained_teacher.parent}'"
        + ("." if fault == "directory" else ", or run without it to start afresh.")
    )


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, target)

    def write_then_fail(obj: Any, file: Any) -> None:
        torch.save(obj, file)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_save({"step": 2}, target, write=write_then_fail)
    assert torch.load(target)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_temporaries_of_killed_saves_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    stale = tmp_path / f".last.ckpt.tmp-{host}-{int(dead.stdout)}-0123abcd"
    alive = tmp_path / f".last.ckpt.tmp-{host}-{os.getppid()}-0123abcd"  # a save in progress elsewhere
    other_host = tmp_path / f".last.ckpt.tmp-{host}x-{int(dead.stdout)}-0123abcd"
    for path in (stale, alive, other_host):
        path.write_bytes(b"partial")
    atomic_save({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", alive.name, other_host.name])


def test_old_checkpoints_without_crcs_still_load(tmp_path: Path) -> None:
    source = small_net()
    with serialization_config.patch({"save.compute_crc32": False}):
        torch.save(source.state_dict(), tmp_path / "no_crc.pt")
    assert {r.CRC for r in zipfile.ZipFile(tmp_path / "no_crc.pt").infolist()} == {0}
    torch.save(source.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("no_crc.pt", "legacy.pt"):
        assert checkpoint_problem(tmp_path / name) is None
        loaded = load_weights(small_net(), tmp_path / name)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_checkpoint_io_the_user_chose_is_left_alone(tmp_path: Path) -> None:
    class OwnIO(TorchCheckpointIO):
        pass

    trainer = make_trainer(plugins=[OwnIO()])
    trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())
    assert type(trainer.strategy.checkpoint_io) is OwnIO
