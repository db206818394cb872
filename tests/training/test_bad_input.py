"""Bad input gets a clear error, and an earlier good checkpoint in the checkpoint directory survives it."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.cli import main
from lightning_kd.data import LatentNoiseDataModule, WithIndex
from lightning_kd.losses import CrossEntropyTerm, DKDTerm, KDTerm, LossTerm, StepOutputs
from lightning_kd.models.generator import Generator
from lightning_kd.paradigms import DataFreeDistillationModule, MutualLearningModule
from lightning_kd.recipes import RECIPES_DIR
from lightning_kd.teachers import TeacherOutputCache
from tests.helpers import NUM_CLASSES, NUM_FEATURES, RandomDataModule, make_trainer, small_net

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
    # log_every_n_steps=1: the loss is read in every step, so a NaN stops the step it appears in
    trainer = make_trainer(
        callbacks=[checkpoint], enable_checkpointing=True, num_sanity_val_steps=2, log_every_n_steps=1
    )
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
    with pytest.raises(
        FloatingPointError,
        match=r"'exploding': nan.*The inputs, the weights and the models' outputs are finite: a term's math "
        r"overflowed\. Lower the learning rate",
    ):
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


# ----------------------------------------------------------------- labels, inputs and outputs of a step
def _loader(x: Tensor, y: Tensor, **kwargs: Any) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=16, **kwargs)


def _train(module: pl.LightningModule, loader: DataLoader, epochs: int = 1) -> pl.Trainer:
    trainer = make_trainer(max_epochs=epochs, limit_val_batches=0, log_every_n_steps=1)  # read every step
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def _kd_module(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    """CE on the labels, KD, and DKD, whose target-class mask needs class indices."""
    terms = [CrossEntropyTerm(weight=0.1), KDTerm(weight=0.9), DKDTerm(weight=0.5)]
    return DistillationModule(student, teacher, losses=terms, cosine_decay=False)


def test_one_hot_targets_train_exactly_as_class_indices() -> None:
    data = RandomDataModule()
    student, teacher = small_net(), small_net(hidden=32)
    runs = {}
    for name, y in {"indices": data.y, "one_hot": F.one_hot(data.y, NUM_CLASSES).float()}.items():
        module = _kd_module(copy.deepcopy(student), copy.deepcopy(teacher))
        trainer = _train(module, _loader(data.x, y))
        (held_out,) = make_trainer().validate(module, _loader(data.x, y), verbose=False)
        runs[name] = (trainer.callback_metrics, held_out, module.student.state_dict())
    (metrics, held_out, weights), (metrics_1h, held_out_1h, weights_1h) = runs["indices"], runs["one_hot"]
    for key in ("train/loss_ce", "train/loss_kd", "train/loss_dkd", "train/acc"):
        assert float(metrics_1h[key]) == pytest.approx(float(metrics[key]), rel=1e-6), key
    for key, tensor in weights.items():
        assert torch.allclose(weights_1h[key], tensor, atol=1e-6), key
    # held-out accuracy and loss of the one-hot run against their definitions, in float64
    module_student = small_net()
    module_student.load_state_dict(weights_1h)
    logits = module_student.eval()(data.x).double()
    assert held_out_1h["val/acc"] == pytest.approx(float((logits.argmax(1) == data.y).double().mean()))
    assert held_out_1h["val/loss"] == pytest.approx(float(F.cross_entropy(logits, data.y)), rel=1e-5)
    assert held_out_1h == pytest.approx(held_out)


def test_integer_labels_of_any_width_or_a_column_train_as_int64() -> None:
    data = RandomDataModule()
    student = small_net()
    weights = []
    for y in (data.y, data.y.int(), data.y[:, None], data.y.to(torch.uint8)):
        module = DistillationModule(copy.deepcopy(student), cosine_decay=False)
        _train(module, _loader(data.x, y))
        weights.append(module.student.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(other[key], tensor) for key, tensor in weights[0].items())


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            lambda y: y.float(),
            r"The training labels are torch\.float32 of shape \(16,\) with integral values: class indices "
            r"must be integers\. Convert them with \.long\(\) in the dataset",
        ),
        (
            lambda y: y.float()[:, None] + 0.5,
            r"The training labels are torch\.float32 of shape \(16, 1\) with fractional values: "
            r"classification needs \(N,\) int64 class indices or \(N, num_classes\) class probabilities",
        ),
        (
            lambda y: F.one_hot(y, NUM_CLASSES).float() + F.one_hot((y + 1) % NUM_CLASSES, NUM_CLASSES),
            r"The training targets of shape \(16, 4\) are not class probabilities: a row \[.*\] sums to 2 "
            r"\(rows must be >= 0 and sum to 1\).*multi-label targets are not supported",
        ),
        (
            lambda y: torch.stack([y, y], dim=1),
            r"The training labels have shape \(16, 2\) \(torch\.int64\): expected \(N,\) class indices, or "
            r"\(N, 4\) class probabilities",
        ),
    ],
    ids=["float-integral", "float-fractional", "multi-hot", "two-columns"],
)
def test_labels_that_are_not_classes_name_the_fix(labels: Any, message: str) -> None:
    data = RandomDataModule()
    module = DistillationModule(small_net())
    with pytest.raises(ValueError, match=message):
        _train(module, _loader(data.x, labels(data.y)))
    assert module.global_step == 0


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            lambda x: x.double(),
            r"The student's input is torch\.float64 but its weights are torch\.float32: cast the input in "
            r"the dataset's transform \(x\.to\(torch\.float32\)\)",
        ),
        (
            lambda x: (x.abs() * 40).to(torch.uint8),
            r"The student's input is uint8 \(raw bytes, e\.g\. image pixels\) but its weights are "
            r"torch\.float32: convert it in the dataset's transform to floats, e\.g\. x\.float\(\) / 255",
        ),
    ],
    ids=["float64", "uint8"],
)
def test_inputs_of_another_dtype_name_both_dtypes_and_the_fix(inputs: Any, message: str) -> None:
    data = RandomDataModule()
    for module in (DistillationModule(small_net()), MutualLearningModule([small_net(), small_net()])):
        with pytest.raises(TypeError, match=message.replace("The student's", "The (student|peer 0)'s")):
            _train(module, _loader(inputs(data.x), data.y))
        assert module.global_step == 0


class Flat(nn.Module):
    """One score per sample, as (N,) or (N, 1)."""

    def __init__(self, column: bool) -> None:
        super().__init__()
        self.linear, self.column = nn.Linear(NUM_FEATURES, 1), column

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) if self.column else self.linear(x).flatten()


@pytest.mark.parametrize("column", [True, False], ids=["(N, 1)", "(N,)"])
def test_one_score_per_sample_names_the_expected_logits(column: bool) -> None:
    data = RandomDataModule()
    shape = r"\(16, 1\)" if column else r"\(16,\)"
    message = (
        rf"The student's output has shape {shape}: expected \(N, C\) logits with C = num_classes = 2 >= 2, "
        r"one score per class\. For a binary task return 2 logits \(e\.g\. nn\.Linear\(features, 2\)\)"
    )
    with pytest.raises(ValueError, match=message):
        _train(DistillationModule(Flat(column), num_classes=2), _loader(data.x, data.y % 2))
    with pytest.raises(
        ValueError, match=r"num_classes=1: classification needs at least 2 classes\. For a binary"
    ):
        DistillationModule(Flat(column))  # the class count inferred from the last nn.Linear


def test_last_batch_of_one_sample_under_batchnorm_names_drop_last() -> None:
    data = RandomDataModule()
    x, y = data.x[:33], data.y[:33]  # batches of 16, 16 and 1
    module = DistillationModule(small_net())
    message = (
        r"A training batch holds 1 sample, and BatchNorm in training mode cannot normalise a single value "
        r"per channel\. Pass drop_last=True to the training DataLoader, or choose a batch size that does not"
    )
    with pytest.raises(ValueError, match=message):
        _train(module, _loader(x, y))
    assert module.global_step == 2
    module = DistillationModule(small_net())
    _train(module, _loader(x, y, drop_last=True))  # the fix it names
    assert module.global_step == 2


def test_one_module_as_student_and_teacher_is_refused_at_construction() -> None:
    net = small_net()
    with pytest.raises(
        ValueError,
        match=r"The student and the teacher are the same module object: a frozen teacher would freeze the "
        r"student, and the student would teach itself\. Give each its own network \(copy\.deepcopy",
    ):
        DistillationModule(net, net)
    assert all(p.requires_grad for p in net.parameters())  # refused before the teacher was frozen
    shared = nn.Sequential(net[0], nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    with pytest.raises(ValueError, match=r"The student and the teacher share the parameter '0\.weight'"):
        DistillationModule(net, shared, teacher_mode="trainable")
    with pytest.raises(ValueError, match=r"The peer 0 and the peer 1 are the same module object: they would"):
        MutualLearningModule([net, net])


class Softmaxed(nn.Module):
    """A teacher whose forward ends in a (log-)softmax."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.net, self.log = small_net(batchnorm=False), log

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).log_softmax(dim=-1) if self.log else self.net(x).softmax(dim=-1)


