"""KNNProbe: how well the student's embeddings separate the classes, measured without labels in training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_kd.callbacks.report.functional import linear_probe_accuracy, weighted_knn_scores
from lightning_kd.model_io import BatchKey, call_model, select

__all__ = ["KNNProbe", "embed_dataset"]


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    input_key: BatchKey = 0,
    target_key: BatchKey = 1,
    output_to_embedding: Any = None,
) -> tuple[Tensor, Tensor]:
    """``(embeddings (N, D), labels (N,))`` of all of ``loader``; ``model`` in eval mode (restored after).

    ``output_to_embedding`` maps the model's output to the ``(N, D)`` embedding (default: the output).

    Args:
        model: the network that embeds.
        loader: labelled batches.
        device: where the batches go.
        input_key: where the inputs are in a batch.
        target_key: where the labels are in a batch.
        output_to_embedding: maps the model's output to the embedding; ``None``: the output itself.
    """
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    try:
        for batch in loader:
            batch = move_data_to_device(batch, device)
            try:
                inputs, targets = (
                    select(batch, input_key, "input_key"),
                    select(batch, target_key, "target_key"),
                )
            except (KeyError, TypeError) as error:
                raise ValueError(
                    f"KNNProbe needs labelled batches (inputs at input_key={input_key!r}, labels at "
                    f"target_key={target_key!r}) but got a {type(batch).__name__} batch: {error} "
                    "Pass labelled loaders (reference_dataloader=, val_dataloader=, test_dataloader=), or "
                    "wrap an unlabelled run's datamodule in lightning_kd.data.UnlabelledDataModule, which "
                    "keeps the labels for the probe."
                ) from None
            output = call_model(model, inputs)
            embeddings.append(
                (output_to_embedding(output) if output_to_embedding else output).flatten(1).float()
            )
            labels.append(torch.as_tensor(targets, device=device).long())
    finally:
        model.train(was_training)
    if not embeddings:
        raise ValueError("KNNProbe got an empty loader: it needs at least one labelled batch.")
    return torch.cat(embeddings), torch.cat(labels)


class KNNProbe(pl.Callback):
    """Weighted k-NN accuracy (and optionally a linear probe) of the student's embeddings, and the teacher's.

    Every ``every_n_epochs`` validation epochs (not in the sanity check) and at test, embeds a
    labelled reference set (the training split) and the labelled evaluation split with the
    student, classifies each evaluation sample by a vote of its ``k`` most cosine-similar
    references (:func:`~lightning_kd.callbacks.report.functional.weighted_knn_scores`; Wu et al.,
    CVPR 2018, as evaluated by SEED and DINO) and logs ``val|test/knn_student_acc``; the same for
    the teacher as ``val|test/knn_teacher_acc`` (once per split for a frozen teacher, which does
    not change). With ``linear_probe=True`` also ``val|test/linear_student_acc`` and
    ``val|test/linear_teacher_acc``
    (:func:`~lightning_kd.callbacks.report.functional.linear_probe_accuracy`).
    The embeddings are the module's ``prediction_of`` the models' outputs (an
    :class:`~lightning_kd.EmbeddingDistillationModule`'s embeddings).

    Loaders: those given, else the datamodule's ``labelled_dataloader("train" | "val" | "test")``
    (:class:`~lightning_kd.data.UnlabelledDataModule`, whose training batches carry no labels), else
    its ``train_dataloader()`` / ``val_dataloader()`` / ``test_dataloader()``. Every process
    embeds the whole sets (the probe is meant for sets that fit on one device), so the numbers
    are the same on every process.

    Args:
        every_n_epochs: probe every this many validation epochs (and after the last one).
        k: neighbours that vote (20, DINO's choice for ImageNet; Wu et al. use 200).
        temperature: of the vote weights ``exp(similarity / T)`` (0.07 in both).
        input_key: where the inputs are in a labelled batch.
        target_key: where the labels are in a labelled batch.
        num_classes: number of classes; default: the module's ``num_classes`` if set, else the
            largest label seen + 1.
        linear_probe: also fit a logistic regression on the frozen embeddings.
        linear_probe_steps: L-BFGS iterations of the linear probe.
        reference_dataloader: labelled loader of the reference (training) set.
        val_dataloader: labelled loader evaluated in validation.
        test_dataloader: labelled loader evaluated at test.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        num_classes: int | None = None,
        linear_probe: bool = False,
        linear_probe_steps: int = 100,
        reference_dataloader: DataLoader | None = None,
        val_dataloader: DataLoader | None = None,
        test_dataloader: DataLoader | None = None,
    ) -> None:
        if every_n_epochs < 1 or k < 1 or not temperature > 0 or linear_probe_steps < 1:
            raise ValueError(
                "KNNProbe needs every_n_epochs >= 1, k >= 1, temperature > 0 and linear_probe_steps >= 1, "
                "got "
                f"{every_n_epochs}, {k}, {temperature} and {linear_probe_steps}."
            )
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = float(temperature)
        self.input_key = input_key
        self.target_key = target_key
        self.num_classes = num_classes
        self.linear_probe = linear_probe
        self.linear_probe_steps = linear_probe_steps
        self.loaders = {"train": reference_dataloader, "val": val_dataloader, "test": test_dataloader}
        self._frozen_teacher_results: dict[str, dict[str, float]] = {}

    def _loader(self, trainer: pl.Trainer, split: str) -> DataLoader:
        if self.loaders[split] is not None:
            return self.loaders[split]
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(
                f"KNNProbe has no {split} loader: pass "
                f"{'reference' if split == 'train' else split}_dataloader=, "
                "or give the Trainer a datamodule."
            )
        if hasattr(datamodule, "labelled_dataloader"):
            return datamodule.labelled_dataloader(split)
        return getattr(datamodule, f"{split}_dataloader")()

    def _scores(
        self, pl_module: pl.LightningModule, model: nn.Module, trainer: pl.Trainer, split: str
    ) -> dict[str, float]:
        def embed(name: str) -> tuple[Tensor, Tensor]:
            return embed_dataset(
                model,
                self._loader(trainer, name),
                pl_module.device,
                self.input_key,
                self.target_key,
                getattr(pl_module, "prediction_of", None),
            )

        reference, reference_labels = embed("train")
        evaluated, labels = embed(split)
        num_classes = self.num_classes or getattr(pl_module, "num_classes", None)
        if not isinstance(num_classes, int):
            num_classes = int(max(reference_labels.max(), labels.max())) + 1
        scores = weighted_knn_scores(
            evaluated, reference, reference_labels, num_classes, self.k, self.temperature
        )
        results = {"knn": (scores.argmax(dim=1) == labels).float().mean().item()}
        if self.linear_probe:
            results["linear"] = linear_probe_accuracy(
                reference, reference_labels, evaluated, labels, num_classes, self.linear_probe_steps
            ).item()
        return results

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        results = {"student": self._scores(pl_module, pl_module.student, trainer, split)}
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            frozen = getattr(pl_module, "teacher_is_frozen", False)
            if not frozen or split not in self._frozen_teacher_results:
                self._frozen_teacher_results[split] = self._scores(pl_module, teacher, trainer, split)
            results["teacher"] = self._frozen_teacher_results[split]
        for model, values in results.items():
            for kind, value in values.items():
                pl_module.log(f"{split}/{kind}_{model}_acc", value, sync_dist=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe every ``every_n_epochs`` epochs and after the last one (never in the sanity check)."""
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs:
            self._probe(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe on the test split."""
        self._probe(trainer, pl_module, "test")
