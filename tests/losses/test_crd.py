"""CRD: the NCE loss, the memory banks (scores, Z, momentum update), the term in a fit, and under DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lightning_kd import CRDTerm, CrossEntropyTerm, DistillationModule
from lightning_kd.data import WithIndex
from lightning_kd.losses import ContrastMemory, StepOutputs
from lightning_kd.losses.functional import crd_loss
from tests.helpers import RandomDataModule, make_trainer, small_net

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_crd.py"


def _nce_reference(scores: np.ndarray, n_data: int, eps: float = 1e-7) -> float:
    """ContrastLoss of the authors' crd/criterion.py, written out in float64."""
    batch, k = scores.shape[0], scores.shape[1] - 1
    pn = 1.0 / n_data
    total = 0.0
    for i in range(batch):
        total += np.log(scores[i, 0] / (scores[i, 0] + k * pn + eps))
        for j in range(1, k + 1):
            total += np.log(k * pn / (scores[i, j] + k * pn + eps))
    return -total / batch


def test_crd_loss_matches_the_formula_in_float64() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.rand(3, 6, generator=generator, dtype=torch.float64) * 0.5 + 1e-3
    teacher = torch.rand(3, 6, generator=generator, dtype=torch.float64) * 0.5 + 1e-3
    expected = _nce_reference(student.numpy(), 40) + _nce_reference(teacher.numpy(), 40)
    result = crd_loss(student, teacher, num_samples=40)
    assert result.dtype == torch.float32 and result.ndim == 0
    assert result.item() == pytest.approx(expected, rel=1e-5)
    # one direction: the same scores twice, halved
    assert (crd_loss(student, student, 40) / 2).item() == pytest.approx(
        _nce_reference(student.numpy(), 40), rel=1e-5
    )


def test_crd_loss_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1 \+ K\).*\(4, 1\)"):
        crd_loss(torch.ones(4, 1), torch.ones(4, 1), 10)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
        crd_loss(torch.ones(4, 3), torch.ones(4, 5), 10)
    with pytest.raises(ValueError, match="num_samples"):
        crd_loss(torch.ones(4, 3), torch.ones(4, 3), 0)


def test_memory_initialisation_and_state_dict_round_trip() -> None:
    memory = ContrastMemory(num_samples=10, feat_dim=6)
    bound = 1 / np.sqrt(6 / 3)
    for bank in (memory.memory_student, memory.memory_teacher):
        assert bank.shape == (10, 6) and bank.dtype == torch.float32
        assert bank.abs().max() <= bound and bank.min() < 0 < bank.max()
    assert not torch.equal(memory.memory_student, memory.memory_teacher)
    assert memory.z_student.item() == -1 and memory.z_teacher.item() == -1
    state = memory.state_dict()
    assert set(state) == {"memory_student", "memory_teacher", "z_student", "z_teacher"}

    memory.score(*_unit(2, 6, 6), memory.sample(torch.tensor([1, 2]), 4))  # sets Z
    memory.update(torch.tensor([1, 2]), *_unit(2, 6, 7))
    restored = ContrastMemory(num_samples=10, feat_dim=6)
    restored.load_state_dict(memory.state_dict())
    for name, tensor in memory.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def _unit(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, rows, dim, generator=generator)
    return a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)


def test_scores_match_hand_computation_and_z_is_estimated_once() -> None:
    n, dim, tau = 12, 5, 0.07
    memory = ContrastMemory(n, dim, temperature=tau)
    bank_s, bank_t = memory.memory_student.double().numpy(), memory.memory_teacher.double().numpy()
    student, teacher = _unit(3, dim, 0)
    contrast = torch.tensor([[0, 5, 7, 11], [4, 1, 2, 3], [9, 9, 0, 6]])
    s_scores, t_scores = memory.score(student, teacher, contrast)

    c = contrast.numpy()
    s, t = student.double().numpy(), teacher.double().numpy()
    raw_s = np.exp(np.einsum("ikd,id->ik", bank_t[c], s) / tau)  # student anchor, teacher memory
    raw_t = np.exp(np.einsum("ikd,id->ik", bank_s[c], t) / tau)  # teacher anchor, student memory
    z_s, z_t = raw_s.mean() * n, raw_t.mean() * n
    assert memory.z_student.item() == pytest.approx(z_s, rel=1e-5)
    assert memory.z_teacher.item() == pytest.approx(z_t, rel=1e-5)
    np.testing.assert_allclose(s_scores.numpy(), raw_s / z_s, rtol=1e-5)
    np.testing.assert_allclose(t_scores.numpy(), raw_t / z_t, rtol=1e-5)

    # Z stays fixed: later batches are divided by the first batch's estimate
    student2, teacher2 = _unit(3, dim, 1)
    s_scores2, _ = memory.score(student2, teacher2, contrast)
    assert memory.z_student.item() == pytest.approx(z_s, rel=1e-5)
    raw_s2 = np.exp(np.einsum("ikd,id->ik", bank_t[c], student2.double().numpy()) / tau)
    np.testing.assert_allclose(s_scores2.numpy(), raw_s2 / z_s, rtol=1e-5)


