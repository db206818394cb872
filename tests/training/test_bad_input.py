"""Bad input gets a clear error, and an earlier good checkpoint in the checkpoint directory survives it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.cli import main
from lightning_kd.losses import CrossEntropyTerm, LossTerm, StepOutputs
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import NUM_CLASSES, RandomDataModule, make_trainer, small_net

CONFIGS = RECIPES_DIR


TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_samples=200",
    "--data.init_args.val_samples=50",
    "--data.init_args.test_samples=50",
]


class Earlier:
    """A good checkpoint already in a checkpoint directory, and its bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.directory = path.parent
        self.content = path.read_bytes()
        self.files = sorted(self.directory.iterdir())

    def assert_untouched(self) -> None:
        """Same files, same bytes, and it still loads into a module."""
        assert sorted(self.directory.iterdir()) == self.files
        assert self.path.read_bytes() == self.content
        DistillationModule.load_from_checkpoint(self.path, student=small_net(), weights_only=True)


def _earlier(directory: Path, filename: str = "model") -> Earlier:
    checkpoint = ModelCheckpoint(dirpath=directory, filename=filename, enable_version_counter=False)
    make_trainer(callbacks=[checkpoint], enable_checkpointing=True).fit(
        DistillationModule(small_net()), datamodule=RandomDataModule()
    )
    return Earlier(Path(checkpoint.best_model_path))


@pytest.fixture
def earlier(tmp_path: Path) -> Earlier:
    return _earlier(tmp_path / "checkpoints")


def _fit(module: DistillationModule, datamodule: pl.LightningDataModule, earlier: Earlier) -> pl.Trainer:
    """Fit with a checkpoint callback writing the same file name into the earlier run's directory."""
    checkpoint = ModelCheckpoint(dirpath=earlier.directory, filename="model", enable_version_counter=False)
    trainer = make_trainer(callbacks=[checkpoint], enable_checkpointing=True, num_sanity_val_steps=2)
    trainer.fit(module, datamodule=datamodule)
    return trainer


class LabelsDataModule(RandomDataModule):
    """Random data with one label replaced, in the training or the validation split."""

    def __init__(self, label: int, split: str) -> None:
        super().__init__()
        self.bad_y = self.y.clone()
        self.bad_y[37] = label
        self.split = split

    def train_dataloader(self) -> DataLoader:
        y = self.bad_y if self.split == "train" else self.y
        return DataLoader(TensorDataset(self.x, y), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        y = self.bad_y if self.split == "val" else self.y
        return DataLoader(TensorDataset(self.x, y), batch_size=self.batch_size)


@pytest.mark.parametrize(
    ("label", "split", "stage"),
    [(7, "train", "training"), (-1, "train", "training"), (4, "val", "validation")],
)
def test_label_outside_num_classes(earlier: Earlier, label: int, split: str, stage: str) -> None:
    module = DistillationModule(small_net())
    message = rf"Label {label} in a {stage} batch is outside \[0, num_classes\) with num_classes="
    message += rf"{NUM_CLASSES}"
    fix = "must not be negative" if label < 0 else f"num_classes >= {label + 1}"
    with pytest.raises(ValueError, match=message + r".*labels \(they must be 0 \.\. 3\), .*" + fix):
        _fit(module, LabelsDataModule(label, split), earlier)
    if split == "train":  # raised before the batch with the bad label reached the loss: 4 batches
        assert module.global_step < 4
    earlier.assert_untouched()


def test_label_fix_names_the_class_count_needed(earlier: Earlier) -> None:
    with pytest.raises(ValueError, match=r"num_classes >= 10 and pass num_classes=\.$"):
        _fit(DistillationModule(small_net()), LabelsDataModule(9, "train"), earlier)


class EmptyDataModule(RandomDataModule):
    def __init__(self, train_samples: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        self.train_samples, self.drop_last = train_samples, drop_last

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.x[: self.train_samples], self.y[: self.train_samples])
        return DataLoader(dataset, batch_size=self.batch_size, drop_last=self.drop_last)


def test_empty_training_set(earlier: Earlier) -> None:
    # Lightning itself only logs "`Trainer.fit` stopped: No training batches." and returns
    with pytest.raises(ValueError, match=r"EmptyDataModule\.train_dataloader\(\) has a dataset of 0 samples"):
        _fit(DistillationModule(small_net()), EmptyDataModule(), earlier)
    earlier.assert_untouched()


def test_training_set_smaller_than_a_dropped_batch(earlier: Earlier) -> None:
    with pytest.raises(ValueError, match=r"has 5 samples, fewer than batch_size=16 with drop_last=True"):
        _fit(DistillationModule(small_net()), EmptyDataModule(train_samples=5, drop_last=True), earlier)
    earlier.assert_untouched()


def test_empty_training_set_given_without_a_datamodule() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="the train_dataloaders given to Trainer.fit has a dataset of 0"):
        make_trainer().fit(DistillationModule(small_net()), train_dataloaders=empty)


