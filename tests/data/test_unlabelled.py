"""UnlabelledDataModule: labels hidden from training, kept for the probe."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.callbacks import KNNProbe
from lightning_kd.data import UnlabelledDataModule
from lightning_kd.losses import SEEDTerm
from lightning_kd.paradigms import EmbeddingDistillationModule
from tests.helpers import NUM_CLASSES, NUM_FEATURES, RandomDataModule, encoder, make_trainer


def test_unlabelled_datamodule_hides_labels_from_training_and_keeps_them_for_the_probe(
    datamodule: RandomDataModule,
) -> None:
    unlabelled = UnlabelledDataModule(datamodule)
    unlabelled.setup("fit")
    batch = next(iter(unlabelled.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (16, NUM_FEATURES)
    labelled_batch = next(iter(unlabelled.labelled_dataloader("val")))
    assert torch.equal(labelled_batch[0], datamodule.x[:16])
    seen: list[object] = []

    class Recording(EmbeddingDistillationModule):
        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            seen.append(batch)
            return super().training_step(batch, batch_idx)

    module = Recording(encoder(1), encoder(2), losses=[SEEDTerm(queue_size=10)], input_key=None)
    trainer = make_trainer(limit_train_batches=2, callbacks=[KNNProbe(k=3, num_classes=NUM_CLASSES)])
    trainer.fit(module, unlabelled)
    assert all(isinstance(b, torch.Tensor) for b in seen) and len(seen) == 2
    assert "val/knn_student_acc" in trainer.callback_metrics
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        unlabelled.labelled_dataloader("predict")