def test_update_is_momentum_then_renormalisation() -> None:
    n, dim, momentum = 8, 4, 0.5
    memory = ContrastMemory(n, dim, momentum=momentum)
    before_s, before_t = memory.memory_student.clone(), memory.memory_teacher.clone()
    student, teacher = _unit(3, dim, 2)
    indices = torch.tensor([6, 1, 3])
    memory.update(indices, student, teacher)
    for bank, before, emb in (
        (memory.memory_student, before_s, student),
        (memory.memory_teacher, before_t, teacher),
    ):
        old, new = before.double().numpy(), emb.double().numpy()
        for row, i in enumerate(indices.tolist()):
            mixed = momentum * old[i] + (1 - momentum) * new[row]
            np.testing.assert_allclose(bank[i].numpy(), mixed / np.linalg.norm(mixed), rtol=1e-6)
        untouched = [i for i in range(n) if i not in indices.tolist()]
        assert torch.equal(bank[untouched], before[untouched])

    # a repeated index is applied once, from its last occurrence
    memory = ContrastMemory(n, dim, momentum=momentum)
    before = memory.memory_student.clone()
    memory.update(torch.tensor([2, 2]), student[:2], teacher[:2])
    mixed = momentum * before[2].double() + (1 - momentum) * student[1].double()
    torch.testing.assert_close(memory.memory_student[2].double(), mixed / mixed.norm(), rtol=1e-6, atol=1e-7)


def test_negatives_exclude_the_positive() -> None:
    memory = ContrastMemory(num_samples=20, feat_dim=4)
    indices = torch.tensor([0, 7, 19])
    contrast = memory.sample(indices, 19)  # all other samples, each once
    assert contrast.shape == (3, 20)
    assert torch.equal(contrast[:, 0], indices)
    for row, i in zip(contrast, indices.tolist(), strict=True):
        assert sorted(row[1:].tolist()) == [j for j in range(20) if j != i]
    contrast = memory.sample(indices, 50)  # more than there are: with replacement
    assert contrast.shape == (3, 51)
    assert not (contrast[:, 1:] == indices.unsqueeze(1)).any()
    assert contrast.min() >= 0 and contrast.max() < 20


def _outputs(student: torch.Tensor, teacher: torch.Tensor, batch: object) -> StepOutputs:
    return StepOutputs(
        torch.zeros(student.shape[0], 4),
        student_features={"s": student},
        teacher_features={"t": teacher},
        batch=batch,
    )


def _built_term(**kwargs: object) -> CRDTerm:
    term = CRDTerm("s", "t", num_samples=20, feat_dim=8, num_negatives=6, **kwargs)
    term.build(_outputs(torch.randn(4, 3, 2), torch.randn(4, 10), (None, None, torch.arange(4))))
    return term


