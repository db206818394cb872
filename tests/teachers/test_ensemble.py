"""TeacherEnsemble: output, construction errors, distilling an ensemble."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import CrossEntropyTerm, DistillationModule, MultiTeacherKDTerm, TeacherEnsemble
from tests.helpers import RandomDataModule, _softmax64, make_trainer, small_net


def test_ensemble_output_and_construction_errors() -> None:
    ensemble = TeacherEnsemble([small_net(), small_net(hidden=32)], weights=[1.0, 3.0])
    ensemble.eval()
    x = torch.randn(7, 8)
    out = ensemble(x)
    assert out["members"].shape == (2, 7, 4)
    torch.testing.assert_close(out["weights"], torch.tensor([0.25, 0.75]))
    expected = (
        0.25 * _softmax64(ensemble.members[0](x), 1.0) + 0.75 * _softmax64(ensemble.members[1](x), 1.0)
    ).log()
    torch.testing.assert_close(out["logits"].double(), expected, rtol=1e-5, atol=1e-6)
    assert ensemble.num_classes == 4 and len(ensemble) == 2
    with pytest.raises(ValueError, match="at least two teachers"):
        TeacherEnsemble([small_net()])
    with pytest.raises(ValueError, match="different numbers of classes"):
        TeacherEnsemble([small_net(), small_net(num_classes=3)])
    for weights in ([1.0, float("inf")], [1.0, float("nan")], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights must be finite and non-negative with a positive sum"):
            TeacherEnsemble([small_net(), small_net()], weights=weights)
    with pytest.raises(ValueError, match="checkpoints has 1 entries for 2 teachers"):
        TeacherEnsemble([small_net(), small_net()], checkpoints=["a.ckpt"])


def _teacher_checkpoint(directory: Path, hidden: int) -> Path:
    checkpoint = ModelCheckpoint(dirpath=directory, filename=f"t{hidden}", enable_version_counter=False)
    make_trainer(max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True).fit(
        DistillationModule(small_net(hidden=hidden)), datamodule=RandomDataModule()
    )
    return directory / f"t{hidden}.ckpt"


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
def test_distilling_an_ensemble_logs_each_teacher(tmp_path: Path, weighting: str) -> None:
    paths = [_teacher_checkpoint(tmp_path, 16), _teacher_checkpoint(tmp_path, 32)]
    ensemble = TeacherEnsemble([small_net(hidden=16), small_net(hidden=32)], checkpoints=paths)
    saved = torch.load(paths[1], weights_only=True)["state_dict"]
    assert torch.equal(ensemble.members[1].state_dict()["0.weight"], saved["student.0.weight"])
    module = DistillationModule(
        small_net(), ensemble, losses=[CrossEntropyTerm(weight=0.1), MultiTeacherKDTerm(weighting=weighting)]
    )
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, datamodule=RandomDataModule())
    (metrics,) = trainer.test(module, datamodule=RandomDataModule(), verbose=False)
    assert {"test/teacher0_acc", "test/teacher1_acc", "test/teacher_acc", "test/agreement"} <= set(metrics)
    assert all(not p.requires_grad for p in ensemble.parameters())
