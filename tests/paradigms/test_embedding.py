"""EmbeddingDistillationModule and keyword-argument (dict) model inputs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.losses import EmbeddingMatchTerm
from lightning_kd.paradigms import EmbeddingDistillationModule, embedding_of
from tests.helpers import NUM_FEATURES, KeywordEncoder, RandomDataModule, make_trainer, small_net


def encoder(width: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, width))


def test_embedding_of_finds_tensor_mapping_and_attribute() -> None:
    x = torch.ones(2, 3)

    class Output:
        sentence_embedding = x

    assert embedding_of(x) is x
    assert embedding_of({"embedding": x}) is x
    assert embedding_of(Output()) is x
    with pytest.raises(TypeError, match="SentenceEncoder"):
        embedding_of({"logits": x})


def test_student_learns_teacher_embeddings_without_labels() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, NUM_FEATURES)
    loader = DataLoader(TensorDataset(x), batch_size=32)  # no labels in the batches at all
    teacher = encoder()
    module = EmbeddingDistillationModule(
        encoder(), teacher, input_key=0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    trainer = make_trainer(max_epochs=25)
    before = trainer.validate(module, loader, verbose=False)[0]
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit(module, loader)
    after = trainer.validate(module, loader, verbose=False)[0]
    assert after["val/cosine"] > 0.9 > before["val/cosine"]
    assert after["val/loss"] == pytest.approx(1 - after["val/cosine"], abs=1e-5)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_val_cosine_is_the_mean_over_samples() -> None:
    x = torch.randn(10, NUM_FEATURES)
    student, teacher = encoder(), encoder()
    module = EmbeddingDistillationModule(student, teacher)
    loader = DataLoader(TensorDataset(x), batch_size=4)  # batches of 4, 4, 2: a sample-weighted mean
    result = make_trainer().validate(module, loader, verbose=False)[0]
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(student(x).double(), teacher(x).double()).mean()
    assert result["val/cosine"] == pytest.approx(expected.item(), abs=1e-5)


def test_dict_batches_go_in_as_keyword_arguments() -> None:
    datamodule = RandomDataModule(as_dict=True)  # {"signal": x, "label": y}
    module = EmbeddingDistillationModule(
        KeywordEncoder(encoder()), KeywordEncoder(encoder()), input_key=["signal"], teacher_mode="frozen"
    )
    make_trainer(max_steps=2, limit_val_batches=1).fit(module, datamodule)
    assert math.isfinite(make_trainer().validate(module, datamodule, verbose=False)[0]["val/cosine"])

    classifier = DistillationModule(
        KeywordClassifier(small_net()),
        KeywordClassifier(small_net()),
        input_key=["signal"],
        target_key="label",
    )
    result = make_trainer(max_steps=2).fit(classifier, datamodule)
    assert result is None and classifier.global_step == 2


class KeywordClassifier(nn.Module):
    """Takes ``signal=`` and returns an object with ``.logits``, like a Hugging Face classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_classes = net[-1].out_features

    def forward(self, signal: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(signal)}


def test_ema_teacher_follows_the_student() -> None:
    x = torch.randn(64, NUM_FEATURES)
    module = EmbeddingDistillationModule(encoder(), teacher_mode="ema", ema_decay=0.5)
    make_trainer(max_steps=3).fit(module, DataLoader(TensorDataset(x), batch_size=16))
    assert not torch.equal(module.teacher[0].weight, module.student[0].weight)  # a lagging copy


def test_bad_set_ups_name_the_fix() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        EmbeddingDistillationModule(encoder())
    with pytest.raises(ValueError, match="'frozen' or 'ema'"):
        EmbeddingDistillationModule(encoder(), encoder(), teacher_mode="trainable")  # type: ignore[arg-type]
    module = EmbeddingDistillationModule(
        encoder(width=4), encoder(width=6), losses=[EmbeddingMatchTerm(kind="mse")]
    )
    loader = DataLoader(TensorDataset(torch.randn(8, NUM_FEATURES)), batch_size=4)
    with pytest.raises(ValueError, match="projection head onto the teacher"):
        make_trainer(max_steps=1).fit(module, loader)


def test_fit_summary_reports_the_cosine() -> None:
    from lightning_kd.cli import fit_summary

    loader = DataLoader(TensorDataset(torch.randn(16, NUM_FEATURES)), batch_size=8)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(EmbeddingDistillationModule(encoder(), encoder()), loader, loader)
    line = next(line for line in fit_summary(trainer, 1.0).splitlines() if "cosine" in line)
    assert float(line.split()[-1]) == pytest.approx(float(trainer.callback_metrics["val/cosine"]), abs=1e-4)


class NaNFromBatch(EmbeddingMatchTerm):
    """The match loss, NaN on batches whose first input is > 0.5: a bad held-out batch."""

    def forward(self, outputs: Any) -> torch.Tensor:
        loss = super().forward(outputs)
        return torch.where(outputs.batch[0][0, 0] > 0.5, torch.full_like(loss, math.nan), loss)


def test_a_non_finite_held_out_loss_stops_the_loop_at_its_end_naming_the_batch() -> None:
    inputs = torch.zeros(48, NUM_FEATURES)
    inputs[32, 0] = 1.0  # the first sample of held-out batch 2 (batch size 16)
    loader = DataLoader(TensorDataset(inputs), batch_size=16)
    module = EmbeddingDistillationModule(encoder(), encoder(), losses=[NaNFromBatch()])
    with pytest.raises(FloatingPointError, match=r"not finite at validation batch 2 .*\{'embedding': nan\}"):
        make_trainer().validate(module, dataloaders=loader, verbose=False)
    module.check_finite = False
    (metrics,) = make_trainer().validate(module, dataloaders=loader, verbose=False)  # off: logged as it is
    assert math.isnan(metrics["val/loss"])
