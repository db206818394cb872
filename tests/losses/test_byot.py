"""Be Your Own Teacher: the loss against float64 math, detached teachers, head shapes, the YAML recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_kd import DistillationModule
from lightning_kd.cli import main
from lightning_kd.losses import BYOTTerm, CrossEntropyTerm, StepOutputs
from lightning_kd.losses.functional import byot_loss
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import TINY_MNIST1D_FIT

CONFIG = RECIPES_DIR / "mnist1d" / "paradigms" / "byot.yaml"


def _fixed(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _byot_float64(
    shallow_logits: list[Tensor],
    shallow_features: list[Tensor],
    deep_logits: Tensor,
    deep_feature: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float,
    feature_weight: float,
) -> Tensor:
    """The BYOT formula written out with exp/log sums in float64."""

    def log_softmax(z: Tensor) -> Tensor:
        return z - z.exp().sum(dim=1, keepdim=True).log()

    z_c, f_c = deep_logits.double(), deep_feature.double()
    p_c = log_softmax(z_c / temperature).exp()
    total = torch.zeros((), dtype=torch.float64)
    for z, f in zip(shallow_logits, shallow_features, strict=True):
        z, f = z.double(), f.double()
        ce = -log_softmax(z)[torch.arange(len(target)), target].mean()
        kl = (p_c * (p_c.log() - log_softmax(z / temperature))).sum(dim=1).mean()
        hint = ((f - f_c) ** 2).reshape(len(f), -1).sum(dim=1).mean()
        total = total + (1 - alpha) * ce + alpha * temperature**2 * kl + feature_weight * hint
    return total


def test_byot_loss_matches_float64_formula() -> None:
    n, k = 6, 5
    logits = [_fixed(n, k, seed=1), 3 * _fixed(n, k, seed=2)]
    features = [_fixed(n, 4, 2, seed=3).relu(), _fixed(n, 4, 2, seed=4).relu()]
    deep_logits, deep_feature = 2 * _fixed(n, k, seed=5), _fixed(n, 4, 2, seed=6).relu()
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    settings = dict(alpha=0.3, temperature=3.0, feature_weight=0.05)
    loss = byot_loss(logits, features, deep_logits, deep_feature, target, **settings)
    expected = _byot_float64(logits, features, deep_logits, deep_feature, target, **settings)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_byot_loss_one_head_by_hand() -> None:
    """alpha = 0, two classes: CE and the hint only, small enough to write down."""
    logits, deep_logits = torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, -5.0]])
    feature, deep_feature = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    loss = byot_loss(
        [logits], [feature], deep_logits, deep_feature, torch.tensor([1]), alpha=0.0, feature_weight=0.5
    )
    # CE of uniform logits = log 2; hint = 0.5 * ((1 - 0)^2 + (2 - 4)^2) = 2.5
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() + 2.5, rel=1e-6)


def test_byot_loss_does_not_train_the_deepest_classifier() -> None:
    logits = _fixed(4, 3, seed=1).requires_grad_()
    feature = _fixed(4, 8, seed=2).requires_grad_()
    deep_logits = _fixed(4, 3, seed=3).requires_grad_()
    deep_feature = _fixed(4, 8, seed=4).requires_grad_()
    byot_loss(
        [logits], [feature], deep_logits, deep_feature, torch.tensor([0, 1, 2, 0]), alpha=1.0
    ).backward()
    assert deep_logits.grad is None and deep_feature.grad is None
    assert logits.grad.abs().sum() > 0 and feature.grad.abs().sum() > 0


def test_byot_loss_rejects_bad_inputs() -> None:
    logits, feature, target = torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="deep_feature"):
        byot_loss([logits], [torch.zeros(2, 5)], logits, feature, target)
    with pytest.raises(ValueError, match="deep_logits"):
        byot_loss([torch.zeros(2, 4)], [feature], logits, feature, target)
    with pytest.raises(ValueError, match="alpha"):
        byot_loss([logits], [feature], logits, feature, target, alpha=1.5)
    with pytest.raises(ValueError, match="one feature per shallow classifier"):
        byot_loss([logits], [], logits, feature, target)


def _module(student: nn.Module, term: BYOTTerm) -> DistillationModule:
    return DistillationModule(student, losses=[CrossEntropyTerm(), term], num_classes=10)


def _step(module: DistillationModule, batch: tuple[Tensor, Tensor]) -> StepOutputs:
    """Build the terms on ``batch``, then one training-mode forward with the declared layers hooked."""
    module.build_terms(batch)
    module.feature_hooks = module._declared_hooks()
    module.feature_hooks.attach(module)
    return module.step_outputs(batch)


def test_term_gradients_reach_only_the_layers_below_each_head() -> None:
    """The term trains the heads and the stages under them; the deepest classifier gets nothing from it."""
    term = BYOTTerm(["features.2"], "features", alpha=0.5, feature_weight=0.1)
    module = _module(MLP(in_features=8, num_classes=10, hidden=(16, 16)), term)
    term(_step(module, (_fixed(12, 8, seed=0), torch.arange(12) % 10))).backward()
    student = module.student
    assert student.features[1].weight.grad.abs().sum() > 0  # the first hidden layer, under the head
    for layer in (student.features[3], student.classifier):  # above the head: the teacher side
        assert layer.weight.grad is None
    assert all(p.grad is not None for p in term.heads.parameters())


class _Conv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.stage2(self.stage1(x))))


@pytest.mark.parametrize(
    ("student", "shallow", "deep", "inputs", "feature_size"),
    [
        (MLP(in_features=8, num_classes=10, hidden=(16, 12)), ["features.2"], "features", (5, 8), 12),
        (ConvNet1d(num_classes=10, widths=(4, 6, 6), hidden=7), ["conv1", "conv3"], "embedding", (5, 40), 7),
        (_Conv2dNet(), ["stage1"], "pool", (5, 1, 8, 8), 6),
    ],
    ids=["vectors", "1d_maps", "2d_maps"],
)
def test_heads_are_built_with_the_deepest_feature_size(
    student: nn.Module, shallow: list[str], deep: str, inputs: tuple[int, ...], feature_size: int
) -> None:
    term = BYOTTerm(shallow, deep)
    module = _module(student, term)
    x = _fixed(*inputs, seed=0)
    outputs = _step(module, (x, torch.arange(5)))
    assert term.heads is not None and len(term.heads) == len(shallow)
    assert any(name.startswith("loss_terms.byot.heads.") for name, _ in module.named_parameters())
    for layer, head in zip(shallow, term.heads, strict=True):
        feature, logits = head(outputs.student_features[layer])
        assert feature.shape == (5, feature_size) and logits.shape == (5, 10)
    module.eval()
    with torch.no_grad():
        predictions = term.head_logits(module.student, x)
        assert list(predictions) == [*shallow, "final"]
        assert all(predictions[layer].shape == (5, 10) for layer in shallow)
        torch.testing.assert_close(predictions["final"], module.student(x))


def test_build_rejects_a_negative_deep_feature_with_relu_heads() -> None:
    student = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 10))
    term = BYOTTerm(["1"], "2")
    with pytest.raises(ValueError, match="bottleneck_relu=False"):
        _module(student, term).build_terms((_fixed(4, 8, seed=0), torch.arange(4)))
    relaxed = BYOTTerm(["1"], "2", bottleneck_relu=False)
    _module(student, relaxed).build_terms((_fixed(4, 8, seed=0), torch.arange(4)))
    assert relaxed.heads is not None


def test_recipe_fits_and_saves_the_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            *TINY_MNIST1D_FIT,
        ]
    )
    state = torch.load(tmp_path / "runs/mnist1d/byot/latest.ckpt", weights_only=True)["state_dict"]
    head_keys = [key for key in state if key.startswith("loss_terms.byot.heads.")]
    assert head_keys
    metrics = (tmp_path / "runs/mnist1d/byot/version_0/metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    values = [dict(zip(header, row.split(","), strict=True))["train/loss_byot"] for row in metrics[1:]]
    assert [v for v in values if v] and all(torch.isfinite(torch.tensor(float(v))) for v in values if v)

    # a module built like the recipe's takes the checkpoint back, heads included, once built
    term = BYOTTerm(["conv1", "conv2", "conv3"], "embedding")
    module = _module(ConvNet1d(num_classes=10, widths=(16, 32, 32), hidden=64), term)
    module.build_terms((_fixed(4, 40, seed=0), torch.arange(4)))
    module.load_state_dict(state)
    for key in head_keys:
        torch.testing.assert_close(module.state_dict()[key], state[key])
