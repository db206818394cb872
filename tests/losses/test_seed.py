"""SEED: the loss and its queue, label-free training, the recipe, DDP."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.cli import main
from lightning_kd.losses import SEEDTerm, StepOutputs, functional
from lightning_kd.paradigms import EmbeddingDistillationModule
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import TINY_MNIST1D_FIT, RandomDataModule, make_trainer, seed_module

CONFIGS = RECIPES_DIR / "mnist1d"


def seed_loss_float64(
    s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float
) -> float:
    """Sample by sample, as KL(p_T || p_S) + H(p_T), in float64."""
    total = 0.0
    for si, ti in zip(s.double(), t.double(), strict=True):
        si, ti = si / si.norm(), ti / ti.norm()
        candidates = torch.cat([ti[None], queue.double()])
        p_t = torch.softmax(candidates @ ti / tau_t, dim=0)
        p_s = torch.softmax(candidates @ si / tau_s, dim=0)
        kl = (p_t * (p_t.clamp_min(1e-300).log() - p_s.log())).sum()
        entropy = -(p_t * p_t.clamp_min(1e-300).log()).sum()
        total += float(kl + entropy)
    return total / len(s)


def test_seed_loss_matches_an_independent_float64_computation() -> None:
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    queue = F.normalize(torch.randn(7, 4), dim=1)
    for tau_s, tau_t in ((0.2, 0.01), (0.5, 0.5), (1.0, 0.1)):
        expected = seed_loss_float64(s, t, queue, tau_s, tau_t)
        assert functional.seed_loss(s, t, queue, tau_s, tau_t).item() == pytest.approx(expected, rel=1e-4)


def test_seed_loss_by_hand() -> None:
    # teacher (1, 0), student (0, 1), queue [(0, 1)], both temperatures 1:
    # teacher scores [1, 0] -> p_T = [e, 1] / (e + 1)
    # student scores [0, 1] -> log p_S = [-log(1 + e), 1 - log(1 + e)]
    t, s, queue = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    e = math.e
    expected = -(e / (e + 1) * -math.log(1 + e) + 1 / (e + 1) * (1 - math.log(1 + e)))
    assert functional.seed_loss(s, t, queue, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # identical student and teacher with equal temperatures: the cross-entropy is the entropy of p_T
    q = F.normalize(torch.randn(9, 3), dim=1)
    z = torch.randn(4, 3)
    p_t = torch.softmax(torch.cat([torch.ones(4, 1), F.normalize(z, dim=1) @ q.T], dim=1) / 0.3, dim=1)
    entropy = -(p_t * p_t.log()).sum(dim=1).mean()
    assert functional.seed_loss(z, z, q, 0.3, 0.3).item() == pytest.approx(entropy.item(), rel=1e-5)
    # an empty queue leaves one candidate: the loss is 0
    assert functional.seed_loss(z, z + 1, torch.zeros(0, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_seed_loss_gradient_reaches_the_student_only() -> None:
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    queue = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    functional.seed_loss(s, t, queue).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and queue.grad is None


def test_seed_loss_bad_input() -> None:
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="projection head"):
        functional.seed_loss(z, torch.randn(2, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"expected \(K, D=4\)"):
        functional.seed_loss(z, z, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        functional.seed_loss(z, z, torch.zeros(3, 4), teacher_temperature=0.0)
    with pytest.raises(ValueError, match="queue_size"):
        SEEDTerm(queue_size=0)
    with pytest.raises(ValueError, match="temperature"):
        SEEDTerm(student_temperature=-1.0)
    term = SEEDTerm(queue_size=4, embedding_dim=3)
    with pytest.raises(ValueError, match="Set embedding_dim"):
        term(StepOutputs(student_logits=z, teacher_logits=z))
    with pytest.raises(ValueError, match="projection"):
        term(StepOutputs(student_logits=torch.randn(2, 3), teacher_logits=torch.randn(2, 4)))


def test_queue_is_fifo_and_wraps_around() -> None:
    term = SEEDTerm(queue_size=5, embedding_dim=2)
    first, second = torch.randn(3, 2) * 4, torch.randn(3, 2)
    term.enqueue(first)
    assert torch.allclose(term.queue[:3], F.normalize(first, dim=1)) and int(term.queue_pointer) == 3
    before = term.queue.clone()
    term.enqueue(second)  # rows 3, 4, then 0
    assert torch.allclose(term.queue[[3, 4, 0]], F.normalize(second, dim=1))
    assert torch.equal(term.queue[1:3], before[1:3]) and int(term.queue_pointer) == 1
    many = torch.randn(7, 2)  # more than the queue: as if written in turn from row 1, the last 5 remain
    term.enqueue(many)
    assert torch.allclose(term.queue[[3, 4, 0, 1, 2]], F.normalize(many[2:], dim=1))
    assert int(term.queue_pointer) == (1 + 7) % 5


def test_queue_is_sized_on_first_use_and_untouched_outside_training() -> None:
    term = SEEDTerm(queue_size=8)
    assert not term.queue_ready
    outputs = StepOutputs(student_logits=torch.randn(3, 5), teacher_logits=torch.randn(3, 5))
    term.eval()
    term(outputs)
    assert term.queue.shape == (8, 5) and torch.allclose(term.queue.norm(dim=1), torch.ones(8))
    queue = term.queue.clone()
    term(outputs)
    assert torch.equal(term.queue, queue) and int(term.queue_pointer) == 0
    term.train()
    term(outputs)
    assert torch.allclose(term.queue[:3], F.normalize(outputs.teacher_logits, dim=1))
    assert int(term.queue_pointer) == 3


def test_validation_does_not_touch_the_queue(datamodule: RandomDataModule) -> None:
    module = seed_module()
    make_trainer(limit_train_batches=2).fit(module, datamodule)
    term = module.loss_terms["seed"]
    queue, pointer = term.queue.clone(), int(term.queue_pointer)
    assert pointer == 32 % 10  # two batches of 16 enqueued
    make_trainer().validate(module, datamodule)
    assert torch.equal(term.queue, queue) and int(term.queue_pointer) == pointer


def test_queue_is_loaded_into_an_unsized_term_and_a_resumed_run_continues_exactly(
    datamodule: RandomDataModule, tmp_path: Path
) -> None:
    data = TensorDataset(datamodule.x, datamodule.y)

    def fit(epochs: int, ckpt_path: str | None = None) -> EmbeddingDistillationModule:
        torch.manual_seed(0)
        module = seed_module()
        trainer = make_trainer(max_epochs=epochs, enable_checkpointing=True, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / f"{epochs}.ckpt")
        return module

    straight = fit(2)
    fit(1)
    resumed = fit(2, ckpt_path=str(tmp_path / "1.ckpt"))
    for name in ("queue", "queue_pointer"):
        assert torch.equal(
            getattr(resumed.loss_terms["seed"], name), getattr(straight.loss_terms["seed"], name)
        )
    for (name, value), other in zip(
        straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True
    ):
        assert torch.allclose(value, other), name
    # a term that has not seen an embedding yet takes the saved queue's width
    checkpoint = torch.load(tmp_path / "2.ckpt", weights_only=True)
    fresh = seed_module()
    fresh.on_load_checkpoint(checkpoint)  # adds the frozen teacher, left out of the file
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.loss_terms["seed"].queue, straight.loss_terms["seed"].queue)


def _tiny(override: str) -> str:
    return override.replace("--data.init_args.", "--data.init_args.datamodule.init_args.")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose runs/ holds a (briefly) trained teacher."""
    root = tmp_path_factory.mktemp("self_supervised")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *TINY_MNIST1D_FIT])
    return root


