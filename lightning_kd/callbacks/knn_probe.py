"""KNNProbe: how well the student's embeddings separate the classes, measured without labels in training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_kd.model_io import BatchKey, call_model, select

__all__ = ["KNNProbe", "embed_dataset", "linear_probe_accuracy", "weighted_knn_scores"]


def weighted_knn_scores(
    query: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    r"""Class scores of a weighted k-nearest-neighbour classifier on cosine similarity.

    Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", CVPR 2018 (the k-NN evaluation that SEED, Fang et al., ICLR 2021, and DINO,
    Caron et al., ICCV 2021, report): with :math:`s_{ij}` the cosine similarity of query :math:`i`
    to reference :math:`j` and :math:`\mathcal{N}_k(i)` the :math:`k` most similar references,

    .. math:: \mathrm{score}_{ic} = \sum_{j \in \mathcal{N}_k(i),\ y_j = c} \exp(s_{ij} / T).

    The prediction is the arg-max over classes. Hand-written: torchmetrics has no k-NN classifier.
    The similarities are computed ``chunk_size`` queries at a time (memory
    ``chunk_size * len(reference)``); ``k`` is capped at the number of references.

    Args:
        query: ``(Q, D)`` embeddings to classify.
        reference: ``(R, D)`` labelled embeddings.
        reference_labels: ``(R,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        k: neighbours that vote (20 in DINO; Wu et al. use 200).
        temperature: :math:`T > 0` of the vote weights (0.07 in both).
        chunk_size: queries per similarity block.

    Returns:
        ``(Q, num_classes)`` float32 scores.
    """
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"Expected (Q, D) queries and (R, D) references of the same width D, got {tuple(query.shape)} "
            f"and {tuple(reference.shape)}."
        )
    if reference_labels.shape != (reference.shape[0],) or reference_labels.is_floating_point():
        raise ValueError(
            f"reference_labels must be ({reference.shape[0]},) integer labels, one per reference, got "
            f"{tuple(reference_labels.shape)} of dtype {reference_labels.dtype}."
        )
    if reference.shape[0] == 0:
        raise ValueError("The k-NN classifier needs at least one labelled reference embedding, got none.")
    if not temperature > 0 or k < 1 or chunk_size < 1:
        raise ValueError(
            f"Need temperature > 0, k >= 1 and chunk_size >= 1, got {temperature}, {k}, {chunk_size}."
        )
    k = min(k, reference.shape[0])
    reference = F.normalize(reference.float(), dim=1)
    labels = reference_labels.long().to(reference.device)
    scores = []
    for chunk in F.normalize(query.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ reference.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, labels[neighbours], (similarity / temperature).exp()))
    return torch.cat(scores) if scores else query.new_zeros(0, num_classes, dtype=torch.float32)


def linear_probe_accuracy(
    train_emb: Tensor,
    train_labels: Tensor,
    test_emb: Tensor,
    test_labels: Tensor,
    num_classes: int,
    steps: int = 100,
    weight_decay: float = 1e-4,
) -> Tensor:
    r"""Test accuracy of a logistic regression fitted on frozen embeddings (the linear probe).

    The linear evaluation protocol of self-supervised learning (SEED, Fang et al., ICLR 2021,
    section 4): a linear classifier on the frozen features. Here: features standardised with the
    training embeddings' mean and std, weights and bias from zero, full-batch L-BFGS (strong
    Wolfe line search, ``steps`` iterations) on cross-entropy + ``weight_decay`` :math:`\|W\|^2`.
    Deterministic. Hand-written in torch: scikit-learn's ``LogisticRegression`` would do the same
    but is not a dependency of the package.

    Returns:
        Scalar tensor: the fraction of ``test_emb`` classified correctly.
    """
    if train_emb.ndim != 2 or test_emb.ndim != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(
            f"Expected (N, D) train and test embeddings of the same width, got {tuple(train_emb.shape)} "
            f"and {tuple(test_emb.shape)}."
        )
    # Lightning evaluates under inference mode: leave it, and copy the (inference) embeddings out of it
    with torch.inference_mode(False), torch.enable_grad():
        x = train_emb.detach().float().clone()
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
        x = (x - mean) / std
        y = train_labels.long().to(x.device).clone()
        classifier = nn.Linear(x.shape[1], num_classes).to(x.device)
        nn.init.zeros_(classifier.weight)
        nn.init.zeros_(classifier.bias)
        optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(classifier(x), y) + weight_decay * classifier.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        predictions = classifier((test_emb.float() - mean) / std).argmax(dim=1)
    return (predictions == test_labels.to(predictions.device)).float().mean()


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
    references (:func:`weighted_knn_scores`; Wu et al., CVPR 2018, as evaluated by SEED and DINO)
    and logs ``val|test/knn_student_acc``; the same for the teacher as ``val|test/knn_teacher_acc``
    (once per split for a frozen teacher, which does not change). With ``linear_probe=True`` also
    ``val|test/linear_student_acc`` and ``val|test/linear_teacher_acc`` (:func:`linear_probe_accuracy`).
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
