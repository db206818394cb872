"""The reports' own math: tensors in, numbers out, no Lightning.

What the report callbacks of :mod:`lightning_kd.callbacks.report` measure, as plain functions:
representation similarity (:func:`linear_cka`), how soft the teacher's soft labels are
(:func:`soft_label_entropy`, :func:`non_argmax_probability`), calibration and per-class accuracy
(:func:`reliability_bins`, :func:`per_class_accuracy`) and how well embeddings separate the
classes (:func:`weighted_knn_scores`, :func:`linear_probe_accuracy`).

:func:`linear_cka`, :func:`soft_label_entropy` and :func:`non_argmax_probability` run in float32,
also under ``bf16-mixed`` / ``16-mixed`` autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.losses._checks import _check_num_classes, _check_positive
from lightning_kd.precision import float32_math

__all__ = [
    "linear_cka",
    "linear_probe_accuracy",
    "non_argmax_probability",
    "per_class_accuracy",
    "reliability_bins",
    "soft_label_entropy",
    "weighted_knn_scores",
]


@float32_math
def linear_cka(features_x: Tensor, features_y: Tensor) -> Tensor:
    r"""Linear centered kernel alignment (CKA): how similar two representations of the same samples are.

    Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited",
    ICML 2019. With :math:`X` ``(N, D_x)`` and :math:`Y` ``(N, D_y)`` the two layers' outputs on
    the same :math:`N` samples (flattened per sample), each column-centred:

    .. math::
        \mathrm{CKA}(X, Y) = \frac{\|Y^\top X\|_F^2}{\|X^\top X\|_F \, \|Y^\top Y\|_F}

    It lies in :math:`[0, 1]`, is 1 for :math:`X = Y`, does not change under an orthogonal
    transform or an isotropic scaling of either representation, and compares layers of
    different widths. When :math:`N` is small against the widths, the same number is computed
    from the :math:`N \times N` Gram matrices :math:`K = XX^\top, L = YY^\top` as
    :math:`\langle K, L\rangle_F / (\|K\|_F \|L\|_F)` (as :math:`\|Y^\top X\|_F^2 = \mathrm{tr}(KL)`),
    whichever needs fewer multiplications.

    Args:
        features_x: ``(N, ...)`` outputs of one layer; everything after dim 0 is flattened.
        features_y: ``(N, ...)`` outputs of another layer on the same samples.

    Returns:
        Scalar in :math:`[0, 1]`; NaN when either representation is the same for every sample
        (nothing is left after centring).
    """
    if features_x.ndim == 0 or features_y.ndim == 0 or features_x.shape[0] != features_y.shape[0]:
        raise ValueError(
            f"features_x has shape {tuple(features_x.shape)} but features_y has shape "
            f"{tuple(features_y.shape)}: CKA compares two representations of the same samples, so both "
            "need the same number of samples in the first dimension."
        )
    if features_x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 samples to centre the features, got {features_x.shape[0]}.")
    x = features_x.reshape(features_x.shape[0], -1)
    y = features_y.reshape(features_y.shape[0], -1)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, width_x, width_y = x.shape[0], x.shape[1], y.shape[1]
    if n * (width_x + width_y) < width_x**2 + width_y**2 + width_x * width_y:
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = (gram_x * gram_y).sum()
        return cross / (torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y))
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))


def _check_soft_label_input(logits: Tensor, temperature: float, minimum_classes: int, why: str) -> None:
    """A positive temperature, and at least ``minimum_classes`` scores in the last dimension."""
    _check_positive("temperature", temperature)
    _check_num_classes(logits, minimum_classes, why)


@float32_math
def soft_label_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Mean Shannon entropy, in nats, of temperature-softened predictions: how soft the soft labels are.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015: raising the
    temperature :math:`T` of :math:`p = \mathrm{softmax}(z / T)` spreads probability onto the
    non-target classes. With :math:`H(p) = -\sum_c p_c \log p_c`, the entropy is 0 for a one-hot
    prediction, :math:`\log C` for a uniform one, and grows towards :math:`\log C` with :math:`T`.
    Computed by :class:`torch.distributions.Categorical`.

    Args:
        logits: ``(..., C)`` logits (e.g. the teacher's).
        temperature: :math:`T > 0`.

    Returns:
        Scalar in :math:`[0, \log C]`: the entropy averaged over all leading positions (the mean
        over samples for ``(N, C)``).
    """
    _check_soft_label_input(logits, temperature, 1, "(one score per class)")
    return torch.distributions.Categorical(logits=logits / temperature).entropy().mean()


@float32_math
def non_argmax_probability(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Mean probability that a softened prediction gives each class other than its top-1 ("dark knowledge").

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 call the
    relative probabilities of the wrong classes the dark knowledge that soft labels carry. With
    :math:`p = \mathrm{softmax}(z / T)` over :math:`C` classes, per sample
    :math:`(1 - \max_c p_c) / (C - 1)`: 0 for a one-hot prediction, :math:`1 / C` for a uniform one.

    Args:
        logits: ``(..., C)`` logits, ``C >= 2``.
        temperature: :math:`T > 0`.

    Returns:
        Scalar in :math:`[0, 1 / C]`: averaged over all leading positions.
    """
    _check_soft_label_input(logits, temperature, 2, "(a top-1 class and at least one other)")
    top = F.softmax(logits / temperature, dim=-1).amax(dim=-1)
    return ((1 - top) / (logits.shape[-1] - 1)).mean()


def reliability_bins(probs: Tensor, targets: Tensor, num_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Mean confidence, accuracy and sample count per confidence bin (a reliability diagram's bars).

    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017: samples are binned by
    their top-1 probability into ``num_bins`` equal-width bins of (0, 1]; empty bins give NaN.
    The expected calibration error itself comes from torchmetrics.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        targets: ``(N,)`` class indices.
        num_bins: number of confidence bins.

    Returns:
        ``(mean_confidence, accuracy, counts)``, each ``(num_bins,)``.
    """
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, num_bins + 1, device=probs.device)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, num_bins - 1)
    counts = torch.bincount(index, minlength=num_bins).float()
    mean_confidence = torch.bincount(index, weights=confidence, minlength=num_bins) / counts
    accuracy = torch.bincount(index, weights=correct, minlength=num_bins) / counts
    return mean_confidence, accuracy, counts


def per_class_accuracy(logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Top-1 accuracy of each class (recall: the share of its samples predicted as it), torchmetrics.

    Args:
        logits: ``(N, C)`` logits (or probabilities).
        targets: ``(N,)`` class indices.
        num_classes: ``C``.

    Returns:
        ``(num_classes,)`` on the CPU; a class without samples gets 0 (torchmetrics'
        ``MulticlassAccuracy`` with ``average=None``).
    """
    return MulticlassAccuracy(num_classes, average=None).to(logits.device)(logits, targets).cpu()


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

    Args:
        train_emb: ``(N, D)`` embeddings the classifier is fitted on.
        train_labels: ``(N,)`` their class indices.
        test_emb: ``(M, D)`` embeddings it is evaluated on.
        test_labels: ``(M,)`` their class indices.
        num_classes: number of classes.
        steps: L-BFGS iterations.
        weight_decay: factor of the squared-weight penalty.

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