@pytest.mark.parametrize("name", ["seed", "cosine"])
def test_recipe_fits_without_labels_and_reports_knn(
    name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    config = CONFIGS / "self_supervised" / f"{name}.yaml"
    main(["fit", "--config", str(config), *map(_tiny, TINY_MNIST1D_FIT)])
    header = (workdir / f"runs/mnist1d/{name}/version_0/metrics.csv").read_text().splitlines()[0]
    for column in (f"train/loss_{name}", "val/cosine", "val/knn_student_acc", "val/knn_teacher_acc"):
        assert column in header, column
    checkpoint = workdir / f"runs/mnist1d/{name}/latest.ckpt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    restored = EmbeddingDistillationModule.load_from_checkpoint(checkpoint)
    assert torch.equal(restored.student.classifier.weight, state["student.classifier.weight"])
    if name == "seed":
        assert torch.equal(restored.loss_terms["seed"].queue, state["loss_terms.seed.queue"])
        assert int(state["loss_terms.seed.queue_pointer"]) == 2 * 128  # two batches enqueued


def test_ddp_ranks_share_one_queue_of_every_rank_s_teacher_embeddings(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "ddp_seed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(rank["global_step"] == 4 for rank in ranks)  # 64 samples / 2 processes / batch 8
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert int(ranks[0]["pointer"]) == 0  # 64 keys written into a 64-row queue: wrapped once
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).double()
    teacher.load_state_dict(ranks[0]["teacher"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(teacher(ranks[0]["inputs"].double()), dim=1)
    # every sample's teacher embedding, whichever rank saw it, is in the queue exactly once
    distances = torch.cdist(expected, ranks[0]["queue"].double())
    assert distances.min(dim=1).values.max() < 1e-5
    assert torch.equal(distances.argmin(dim=1).sort().values, torch.arange(64))
    for name, tensor in ranks[0]["student"].items():
        torch.testing.assert_close(tensor, ranks[1]["student"][name], rtol=0, atol=1e-6)
