"""Deep mutual learning: each peer's loss, gradients, logging, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import MutualLearningModule
from tests.helpers import RandomDataModule, make_trainer, small_net


def _kl64(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of sum_c p log(p / q), with p, q softmax at T, in float64 by hand."""
    p = torch.exp(p_logits.double() / temperature)
    p = p / p.sum(dim=1, keepdim=True)
    q = torch.exp(q_logits.double() / temperature)
    q = q / q.sum(dim=1, keepdim=True)
    return temperature**2 * (p * (p.log() - q.log())).sum(dim=1).mean()


def _ce64(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs = logits.double() - logits.double().exp().sum(dim=1, keepdim=True).log()
    return -log_probs[torch.arange(len(targets)), targets].mean()


def test_peer_losses_match_a_float64_hand_computation() -> None:
    module = MutualLearningModule([small_net(), small_net(), small_net()], temperature=2.0, ce_weight=0.7)
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) * 3 for _ in range(3)]
    targets = torch.tensor([0, 1, 2, 3, 1])
    losses = module.peer_losses(logits, targets)
    for k in range(3):
        others = [_kl64(logits[j], logits[k], 2.0) for j in range(3) if j != k]
        expected = 0.7 * _ce64(logits[k], targets) + 1.0 * sum(others) / 2
        torch.testing.assert_close(losses[k].double(), expected, rtol=1e-5, atol=1e-6)


def test_every_peer_gets_exactly_the_gradient_of_its_own_loss() -> None:
    peers = [small_net(batchnorm=False), small_net(hidden=8, batchnorm=False)]
    module = MutualLearningModule(peers)
    inputs, targets = torch.randn(6, 8), torch.randint(0, 4, (6,))
    logits = [peer(inputs) for peer in module.peers]
    losses = module.peer_losses(logits, targets)
    # the optimizer sees the sum of the peers' losses
    summed = torch.autograd.grad(sum(losses), list(module.parameters()), retain_graph=True)
    for k, peer in enumerate(module.peers):
        own = torch.autograd.grad(losses[k], list(peer.parameters()), retain_graph=True)
        offset = sum(len(list(p.parameters())) for p in list(module.peers)[:k])
        for got, want in zip(summed[offset : offset + len(own)], own, strict=True):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want)


def test_fit_logs_every_peer_and_checkpoints_hold_them_all(tmp_path: Path) -> None:
    module = MutualLearningModule([small_net(), small_net(hidden=32), small_net(hidden=8)])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="dml", enable_version_counter=False)
    trainer = make_trainer(max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=RandomDataModule())
    assert all(not torch.equal(b, a) for b, a in zip(before, module.parameters(), strict=True))
    logged = trainer.callback_metrics
    for name in ("val/acc_peer0", "val/acc_peer1", "val/acc_peer2", "val/acc_ensemble", "val/acc"):
        assert name in logged, name
    assert logged["val/acc"] == logged["val/acc_peer0"]
    assert {"train/loss_peer0", "train/loss_peer2", "train/loss"} <= set(logged)

    state = torch.load(tmp_path / "dml.ckpt", weights_only=True)["state_dict"]
    restored = MutualLearningModule([small_net(), small_net(hidden=32), small_net(hidden=8)])
    restored.load_state_dict(state)
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert any(k.startswith("peers.2.") for k in state)


def test_a_single_peer_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least two peers"):
        MutualLearningModule([small_net()])
    with pytest.raises(ValueError, match="same classes"):
        MutualLearningModule([small_net(), small_net(num_classes=3)])