class NaNInputsDataModule(RandomDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.x = self.x.clone()
        self.x[:, 2] = float("nan")
        self.x[:, 5] = float("-inf")


def test_non_finite_inputs_are_named_as_the_cause(earlier: Earlier) -> None:
    module = DistillationModule(small_net(batchnorm=False))
    # each batch: 16 samples x 8 features, two of them NaN/Inf per sample
    with pytest.raises(
        FloatingPointError,
        match=r"at step 0: .*The inputs are not finite: batch\[0\] holds 32 NaN/Inf of 128 ",
    ):
        _fit(module, NaNInputsDataModule(), earlier)
    earlier.assert_untouched()


class NaNTerm(LossTerm):
    needs_teacher = False

    def forward(self, outputs: StepOutputs) -> Tensor:
        return outputs.student_logits.sum() * float("nan")


def test_finite_inputs_are_ruled_out_as_the_cause(earlier: Earlier) -> None:
    module = DistillationModule(small_net(), losses=[CrossEntropyTerm(), NaNTerm("exploding")])
    with pytest.raises(FloatingPointError, match=r"'exploding': nan.*The inputs are finite: lower the"):
        _fit(module, RandomDataModule(), earlier)
    earlier.assert_untouched()


def test_non_finite_teacher_input_is_named(earlier: Earlier) -> None:
    class PrivilegedNaN(RandomDataModule):
        def train_dataloader(self) -> DataLoader:
            privileged = torch.full_like(self.x, float("nan"))
            return DataLoader(TensorDataset(self.x, self.y, privileged), batch_size=self.batch_size)

        val_dataloader = train_dataloader

    module = DistillationModule(small_net(), small_net(batchnorm=False), teacher_input_key=2)
    with pytest.raises(FloatingPointError, match=r"batch\[2\] holds 128 NaN/Inf of 128 values"):
        _fit(module, PrivilegedNaN(), earlier)
    earlier.assert_untouched()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the recipes write to ./runs
    return tmp_path


def _truncated(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[:300])
    return target


def test_truncated_or_foreign_resume_checkpoint(in_tmp: Path) -> None:
    earlier = _earlier(
        in_tmp / "runs/mnist1d/baseline/version_0/checkpoints", "baseline"
    )  # the recipe's own file name
    broken = _truncated(earlier.path, in_tmp / "broken.ckpt")
    foreign = in_tmp / "notes.ckpt"
    foreign.write_text("not a checkpoint\n")
    for path in (broken, foreign):
        with pytest.raises(ValueError, match=rf"Cannot load --ckpt_path '{path}': it is truncated"):
            main(["fit", "--config", str(CONFIGS / "mnist1d/baseline.yaml"), *TINY, f"--ckpt_path={path}"])
    earlier.assert_untouched()


def test_truncated_teacher_checkpoint_in_the_command(in_tmp: Path) -> None:
    earlier = _earlier(in_tmp / "runs/mnist1d/kd/version_0/checkpoints", "kd")
    broken = _truncated(earlier.path, in_tmp / "teacher.ckpt")
    # LightningCLI wraps the constructor's error in its own message, which keeps ours
    with pytest.raises(ValueError, match=rf"Cannot read checkpoint '{broken.resolve()}'"):
        recipe = str(CONFIGS / "mnist1d/kd.yaml")
        main(["fit", "--config", recipe, *TINY, f"--model.init_args.teacher_checkpoint={broken.name}"])
    earlier.assert_untouched()


def test_unknown_key_in_a_config_file(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    earlier = _earlier(in_tmp / "runs/mnist1d/baseline/version_0/checkpoints", "baseline")
    typo = in_tmp / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    check_finit: false\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "mnist1d/baseline.yaml"), "--config", str(typo), *TINY])
    assert "check_finit" in capsys.readouterr().err
    earlier.assert_untouched()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--model.init_args.num_classes=ten", "num_classes"),
        ("--trainer.max_epochs=1.5", "trainer.max_epochs"),
    ],
)
def test_wrong_type_in_the_config(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    earlier = _earlier(in_tmp / "runs/mnist1d/baseline/version_0/checkpoints", "baseline")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "mnist1d/baseline.yaml"), *TINY, override])
    err = capsys.readouterr().err
    assert f'key "{key}"' in err and override.rpartition("=")[2] in err
    earlier.assert_untouched()


def _seeded_fit(directory: Path, seed: int) -> tuple[str, dict[str, Tensor]]:
    pl.seed_everything(seed, verbose=False)
    module = DistillationModule(small_net(), small_net(hidden=32))
    trainer = make_trainer(
        max_epochs=2,
        deterministic=True,
        logger=CSVLogger(directory, name="run", version=0),
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=RandomDataModule())
    return (directory / "run/version_0/metrics.csv").read_text(), module.student.state_dict()


def test_same_seed_gives_the_same_metrics_and_weights(tmp_path: Path) -> None:
    metrics, weights = _seeded_fit(tmp_path / "a", seed=3)
    metrics_again, weights_again = _seeded_fit(tmp_path / "b", seed=3)
    assert "train/loss_kd" in metrics and "val/acc" in metrics
    assert metrics == metrics_again
    for name, tensor in weights.items():
        assert torch.equal(tensor, weights_again[name]), name
    # and the seed matters (otherwise the comparison above proves nothing)
    other_metrics, other_weights = _seeded_fit(tmp_path / "c", seed=4)
    assert other_metrics != metrics
    assert not all(torch.equal(tensor, other_weights[name]) for name, tensor in weights.items())
