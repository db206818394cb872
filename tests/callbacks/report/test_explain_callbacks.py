"""CKA, class-agreement and soft-label-entropy reports together: a fit that logs, plots and resumes,
a JSON baseline, bad settings, and the explain recipe."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_kd import DistillationModule
from lightning_kd.callbacks import CKAReport, ClassAgreementReport, TemperatureEntropyReport
from lightning_kd.cli import main
from lightning_kd.losses.functional import soft_label_entropy
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import PNG, TINY_MNIST1D_FIT, RandomDataModule, _hsic_cka, make_trainer, small_net


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
    with pytest.warns(UserWarning, match="Resumed with another run length"):  # the LR schedule re-plans
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
    with pytest.raises(FileNotFoundError, match="lightning-kd fit --config mnist1d/baseline"):
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


def test_explain_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = RECIPES_DIR / "mnist1d"
    monkeypatch.chdir(tmp_path)
    for prerequisite in ("teacher", "baseline"):
        main(["fit", "--config", str(configs / f"{prerequisite}.yaml"), *TINY_MNIST1D_FIT])
    with pytest.warns(UserWarning, match="fewer than num_samples=500"):  # 100 validation samples here
        main(["fit", "--config", str(configs / "explain.yaml"), *TINY_MNIST1D_FIT])
    out = tmp_path / "runs/mnist1d/explain/version_0/checkpoints"  # a folder per run
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
