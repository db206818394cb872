"""Callbacks that explain a distillation: CKA over training, per-class changes, soft-label entropy."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
from conftest import TINY_MNIST1D_FIT, RandomDataModule, make_trainer, small_net
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from lightning_kd import DistillationModule
from lightning_kd.callbacks.cka import CKAReport
from lightning_kd.callbacks.class_agreement import ClassAgreementReport, ClassChanges
from lightning_kd.callbacks.report_io import save_and_log_figure
from lightning_kd.callbacks.temperature_entropy import TemperatureEntropyReport
from lightning_kd.cli import main
from lightning_kd.losses.functional import linear_cka, non_argmax_probability, soft_label_entropy

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------- linear CKA
def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from HSIC with a centering matrix, in float64: HSIC(K, L) = tr(K H L H) / (n - 1)^2."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return (hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))).item()


@pytest.mark.parametrize(
    ("n", "shape_x", "shape_y"),
    [(64, (3,), (5,)), (6, (40,), (2, 15))],  # feature-space form, then the Gram form (N < widths)
)
def test_linear_cka_matches_hsic_form(n: int, shape_x: tuple[int, ...], shape_y: tuple[int, ...]) -> None:
    x = torch.randn(n, *shape_x)
    shared = x.flatten(1)[:, 0].reshape(n, *[1] * len(shape_y))
    y = torch.randn(n, *shape_y) + 0.5 * shared  # some shared signal
    assert linear_cka(x, y).item() == pytest.approx(_hsic_cka(x, y), rel=1e-5)


def test_linear_cka_invariances() -> None:
    x = torch.randn(50, 8)
    y = torch.randn(50, 6) + x[:, :6]
    reference = linear_cka(x, y).item()
    assert 0.05 < reference < 0.95
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x @ rotation, y).item() == pytest.approx(reference, rel=1e-5)
    assert linear_cka(3.7 * x, y / 5).item() == pytest.approx(reference, rel=1e-5)
    assert linear_cka(x + 10.0, y).item() == pytest.approx(reference, rel=1e-5)  # centred
    assert linear_cka(x, x).item() == pytest.approx(1.0, rel=1e-6)
    # not invariant to a non-isotropic scaling
    stretch = torch.tensor([20.0, 1, 1, 1, 1, 1, 1, 1])
    assert abs(linear_cka(x * stretch, y).item() - reference) > 0.01


def test_linear_cka_bad_input() -> None:
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(torch.randn(10, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))


# ----------------------------------------------------------------- soft-label entropy
def test_soft_label_entropy_by_hand() -> None:
    assert soft_label_entropy(torch.zeros(4, 10)).item() == pytest.approx(math.log(10))
    assert soft_label_entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # p = (1/4, 3/4) at T = 1; at T = 2 the logits halve: p proportional to (1, sqrt(3))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert soft_label_entropy(logits).item() == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    )
    p = 1 / (1 + math.sqrt(3))
    assert soft_label_entropy(logits, 2.0).item() == pytest.approx(
        -(p * math.log(p) + (1 - p) * math.log(1 - p))
    )
    teacher = torch.randn(32, 10) * 4
    values = [soft_label_entropy(teacher, t).item() for t in (0.5, 1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)) and values[-1] < math.log(10)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_label_entropy(teacher, 0.0)


def test_non_argmax_probability_by_hand() -> None:
    assert non_argmax_probability(torch.log(torch.tensor([[0.5, 0.3, 0.2]]))).item() == pytest.approx(0.25)
    assert non_argmax_probability(torch.zeros(3, 5)).item() == pytest.approx(0.2)
    assert non_argmax_probability(torch.tensor([[60.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        non_argmax_probability(torch.zeros(3, 1))


# ----------------------------------------------------------------- per-class changes
def _one_hot_logits(predictions: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def test_class_changes_by_hand() -> None:
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    student = _one_hot_logits([0, 2, 1, 1, 2, 0])  # per class: 1/2, 2/2, 1/2
    teacher = _one_hot_logits([0, 1, 1, 1, 2, 2])  # per class: 1/2, 2/2, 2/2
    changes = ClassChanges.compute(student, targets, 3, teacher, torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(changes.accuracy, torch.tensor([0.5, 1.0, 0.5]))
    torch.testing.assert_close(changes.teacher_accuracy, torch.tensor([0.5, 1.0, 1.0]))
    # grouped by the teacher's class: class 0 {0} -> 1/1; class 1 {1, 2, 3} -> 2/3; class 2 {4, 5} -> 1/2
    torch.testing.assert_close(changes.agreement, torch.tensor([1.0, 2 / 3, 0.5]))
    torch.testing.assert_close(changes.gain, torch.tensor([0.5, 0.0, -0.5]))
    assert changes.samples.tolist() == [2, 2, 2]
    assert (changes.gained, changes.lost) == ([0], [2])
    metrics = changes.metrics()
    assert metrics["gain/class_2"] == pytest.approx(-0.5) and metrics["class_changes/gained"] == 1.0
    assert metrics["agreement/class_1"] == pytest.approx(2 / 3)
    table = changes.table()
    assert "| 0 | 2 | 0.0 | 50.0 | +50.0 | 50.0 | 100.0 |" in table and "Lost (gain < 0 pts): [2]" in table
    tolerant = ClassChanges.compute(
        student, targets, 3, teacher, torch.tensor([0.0, 1.0, 1.0]), tolerance=0.5
    )
    assert (tolerant.gained, tolerant.lost) == ([], [])
    with pytest.raises(ValueError, match="one accuracy per class"):
        ClassChanges.compute(student, targets, 3, teacher, torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------- the callbacks in a fit
def _columns(logger: CSVLogger) -> dict[str, list[float]]:
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A briefly trained baseline student: its checkpoint and the per_class_accuracy.json it wrote."""
    root = tmp_path_factory.mktemp("baseline")
    torch.manual_seed(1)
    checkpoint = ModelCheckpoint(dirpath=root, filename="baseline", enable_version_counter=False)
    report = ClassAgreementReport(directory=root)
    trainer = make_trainer(max_epochs=2, callbacks=[checkpoint, report], enable_checkpointing=True)
    trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())
    assert [p.name for p in report.files] == ["class_changes.md", "per_class_accuracy.json"]  # no teacher
    return root / "baseline.ckpt", root / "per_class_accuracy.json"