def test_term_gradients_reach_student_and_heads_not_teacher_and_update_only_in_training() -> None:
    term = _built_term()
    assert term.embed_student.linear.in_features == 6 and term.embed_teacher.linear.in_features == 10
    student = torch.randn(4, 3, 2, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    indices = torch.tensor([3, 17, 0, 9])
    before = term.memory.memory_student.clone()
    loss = term(_outputs(student, teacher, (student, None, indices)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    assert term.embed_student.linear.weight.grad is not None
    assert term.embed_teacher.linear.weight.grad is not None
    changed = (term.memory.memory_student != before).any(dim=1)
    assert changed.nonzero().flatten().tolist() == sorted(indices.tolist())
    assert term.memory.z_student.item() > 0 and term.memory.z_teacher.item() > 0

    term.eval()
    frozen = term.memory.memory_student.clone()
    term(_outputs(student.detach(), teacher, (student, None, indices)))
    assert torch.equal(term.memory.memory_student, frozen)


def test_term_loss_is_crd_loss_of_the_memory_scores() -> None:
    term = _built_term()
    student, teacher = torch.randn(4, 3, 2), torch.randn(4, 10)
    indices = torch.tensor([1, 2, 3, 4])
    fixed = torch.tensor([[1, 5, 6], [2, 7, 8], [3, 9, 10], [4, 11, 12]])
    term.memory.sample = lambda idx, k: fixed  # type: ignore[method-assign]
    reference = ContrastMemory(20, 8)
    reference.load_state_dict(term.memory.state_dict())
    loss = term(_outputs(student, teacher, (student, None, indices)))
    with torch.no_grad():
        s_emb, t_emb = term.embed_student(student), term.embed_teacher(teacher)
    expected = crd_loss(*reference.score(s_emb, t_emb, fixed), 20)
    torch.testing.assert_close(loss.detach(), expected)


def test_missing_or_bad_indices_are_clear_errors() -> None:
    term = _built_term()
    student, teacher = torch.randn(4, 3, 2), torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"sequence of 2 items.*index_key=2.*WithIndex"):
        term(_outputs(student, teacher, (student, torch.zeros(4))))
    with pytest.raises(ValueError, match=r"keys \['signal', 'label'\].*WithIndex.*index_key='index'"):
        term(_outputs(student, teacher, {"signal": student, "label": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"num_samples=20.*from 0 to 20"):
        term(_outputs(student, teacher, (student, None, torch.tensor([0, 1, 2, 20]))))
    with pytest.raises(ValueError, match="dtype torch.float32; expected integers"):
        term(_outputs(student, teacher, (student, None, torch.zeros(4))))
    with pytest.raises(ValueError, match=r"teacher layer 't'.*\(4, 12\).*built for 10"):
        term(_outputs(student, torch.randn(4, 12), (student, None, torch.arange(4))))
    with pytest.raises(ValueError, match="same batch size"):
        term(_outputs(student, torch.randn(3, 10), (student, None, torch.arange(4))))
    dict_term = _built_term(index_key="index")
    dict_term(_outputs(student, teacher, {"signal": student, "index": torch.arange(4)}))


def test_bf16_autocast_gives_a_float32_loss() -> None:
    term = _built_term()
    student, teacher = torch.randn(4, 3, 2), torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = term(_outputs(student.bfloat16(), teacher.bfloat16(), (student, None, torch.arange(4))))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


class IndexedDataModule(RandomDataModule):
    def _dataset(self) -> Dataset:
        return WithIndex(super()._dataset())


class Snapshot(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        self.initial = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _crd_module() -> DistillationModule:
    crd = CRDTerm("2", "2", num_samples=64, feat_dim=8, num_negatives=8)  # after the ReLUs: 16 and 32
    return DistillationModule(small_net(hidden=16), small_net(hidden=32), losses=[CrossEntropyTerm(), crd])


def test_fit_trains_student_and_heads_updates_memory_and_checkpoints_it(tmp_path: Path) -> None:
    module = _crd_module()
    snapshot = Snapshot()
    trainer = make_trainer(callbacks=[snapshot])
    trainer.fit(module, datamodule=IndexedDataModule())
    assert "train/loss_crd" in trainer.callback_metrics
    state = module.state_dict()
    changed = {k for k, v in snapshot.initial.items() if not torch.equal(v, state[k])}
    assert {
        "loss_terms.crd.embed_student.linear.weight",
        "loss_terms.crd.embed_teacher.linear.weight",
        "student.0.weight",
        "loss_terms.crd.memory.memory_student",
        "loss_terms.crd.memory.memory_teacher",
        "loss_terms.crd.memory.z_student",
    } <= changed
    assert not any(k.startswith("teacher.") for k in changed)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.loss_terms["crd"].parameters()} <= optimized
    memory = module.loss_terms["crd"].memory
    # one epoch visits all 64 samples: every row was updated and renormalised
    torch.testing.assert_close(memory.memory_student.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(memory.memory_teacher.norm(dim=1), torch.ones(64))

    # the banks and Z are in the checkpoint and restore exactly
    trainer.save_checkpoint(tmp_path / "crd.ckpt")
    saved = torch.load(tmp_path / "crd.ckpt", weights_only=True)
    restored = _crd_module()
    restored.build_terms(next(iter(IndexedDataModule().train_dataloader())))
    assert not torch.equal(restored.loss_terms["crd"].memory.memory_student, memory.memory_student)
    restored.on_load_checkpoint(saved)
    restored.load_state_dict(saved["state_dict"])
    for name, tensor in memory.state_dict().items():
        assert torch.equal(restored.loss_terms["crd"].memory.state_dict()[name], tensor), name


def test_fit_without_index_in_the_batch_says_how_to_add_it() -> None:
    with pytest.raises(ValueError, match="WithIndex"):
        make_trainer().fit(_crd_module(), datamodule=RandomDataModule())


def test_ddp_every_rank_applies_every_update(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(rank["global_step"] == 4 for rank in ranks)  # 128 samples / 2 processes / batch 16
    # the ranks trained on disjoint halves of the data ...
    seen = [set(rank["seen"].tolist()) for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 64 and not seen[0] & seen[1]
    for rank in ranks:
        for name in ("memory_student", "memory_teacher"):
            final, initial = rank["memory"][name], rank["initial"][name]
            # ... yet on each rank every one of the 128 rows was updated (and renormalised)
            assert (final != initial).any(dim=1).all(), name
            torch.testing.assert_close(final.norm(dim=1), torch.ones(128))
    for name, tensor in ranks[0]["memory"].items():  # identical copies, Z included
        assert torch.equal(tensor, ranks[1]["memory"][name]), name
        assert torch.equal(ranks[0]["initial"][name], ranks[1]["initial"][name]), name
    for name, tensor in ranks[0]["student"].items():
        torch.testing.assert_close(tensor, ranks[1]["student"][name], rtol=0, atol=1e-6)


def test_memory_banks_are_left_out_of_ddp_buffer_broadcast() -> None:
    term = CRDTerm("2", "2", num_samples=32, num_negatives=4)
    module = DistillationModule(small_net(), small_net(), losses=[CrossEntropyTerm(), term])
    batch = (torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    module.build_terms(batch)
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    banks = {f"loss_terms.crd.{name}" for name, _ in term.named_buffers()}
    assert banks and banks <= ignored
    assert not any(name.startswith("loss_terms.crd.embed") for name in ignored)  # heads are synced by DDP
    assert any(name.startswith("teacher.") for name in ignored)