def test_a_teacher_returning_probabilities_warns_at_the_first_batch() -> None:
    data = RandomDataModule()
    module = DistillationModule(small_net(), Softmaxed(log=False))
    with pytest.warns(
        UserWarning, match=r"The teacher's outputs are probabilities .* Return logits from the "
    ):
        _train(module, _loader(data.x, data.y))


def test_the_probability_warning_waits_for_the_first_reading_of_the_device() -> None:
    data = RandomDataModule()
    module = DistillationModule(small_net(), Softmaxed(log=False))

    class NoWarningYet(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            assert not [w for w in caught if "probabilities" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(limit_val_batches=0, callbacks=[NoWarningYet()])  # first reading: epoch end
        trainer.fit(module, train_dataloaders=_loader(data.x, data.y))
    found = [str(w.message) for w in caught if "probabilities" in str(w.message)]
    assert len(found) == 1 and found[0].startswith("The teacher's outputs are probabilities")


def _probability_warnings(teacher: nn.Module) -> list[str]:
    data = RandomDataModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(DistillationModule(small_net(), teacher), _loader(data.x, data.y))
    return [str(w.message) for w in caught if "probabilities" in str(w.message)]


def test_logits_and_log_probabilities_do_not_warn() -> None:
    confident = small_net()
    with torch.no_grad():  # the large margins of a trained teacher
        confident[-1].weight.mul_(50)
    for teacher in (small_net(), confident, Softmaxed(log=True)):  # log-softmax: logits shifted per row
        assert _probability_warnings(teacher) == []


# ----------------------------------------------------------------- the cause of a non-finite loss
class Overflowing(nn.Module):
    """Finite weights whose forward overflows float32 on ordinary inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net(batchnorm=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * 1e39


def _nan_weight(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    return net


def _empty_batches(items: list) -> tuple[Tensor, Tensor]:
    """A collate_fn that filters every sample out."""
    return torch.zeros(0, NUM_FEATURES), torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize(
    ("build", "loader", "message"),
    [
        (
            lambda: DistillationModule(small_net(), _nan_weight(small_net(batchnorm=False))),
            {},
            r"0: terms \{.*'kd': nan\}.*The teacher's weight '0\.weight' holds NaN/Inf, and it is not "
            r"trained here: its weights were loaded so\. Load the teacher from a checkpoint",
        ),
        (
            lambda: DistillationModule(_nan_weight(small_net(batchnorm=False))),
            {},
            r"0: terms \{'ce': nan\}.*The student's weight '0\.weight' holds NaN/Inf: an earlier optimizer "
            r"step diverged\. Lower the learning rate, or clip the gradients \(Trainer\(gradient_clip_val=1",
        ),
        (
            lambda: DistillationModule(
                small_net(batchnorm=False), optimizer=lambda params: torch.optim.SGD(params, lr=1e38)
            ),
            {},
            r"1: terms \{'ce': nan\}.*The student's outputs are not finite although its inputs and weights "
            r"are: its forward overflows, as weights grown by a diverging run do\. Lower the learning rate",
        ),
        (
            lambda: DistillationModule(small_net(), small_net(), losses=[UncheckedTemperatureTerm("soft")]),
            {},
            r"0: terms \{'soft': nan\}.*The temperature of loss term 'soft' is inf: a schedule or an "
            r"assignment set it so\. Give it a finite value > 0\.",
        ),
        (
            lambda: DistillationModule(small_net(), Overflowing()),
            {},
            r"0: .*The teacher's outputs are not finite although its inputs and weights are: its forward "
            r"overflows \(e\.g\. activations beyond the float16 range",
        ),
        (
            lambda: DistillationModule(small_net(batchnorm=False)),
            {"collate_fn": _empty_batches},
            r"0: terms \{'ce': nan\}.*The batch holds 0 samples, and a mean over no samples is NaN",
        ),
    ],
    ids=[
        "teacher-weights",
        "student-weights",
        "diverging-student",
        "temperature",
        "teacher-overflow",
        "empty",
    ],
)
def test_a_non_finite_loss_names_its_cause(build: Any, loader: dict, message: str) -> None:
    data = RandomDataModule()
    module = build()
    with pytest.raises(FloatingPointError, match=r"The loss is not finite at step " + message):
        _train(module, _loader(data.x, data.y, **loader))


class UncheckedTemperatureTerm(LossTerm):
    """A user's term that does not check its temperature (the package's terms refuse inf)."""

    temperature = float("inf")

    def forward(self, outputs: StepOutputs) -> Tensor:
        teacher = outputs.teacher_logits / self.temperature
        student = outputs.student_logits / self.temperature
        divergence = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True)
        return self.temperature**2 * divergence


def test_an_infinite_temperature_is_refused_by_the_package_terms() -> None:
    module = DistillationModule(small_net(), small_net())
    module.loss_terms["kd"].temperature = float("inf")  # as a schedule may set it
    data = RandomDataModule()
    with pytest.raises(ValueError, match=r"temperature must be > 0 and finite, got inf\."):
        _train(module, _loader(data.x, data.y))


def test_a_float16_cache_overflow_names_dtype_float32() -> None:
    data = RandomDataModule()
    teacher = small_net(batchnorm=False)
    with torch.no_grad():  # finite float32 logits beyond float16's 65504
        teacher[-1].weight.mul_(1e6)
    module = DistillationModule(small_net(), teacher, teacher_cache=TeacherOutputCache(dtype="float16"))
    loader = DataLoader(WithIndex(TensorDataset(data.x, data.y)), batch_size=16)
    with pytest.raises(
        OverflowError,
        match=r"The teacher's logits reach \d+, beyond float16's largest value 65504: the cache would store "
        r"them as inf\. Use TeacherOutputCache\(dtype='float32'\)",
    ):
        _train(module, loader, epochs=2)  # refused when the first batch is stored, before any step


def test_paradigms_name_the_cause_of_a_non_finite_loss() -> None:
    data = RandomDataModule()
    peers = [small_net(batchnorm=False), _nan_weight(small_net(batchnorm=False))]
    with pytest.raises(
        FloatingPointError,
        match=r"at step 0: peer losses \{'peer0': nan, 'peer1': nan\} gave NaN/Inf\. The peer 1's weight "
        r"'0\.weight' holds NaN/Inf: an earlier optimizer step diverged",
    ):
        _train(MutualLearningModule(peers), _loader(data.x, data.y))
    generator = Generator((NUM_FEATURES,), 4, hidden=(16,))
    module = DataFreeDistillationModule(small_net(), _nan_weight(small_net()), generator)
    with pytest.raises(
        FloatingPointError,
        match=r"at step 0: generator losses \{.*\} gave NaN/Inf\. The teacher's weight '0\.weight' holds "
        r"NaN/Inf, and it is not trained here",
    ):
        make_trainer(limit_val_batches=0).fit(
            module, datamodule=LatentNoiseDataModule(data, 4, batch_size=8, batches_per_epoch=2)
        )


# ----------------------------------------------------------------- deferred checks (no wait per step)
class NaNFrom(LossTerm):
    """A term that turns NaN at its ``first``-th training step (as a run that diverges there)."""

    needs_teacher = False

    def __init__(self, name: str, first: int) -> None:
        super().__init__(name)
        self.first, self.calls = first, 0  # the module calls the terms in training steps only

    def forward(self, outputs: StepOutputs) -> Tensor:
        self.calls += 1
        value = outputs.student_logits.float().pow(2).mean()
        return value * float("nan") if self.calls > self.first else value


def test_no_checkpoint_is_written_after_a_non_finite_loss(tmp_path: Path) -> None:
    module = DistillationModule(small_net(batchnorm=False), losses=[CrossEntropyTerm(), NaNFrom("late", 3)])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = make_trainer(callbacks=[checkpoint], enable_checkpointing=True)  # log_every_n_steps=50
    with pytest.raises(
        FloatingPointError,
        match=r"^The loss is not finite at step 3: terms \{'late': nan\} gave NaN/Inf\. The student's weight "
        r"'0\.weight' holds NaN/Inf",
    ):
        trainer.fit(module, datamodule=RandomDataModule())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=2.ckpt"]  # the save after step 3 refused
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_check_finite_step_stops_the_paradigms_at_the_step_itself() -> None:
    data = RandomDataModule()
    peers = [small_net(batchnorm=False), _nan_weight(small_net(batchnorm=False))]
    module = MutualLearningModule(peers, check_finite="step")
    with pytest.raises(FloatingPointError, match=r"at step 0: peer losses .*The peer 1's weight '0\.weight'"):
        make_trainer(limit_val_batches=0).fit(module, train_dataloaders=_loader(data.x, data.y))
    assert module.global_step == 0
    generator = Generator((NUM_FEATURES,), 4, hidden=(16,))
    module = DataFreeDistillationModule(small_net(), _nan_weight(small_net()), generator, check_finite="step")
    with pytest.raises(
        FloatingPointError, match=r"at step 0: generator losses .*The teacher's weight '0\.weight'"
    ):
        make_trainer(limit_val_batches=0).fit(
            module, datamodule=LatentNoiseDataModule(data, 4, batch_size=8, batches_per_epoch=2)
        )
    assert module.global_step == 0


@pytest.mark.parametrize("value", ["yes", 1.0, None])
def test_check_finite_takes_true_false_or_step(value: Any) -> None:
    with pytest.raises(ValueError, match=r"check_finite must be True, False or 'step', got "):
        DistillationModule(small_net(), check_finite=value)
    with pytest.raises(ValueError, match=r"check_finite must be True, False or 'step', got "):
        MutualLearningModule([small_net(), small_net()], check_finite=value)


def test_labels_are_checked_when_a_datamodule_has_its_own_batch_hook(earlier: Earlier) -> None:
    class OwnHook(LabelsDataModule):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch  # Lightning then calls this one, not the module's

    with pytest.warns(UserWarning, match=r"overridden `on_before_batch_transfer` in both"):
        with pytest.raises(ValueError, match=r"Label 7 in a training batch is outside \[0, num_classes\)"):
            _fit(DistillationModule(small_net()), OwnHook(7, "train"), earlier)
    earlier.assert_untouched()
