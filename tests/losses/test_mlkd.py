"""MLKD against float64 references: its formulas, and the authors' code transcribed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_kd import MLKDTerm
from lightning_kd.data.two_views import TwoViewBatch
from lightning_kd.losses.base import StepOutputs
from lightning_kd.losses.functional import batch_correlation_loss, class_correlation_loss, mlkd_loss
from lightning_kd.losses.mlkd import share_at_or_below_percentile
from tests.helpers import np_softmax


# --- the authors' code, transcribed literally (float64), from sunshangquan/logit-standardization-KD,
# mdistiller/distillers/MLKD.py: normalize, kd_loss, cc_loss, bc_loss and MLKD.forward_train (its loss
# part; the cross-entropy is left out, kd_loss_weight = 1). With logit_stand=False it is the original
# KD_ours.forward_train of Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py.
def normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def kd_loss(logits_student_in, logits_teacher_in, temperature, reduce=True, logit_stand=False):
    logits_student = normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    if reduce:
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    else:
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1)
    loss_kd *= temperature**2
    return loss_kd


def cc_loss(logits_student, logits_teacher, temperature, reduce=True):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    if reduce:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2).sum() / class_num
    else:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2) / class_num
    return consistency_loss


def bc_loss(logits_student, logits_teacher, temperature, reduce=True):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    if reduce:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2).sum() / batch_size
    else:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2) / batch_size
    return consistency_loss


def authors_forward_train_losses(
    logits_student_weak,
    logits_teacher_weak,
    logits_student_strong,
    logits_teacher_strong,
    temperature,
    logit_stand,
):
    """MLKD.forward_train from the line ``pred_teacher_weak = ...`` to ``losses_dict``, kd weight 1."""
    kd_loss_weight = 1.0
    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)
    confidence, pseudo_labels = pred_teacher_weak.max(dim=1)
    confidence = confidence.detach()
    conf_thresh = np.percentile(confidence.cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0)
    class_confidence = class_confidence.detach()
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    w, tw, s, ts = logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong
    loss_kd_weak = sum(
        kd_loss_weight * ((kd_loss(w, tw, t, logit_stand=logit_stand) * mask).mean())
        for t in (temperature, 3.0, 5.0, 2.0, 6.0)
    )
    loss_kd_strong = (
        kd_loss_weight * kd_loss(s, ts, temperature, logit_stand=logit_stand)
        + kd_loss_weight * kd_loss(s, ts, 3.0, logit_stand=logit_stand)
        + kd_loss_weight * kd_loss(s, ts, 5.0, logit_stand=logit_stand)
        + kd_loss_weight * kd_loss(w, tw, 2.0, logit_stand=logit_stand)
        + kd_loss_weight * kd_loss(w, tw, 6.0, logit_stand=logit_stand)
    )
    loss_cc_weak = sum(
        kd_loss_weight * ((cc_loss(w, tw, t) * class_conf_mask).mean())
        for t in (temperature, 3.0, 5.0, 2.0, 6.0)
    )
    loss_bc_weak = sum(
        kd_loss_weight * ((bc_loss(w, tw, t) * mask).mean()) for t in (temperature, 3.0, 5.0, 2.0, 6.0)
    )
    return {"loss_kd": loss_kd_weak + loss_kd_strong, "loss_cc": loss_cc_weak, "loss_bc": loss_bc_weak}


def views(n: int = 7, c: int = 10, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(n, c, generator=generator, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize(("standardize", "base"), [(False, 4.0), (True, 2.0)])
def test_mlkd_equals_the_authors_code(n: int, standardize: bool, base: float) -> None:
    logits = views(n=n, seed=n)
    expected = sum(authors_forward_train_losses(*logits, temperature=base, logit_stand=standardize).values())
    got = mlkd_loss(
        *(x.float() for x in logits), temperatures=(base, 3.0, 5.0, 2.0, 6.0), standardize=standardize
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def np_kd(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    kls = [
        np.sum(pt * np.log(pt / ps))
        for ps, pt in (
            (np_softmax(a / temperature), np_softmax(b / temperature)) for a, b in zip(s, t, strict=True)
        )
    ]
    return temperature**2 * float(np.mean(kls))


def test_correlation_levels_match_their_formulas() -> None:
    s, t = (x.numpy() for x in views(n=5, c=6)[:2])
    for temperature in (1.0, 4.0):
        p_s = np.stack([np_softmax(r / temperature) for r in s])
        p_t = np.stack([np_softmax(r / temperature) for r in t])
        batch = np.sum((p_t @ p_t.T - p_s @ p_s.T) ** 2) / 5
        classes = np.sum((p_t.T @ p_t - p_s.T @ p_s) ** 2) / 6
        got_batch = batch_correlation_loss(torch.tensor(s).float(), torch.tensor(t).float(), temperature)
        got_class = class_correlation_loss(torch.tensor(s).float(), torch.tensor(t).float(), temperature)
        assert got_batch.item() == pytest.approx(batch, rel=1e-5)
        assert got_class.item() == pytest.approx(classes, rel=1e-5)


def test_mlkd_matches_its_formula_with_every_temperature_on_the_strong_view() -> None:
    w, tw, s, ts = (x.numpy() for x in views(n=6, c=5, seed=3))
    temperatures = (1.0, 2.5)
    confidence = np.stack([np_softmax(r) for r in tw]).max(axis=1)
    mass = np.stack([np_softmax(r) for r in tw]).sum(axis=0)
    m = np.mean(confidence <= np.percentile(confidence, 30))
    c = np.mean(mass <= np.percentile(mass, 30))
    expected = 0.0
    for temperature in temperatures:
        p_w = np.stack([np_softmax(r / temperature) for r in w])
        p_tw = np.stack([np_softmax(r / temperature) for r in tw])
        bc = np.sum((p_tw @ p_tw.T - p_w @ p_w.T) ** 2) / 6
        cc = np.sum((p_tw.T @ p_tw - p_w.T @ p_w) ** 2) / 5
        expected += m * (np_kd(w, tw, temperature) + bc) + np_kd(s, ts, temperature) + c * cc
    got = mlkd_loss(
        *(torch.tensor(x).float() for x in (w, tw, s, ts)),
        temperatures=temperatures,
        percentile=30.0,
        strong_sum_as_authors=False,
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_share_at_or_below_percentile_counts_like_numpy() -> None:
    values = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7])
    assert share_at_or_below_percentile(values, 50.0).item() == pytest.approx(3 / 5)
    assert share_at_or_below_percentile(values[:4], 50.0).item() == pytest.approx(2 / 4)
    assert share_at_or_below_percentile(values, 100.0).item() == pytest.approx(1.0)


def two_view_outputs(batch: object, logits: list[torch.Tensor]) -> StepOutputs:
    w, tw, s, ts = (x.float() for x in logits)
    return StepOutputs(student_logits=torch.cat([w, s]), teacher_logits=torch.cat([tw, ts]), batch=batch)


def test_term_splits_the_two_view_batch_into_weak_then_strong_rows() -> None:
    logits = views(n=4, c=5, seed=1)
    batch = TwoViewBatch(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long))
    got = MLKDTerm(standardize=True)(two_view_outputs(batch, logits))
    expected = mlkd_loss(*(x.float() for x in logits), standardize=True)
    assert torch.equal(got, expected)


def test_term_refuses_a_batch_that_is_not_two_views() -> None:
    logits = views(n=4, c=5)
    plain = (torch.zeros(8, 1), torch.zeros(8, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"needs two-view training batches .* got a tuple\. Use a two-view datamodule"
    ):
        MLKDTerm()(two_view_outputs(plain, logits))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperatures": ()}, "at least one temperature"),
        ({"temperatures": (4.0, 0.0)}, "each MLKD temperature must be > 0"),
        ({"percentile": 101.0}, r"percentile must be in \[0, 100\], got 101.0"),
    ],
)
def test_term_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLKDTerm(**kwargs)


def test_mlkd_loss_refuses_views_of_different_sizes() -> None:
    w, tw, s, ts = (x.float() for x in views(n=4, c=5))
    with pytest.raises(ValueError, match="Both views hold the same samples"):
        mlkd_loss(w, tw, s[:3], ts[:3])
