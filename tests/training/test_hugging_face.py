"""Hugging Face classifiers from dict batches, and the MiniLM recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_kd.recipes import RECIPES_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.cli import main  # noqa: E402
from lightning_kd.losses import (  # noqa: E402
    HiddenStateTerm,
    KDTerm,
)
from lightning_kd.models import minilm_teacher  # noqa: E402
from lightning_kd.paradigms import EmbeddingDistillationModule  # noqa: E402
from tests.helpers import VOCAB, make_trainer, token_batch  # noqa: E402

RECIPE = RECIPES_DIR / "sentences" / "minilm_distil.yaml"


def test_hugging_face_classifiers_distil_from_dict_batches() -> None:
    """Two tiny BertForSequenceClassification: ModelOutput logits, hidden states, labels from the batch."""

    def classifier(hidden: int, layers: int) -> nn.Module:
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3, output_hidden_states=True,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config)

    batch = token_batch(16, 7, seed=2)
    batch["labels"] = torch.arange(16) % 3
    items = [{key: value[i] for key, value in batch.items()} for i in range(16)]
    module = DistillationModule(
        classifier(8, 1),
        classifier(16, 2),
        losses=[KDTerm("kd", temperature=2.0), HiddenStateTerm("hidden", layers=[(1, 2)])],
        input_key=["input_ids", "attention_mask"],
        target_key="labels",
        cosine_decay=False,
    )
    loader = DataLoader(items, batch_size=8)
    module.build_terms(
        next(iter(loader))
    )  # sizes the projection (a datamodule's probe batch does this in fit)
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert module.num_classes == 3
    assert isinstance(module.loss_terms["hidden"].projection, nn.Linear)
    for key in ("train/loss_kd", "train/loss_hidden", "val/acc", "val/agreement"):
        assert key in trainer.callback_metrics, key


def test_minilm_recipe_fits_two_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit", "--config", str(RECIPE),
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--data.init_args.train_sentences=32", "--data.init_args.val_sentences=8",
            "--data.init_args.test_sentences=8", "--data.init_args.batch_size=8",
            "--data.init_args.max_length=24",
        ]
    )  # fmt: skip
    header = (tmp_path / "runs/sentences/minilm_distil/version_0/metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss_embedding", "train/loss_hidden", "train/loss_attention", "val/cosine"):
        assert column in header, column
    state = torch.load(tmp_path / "runs/sentences/minilm_distil/latest.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("student.model.encoder.layer.1.") for k in state)
    assert not any(k.startswith("student.model.encoder.layer.2.") or k.startswith("teacher.") for k in state)
    # the checkpoint reloads: the student from its weights, the frozen teacher from its own source
    with pytest.warns(UserWarning, match=r"Adapters of loss terms \['hidden'\] were not restored"):
        restored = EmbeddingDistillationModule.load_from_checkpoint(
            tmp_path / "runs/sentences/minilm_distil/latest.ckpt"
        )
    restored_state = restored.state_dict()
    assert all(torch.equal(restored_state[k], v) for k, v in state.items() if k.startswith("student."))
    fresh_teacher = minilm_teacher().state_dict()
    assert all(torch.equal(restored.teacher.state_dict()[k], v) for k, v in fresh_teacher.items())