def test_callbacks_log_plot_and_resume(tmp_path: Path, baseline: tuple[Path, Path]) -> None:
    checkpoint_path, accuracy_path = baseline
    teacher = small_net(hidden=32)

    def callbacks() -> tuple[CKAReport, ClassAgreementReport, TemperatureEntropyReport, ModelCheckpoint]:
        return (
            CKAReport(pairs=[["2", "2"], ["0", "3"]], num_samples=40, directory=tmp_path),
            ClassAgreementReport(baseline_checkpoint=checkpoint_path, directory=tmp_path),
            TemperatureEntropyReport(temperatures=[1, 4], directory=tmp_path),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="kd", enable_version_counter=False),
        )

    cka, classes, entropy, checkpoint = callbacks()
    module = DistillationModule(small_net(), teacher)
    logger = CSVLogger(tmp_path, name="kd")
    trainer = make_trainer(
        max_epochs=2, logger=logger, callbacks=[cka, classes, entropy, checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=RandomDataModule())

    for name in ("cka", "class_agreement", "class_gain", "temperature_entropy"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name
    logged = _columns(logger)
    key = "cka/2-vs-2"
    assert set(cka.history) == {key, "cka/0-vs-3"} and sorted(cka.history[key]) == [0, 1, 2]
    assert logged[key] == pytest.approx([cka.history[key][e] for e in (0, 1, 2)])

    # the last CKA, recomputed with our own hooks on the first 40 validation samples
    captured = {}
    handles = [
        layer.register_forward_hook(lambda m, i, o, role=role: captured.update({role: o}))
        for role, layer in (("s", module.student[2]), ("t", teacher[2]))
    ]
    module.eval()
    x = RandomDataModule().x[:40]
    with torch.no_grad():
        module.student(x), teacher(x)
    for handle in handles:
        handle.remove()
    assert cka.history[key][2] == pytest.approx(_hsic_cka(captured["s"], captured["t"]), rel=1e-4)

    # gains: the student's accuracy minus the baseline's, which the baseline run also wrote as JSON
    data = RandomDataModule()
    with torch.no_grad():
        predicted = module.student(data.x).argmax(dim=1)
    present = [1, 2, 3]  # the random labels have no class 0: it gets no gain
    student_accuracy = torch.stack([(predicted[data.y == c] == c).float().mean() for c in present])
    baseline_accuracy = torch.tensor(json.loads(accuracy_path.read_text())["per_class_accuracy"])[present]
    gains = torch.tensor([logged[f"gain/class_{c}"][0] for c in present])
    torch.testing.assert_close(gains, student_accuracy - baseline_accuracy)
    assert (
        "gain/class_0" not in logged
        and "| 0 | 0 | - | - | - |" in (tmp_path / "class_changes.md").read_text()
    )
    assert "agreement/class_3" in logged and "class_changes/lost" in logged
    assert (tmp_path / "class_changes.md").read_text().startswith("# Per-class changes")

    teacher_logits = teacher(data.x).detach()
    assert logged["soft_labels/entropy_T4"][0] == pytest.approx(
        soft_label_entropy(teacher_logits, 4.0).item()
    )
    assert logged["soft_labels/entropy_fraction_T1"][0] == pytest.approx(
        soft_label_entropy(teacher_logits).item() / math.log(4)
    )
    assert entropy.training_temperature == 4.0 and set(entropy.results) == {1.0, 4.0}

    # a resumed run continues the CKA curve from the checkpoint (no second point at epoch 2)
    cka2, classes2, entropy2, checkpoint2 = callbacks()
    resumed = make_trainer(max_epochs=3, callbacks=[cka2, checkpoint2], enable_checkpointing=True)
    resumed.fit(
        DistillationModule(small_net(), teacher), RandomDataModule(), ckpt_path=tmp_path / "ckpt/kd.ckpt"
    )
    assert sorted(cka2.history[key]) == [0, 1, 2, 3]
    assert cka2.history[key][1] == cka.history[key][1]


def test_gain_from_a_json_baseline(tmp_path: Path, baseline: tuple[Path, Path]) -> None:
    report = ClassAgreementReport(baseline_accuracy=baseline[1], directory=tmp_path)
    make_trainer(callbacks=[report]).fit(DistillationModule(small_net(), small_net()), RandomDataModule())
    expected = torch.tensor(json.loads(baseline[1].read_text())["per_class_accuracy"])
    torch.testing.assert_close(report.changes.baseline_accuracy, expected)
    assert (tmp_path / "class_gain.png").exists()


def test_bad_settings_fail_before_training(tmp_path: Path) -> None:
    module = DistillationModule(small_net(), small_net())
    with pytest.raises(FileNotFoundError, match="baseline.yaml"):
        make_trainer(callbacks=[ClassAgreementReport(baseline_checkpoint=tmp_path / "none.ckpt")]).fit(
            module, RandomDataModule()
        )
    with pytest.raises(ValueError, match="Closest module names"):
        make_trainer(callbacks=[CKAReport(pairs=[["2", "embedding"]])]).fit(module, RandomDataModule())
    with pytest.raises(ValueError, match="no teacher"):
        make_trainer(callbacks=[CKAReport(pairs=[["2", "2"]])]).fit(
            DistillationModule(small_net()), RandomDataModule()
        )
    bad = tmp_path / "accuracy.json"
    bad.write_text(json.dumps({"per_class_accuracy": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="with 4 classes"):
        make_trainer(callbacks=[ClassAgreementReport(baseline_accuracy=bad)]).fit(module, RandomDataModule())
    with pytest.raises(ValueError, match="not both"):
        ClassAgreementReport(baseline_checkpoint=bad, baseline_accuracy=bad)
    with pytest.raises(ValueError, match="student_layer, teacher_layer"):
        CKAReport(pairs=[["only-one"]])
    with pytest.raises(ValueError, match="temperatures"):
        TemperatureEntropyReport(temperatures=[0, 1])


def test_figures_are_saved_and_sent_to_image_loggers(tmp_path: Path) -> None:
    wandb, tensorboard = MagicMock(spec=WandbLogger), MagicMock(spec=TensorBoardLogger)
    trainer = SimpleNamespace(loggers=[wandb, tensorboard, CSVLogger(tmp_path)], global_step=7)
    figure = Figure()
    figure.add_subplot().plot([0, 1])
    path = save_and_log_figure(trainer, figure, tmp_path / "plots", "cka", "report/cka")
    assert path == tmp_path / "plots" / "cka.png" and path.read_bytes()[:8] == PNG
    wandb.log_image.assert_called_once_with(key="report/cka", images=[str(path)])
    tensorboard.experiment.add_figure.assert_called_once_with("report/cka", figure, global_step=7)


# ----------------------------------------------------------------- the YAML recipe
def test_explain_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = Path(__file__).resolve().parents[1] / "configs" / "mnist1d"
    monkeypatch.chdir(tmp_path)
    for prerequisite in ("teacher", "baseline"):
        main(["fit", "--config", str(configs / f"{prerequisite}.yaml"), *TINY_MNIST1D_FIT])
    main(["fit", "--config", str(configs / "explain.yaml"), *TINY_MNIST1D_FIT])
    out = tmp_path / "runs/mnist1d/explain"
    for name in ("cka", "class_agreement", "class_gain", "temperature_entropy"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
    assert (out / "class_changes.md").exists() and (out / "per_class_accuracy.json").exists()
    header = (tmp_path / "runs/mnist1d/explain/version_0/metrics.csv").read_text().splitlines()[0].split(",")
    for column in (
        "cka/features-vs-embedding",
        "cka/features.2-vs-conv3",
        "agreement/class_9",
        "gain/class_0",
        "soft_labels/entropy_T4",
        "soft_labels/non_argmax_prob_T16",
    ):
        assert column in header, column
