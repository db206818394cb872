"""Teacher loading: the checkpoint forms teachers come in, and the errors of those that cannot load."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_kd import DistillationModule
from lightning_kd.teachers import load_weights
from tests.helpers import small_net


def test_missing_teacher_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist. Train the teacher first"):
        DistillationModule(small_net(), small_net(), teacher_checkpoint=tmp_path / "nope.ckpt")


def test_plain_state_dict_is_accepted(tmp_path: Path) -> None:
    source = small_net()
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = load_weights(small_net(), tmp_path / "weights.pt")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name])


def test_crd_benchmark_teacher_file_is_accepted(tmp_path: Path) -> None:
    source = small_net()
    torch.save({"model": source.state_dict(), "epoch": 240}, tmp_path / "resnet32x4_best.pth")
    target = load_weights(small_net(), tmp_path / "resnet32x4_best.pth")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name])


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    net.train()
    net(torch.randn(32, 8))  # running statistics and num_batches_tracked that a fresh net lacks
    return net


def _bn_net_fresh() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _assert_same_weights(source: nn.Module, target: nn.Module) -> None:
    assert source.state_dict().keys() == target.state_dict().keys()
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name


@pytest.mark.parametrize(
    "prefix", ["module.", "model.", "student.", "model.module.", "_orig_mod.", "net.backbone."]
)
def test_prefixed_state_dicts_load(tmp_path: Path, prefix: str) -> None:
    source = _bn_net()
    state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
    other = {"loss_terms.kd.adapter.weight": torch.zeros(3)}  # other entries of a Lightning checkpoint
    torch.save({"state_dict": {**state, **other}, "epoch": 3}, tmp_path / "teacher.ckpt")
    _assert_same_weights(source, load_weights(_bn_net_fresh(), tmp_path / "teacher.ckpt"))


def test_timm_training_checkpoint_gives_state_dict_or_its_ema(tmp_path: Path) -> None:
    trained, averaged = _bn_net(), _bn_net_fresh()
    torch.save(
        {
            "epoch": 299,
            "arch": "resnet18",
            "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()},  # saved under DDP
            "state_dict_ema": averaged.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="resnet18", lr=0.1),
            "version": 2,
        },
        tmp_path / "model_best.pth.tar",
    )
    _assert_same_weights(trained, load_weights(_bn_net_fresh(), tmp_path / "model_best.pth.tar"))
    _assert_same_weights(averaged, load_weights(_bn_net(), tmp_path / "model_best.pth.tar", use_ema=True))

    torch.save({"state_dict": trained.state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(ValueError, match=r"holds no moving-average weights .*: load it with use_ema=False\."):
        load_weights(_bn_net(), tmp_path / "no_ema.pth", use_ema=True)


def test_a_whole_pickled_model_needs_weights_only_false(tmp_path: Path) -> None:
    source = _bn_net()
    path = tmp_path / "teacher_model.pt"
    torch.save(source, path)
    expected = (
        f"Checkpoint '{path}' holds a pickled torch.nn.modules.container.Sequential object, which only "
        "loads by running code from the file (a whole model saved with torch.save(model)?). Save its weights "
        "once, from a Python where that class imports: `torch.save(torch.load("
        f"'{path}', weights_only=False).state_dict(), 'teacher_weights.pt')` and pass that file; or, if you "
        "trust the file, call load_weights(model, path, weights_only=False)."
    )
    with pytest.raises(ValueError) as error:
        load_weights(_bn_net_fresh(), path)
    assert str(error.value) == expected
    _assert_same_weights(source, load_weights(_bn_net_fresh(), path, weights_only=False))


def test_old_batchnorm_state_without_num_batches_tracked(tmp_path: Path) -> None:
    source = _bn_net()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    target = load_weights(_bn_net_fresh(), tmp_path / "old.pth")
    for name, tensor in state.items():
        assert torch.equal(tensor, target.state_dict()[name]), name
    assert target.state_dict()["1.num_batches_tracked"] == 0  # the fresh net's own counter


def test_a_directory_as_teacher_checkpoint(tmp_path: Path) -> None:
    torch.save(small_net().state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(ValueError) as error:
        load_weights(small_net(), tmp_path)
    assert str(error.value) == (
        f"Teacher checkpoint '{tmp_path}' is a directory, not a checkpoint file: pass a checkpoint file "
        "in it (teacher.pt)."
    )
    (tmp_path / ".metadata").write_bytes(b"")  # a sharded checkpoint of torch.distributed.checkpoint
    with pytest.raises(
        ValueError, match=r"sharded \(distributed\) checkpoint: consolidate it .*consolidate_checkpoint"
    ):
        load_weights(small_net(), tmp_path)


def test_a_checkpoint_with_student_and_saved_teacher_gives_the_student(tmp_path: Path) -> None:
    student, teacher = _bn_net(), _bn_net_fresh()  # save_teacher=True: both networks, same architecture
    state = {**{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    state.update({f"student.{k}": v for k, v in student.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "kd.ckpt")
    _assert_same_weights(student, load_weights(_bn_net_fresh(), tmp_path / "kd.ckpt"))
