"""The lightning-kd command: teacher -> baseline -> KD from the shipped YAML recipes."""

from __future__ import annotations

import glob
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from lightning_kd import DistillationModule
from lightning_kd.cli import main
from lightning_kd.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR


SMALL = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.train_samples=600",
    "--data.init_args.val_samples=100",
    "--data.init_args.test_samples=200",
]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the recipes write to ./runs
    return tmp_path


def test_teacher_baseline_and_kd_from_yaml(in_tmp: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist1d/teacher.yaml"), *SMALL])
    teacher_ckpt = in_tmp / "runs/mnist1d/teacher/latest.ckpt"
    assert teacher_ckpt.is_file()
    main(["fit", "--config", str(CONFIGS / "mnist1d/baseline.yaml"), *SMALL])
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "mnist1d/kd.yaml"),
            "--config",
            str(CONFIGS / "mnist1d/kd_annealed.yaml"),
            *SMALL,
        ]
    )
    kd_ckpt = in_tmp / "runs/mnist1d/kd_annealed/latest.ckpt"
    state = torch.load(kd_ckpt, weights_only=True)
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    # the config recorded by LightningCLI rebuilds the module, teacher from its checkpoint
    module = DistillationModule.load_from_checkpoint(kd_ckpt)
    teacher_state = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    for name, tensor in module.teacher.state_dict().items():
        assert torch.equal(tensor, teacher_state[f"student.{name}"]), name
    assert module.loss_terms["kd"].weight == 0.9 and module.loss_terms["ce"].weight == 0.1
    metrics = (in_tmp / "runs/mnist1d/kd_annealed/version_0/metrics.csv").read_text()
    for key in ("train/loss_kd", "kd/temperature", "kd/weight_kd", "val/teacher_acc", "val/agreement"):
        assert key in metrics


def test_a_checkpoint_reloads_from_another_directory(
    in_tmp: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist1d/teacher.yaml"), *SMALL])
    main(["fit", "--config", str(CONFIGS / "mnist1d/kd.yaml"), *SMALL])
    kd_ckpt = in_tmp / "runs/mnist1d/kd/latest.ckpt"
    teacher_ckpt = (in_tmp / "runs/mnist1d/teacher/latest.ckpt").resolve()  # the run's own file
    recorded = torch.load(kd_ckpt, weights_only=True)["hyper_parameters"]["teacher_checkpoint"]
    assert recorded == str(teacher_ckpt.resolve())  # the YAML's relative path, made absolute
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    module = DistillationModule.load_from_checkpoint(kd_ckpt)
    teacher_state = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, teacher_state[f"student.{k}"]) for k, v in module.teacher.state_dict().items())
    moved = teacher_ckpt.rename(teacher_ckpt.with_name("moved.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"recorded there .*teacher\.ckpt.*teacher_checkpoint=\.\.\."):
        DistillationModule.load_from_checkpoint(kd_ckpt)
    module = DistillationModule.load_from_checkpoint(kd_ckpt, teacher_checkpoint=moved)
    assert module.teacher_checkpoint == str(moved)


def test_print_config_shows_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "mnist1d/kd.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_kd.models.MLP" in printed
    assert "teacher_checkpoint: runs/mnist1d/teacher/latest.ckpt" in printed
    assert "temperature: 4.0" in printed


def test_missing_teacher_checkpoint_in_yaml(in_tmp: Path) -> None:
    # the module's own error, not jsonargparse's "Does not validate against any of the Union subtypes"
    with pytest.raises(FileNotFoundError) as error:
        main(["fit", "--config", str(CONFIGS / "mnist1d/kd.yaml"), *SMALL])
    missing = in_tmp.resolve() / "runs/mnist1d/teacher/latest.ckpt"
    assert str(error.value).startswith(
        f"Teacher checkpoint '{missing}' does not exist. Train the teacher first "
        "(e.g. `lightning-kd fit --config mnist1d/teacher`) or fix the path."
    )
    printed = "".join(traceback.format_exception(error.value))
    assert "Union" not in printed and printed.rstrip().splitlines()[-1].startswith(
        "FileNotFoundError: Teacher"
    )


@pytest.mark.parametrize("fault", ["empty", "directory", "flipped"])
def test_an_unloadable_ckpt_path_is_refused_before_anything_is_built(in_tmp: Path, fault: str) -> None:
    folder = in_tmp / "checkpoints"
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.arange(64.0)}}, folder / "epoch=0.ckpt")
    path = folder / "last.ckpt"
    if fault == "empty":
        path.write_bytes(b"")
        message = f"Cannot load --ckpt_path '{path}': it is empty (0 bytes), left by a save that was cut off."
    elif fault == "directory":
        path = folder
        message = f"Cannot load --ckpt_path '{path}': it is a directory, not a checkpoint file."
    else:
        data = bytearray((folder / "epoch=0.ckpt").read_bytes())
        start = data.index(torch.arange(64.0).numpy().tobytes())  # the tensor's bytes in the archive
        data[start + 40 : start + 44] = b"\xff\xff\xff\xff"
        path.write_bytes(data)
        message = f"Cannot load --ckpt_path '{path}': its bytes changed after it was written (Bad CRC-32"
    hint = "Pass a checkpoint file in it" if fault == "directory" else "Pass an earlier checkpoint"
    with pytest.raises(ValueError) as error:
        main(["fit", "--config", str(CONFIGS / "mnist1d/baseline.yaml"), *SMALL, f"--ckpt_path={path}"])
    assert str(error.value).startswith(message)
    assert f"{hint}, e.g. 'epoch=0.ckpt' in '{folder}'" in str(error.value)
    assert not (in_tmp / "runs").exists()  # refused before a run folder was made


def test_unknown_key_gets_lightningclis_message(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "mnist1d/baseline.yaml"), "--model.init_args.temprature=3"])
    assert "temprature" in capsys.readouterr().err


def test_wandb_logger_writes_an_offline_run(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = [str(CONFIGS / "mnist1d/kd.yaml"), "--config", str(CONFIGS / "loggers/wandb.yaml")]
    main(["fit", "--config", str(CONFIGS / "mnist1d/teacher.yaml"), *SMALL])
    main(["fit", "--config", *recipe, *SMALL])
    wandb.finish()
    wandb.teardown()  # stop the wandb service, which writes the run file
    runs = glob.glob(str(in_tmp / "runs/wandb/offline-run-*"))
    assert len(runs) == 1
    (data_file,) = Path(runs[0]).glob("run-*.wandb")
    # protobuf records: names and config values are stored as UTF-8. On a loaded machine the
    # service may still be flushing when teardown returns: read until everything is there.
    expected = ["train/loss_kd", "train/loss_ce", "train/acc", "val/acc", "val/teacher_acc", "val/agreement"]
    expected += ["teacher_checkpoint", "lightning_kd.KDTerm", "lightning_kd.models.ConvNet1d"]
    deadline = time.monotonic() + 60
    while True:
        records = data_file.read_bytes()
        missing = [key for key in expected if key.encode() not in records]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"not in the offline W&B run: {missing}"


def test_fit_prints_a_summary_with_the_gain(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist1d/teacher.yaml"), *SMALL])
    main(["fit", "--config", str(CONFIGS / "mnist1d/kd.yaml"), *SMALL, "--baseline_accuracy=0.5"])
    out = capsys.readouterr().out
    summary = out[out.rindex("Fit finished:") :].splitlines()
    values = {line[:28].strip(): line[28:].strip() for line in summary[1:]}
    student = float(values["student (val/acc)"])
    assert float(values["baseline (given)"]) == 50.0
    assert float(values["gain over the baseline"]) == pytest.approx(student - 50.0, abs=0.011)
    assert 0.0 <= float(values["teacher (val/teacher_acc)"]) <= 100.0
    assert values["checkpoint"].endswith("kd.ckpt") and Path(values["checkpoint"]).exists()
    assert values["time"].endswith("(1 epochs)")


def test_report_callbacks_from_the_command_line(in_tmp: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist1d/teacher.yaml"), *SMALL])
    report = "--trainer.callbacks+=lightning_kd.callbacks.DistillationReport"
    compression = "--trainer.callbacks+=lightning_kd.callbacks.CompressionReport"
    main(["fit", "--config", str(CONFIGS / "mnist1d/kd.yaml"), *SMALL, report, compression])
    for name in ("per_class_accuracy.png", "reliability.png"):
        assert (in_tmp / "runs/mnist1d/kd/version_0/checkpoints" / name).read_bytes().startswith(b"\x89PNG")
    table = (in_tmp / "runs/mnist1d/kd/version_0/checkpoints/compression.md").read_text()
    assert "78.9 K" in table and "102 K" in table  # the MLP student's and the ConvNet1d teacher's parameters


def test_recipes_are_listed_copied_and_run_by_name(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["recipes"])
    listed = capsys.readouterr().out.split()
    assert {"mnist1d/kd", "mnist1d/teacher", "cifar100/methods/dkd", "loggers/wandb"} <= set(listed)
    main(["recipes", "copy", "mnist1d/kd", "my_kd.yaml"])
    assert (in_tmp / "my_kd.yaml").read_text() == (RECIPES_DIR / "mnist1d/kd.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["recipes", "copy", "mnist1d/kd", "my_kd.yaml"])  # never overwrites
    assert "nothing was overwritten" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"Closest recipes: \['mnist1d/kd'"):
        main(["fit", "--config", "mnist1d/kdd", *SMALL])
    main(["fit", "--config", "mnist1d/teacher", *SMALL])  # a name, from a folder with no recipes
    assert (in_tmp / "runs/mnist1d/teacher/latest.ckpt").resolve().is_file()


def test_a_second_run_never_overwrites_the_first(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", "--config", "mnist1d/teacher", *SMALL])
    first = in_tmp / "runs/mnist1d/teacher/version_0/checkpoints/teacher.ckpt"
    first_bytes = first.read_bytes()
    latest = in_tmp / "runs/mnist1d/teacher/latest.ckpt"
    assert latest.resolve() == first.resolve()
    main(["fit", "--config", "mnist1d/teacher", *SMALL, "--seed_everything=1"])
    assert first.read_bytes() == first_bytes
    second = in_tmp / "runs/mnist1d/teacher/version_1/checkpoints/teacher.ckpt"
    assert latest.resolve() == second.resolve() and second.read_bytes() != first_bytes
    printed = [line for line in capsys.readouterr().out.splitlines() if "latest of this recipe" in line]
    assert printed[-1].endswith("runs/mnist1d/teacher/latest.ckpt")


def test_ckpt_path_last_resumes_the_newest_checkpoint_of_an_earlier_run(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["fit", "--config", "mnist1d/teacher", *SMALL, "--ckpt_path=last"])  # nothing yet: starts afresh
    first = in_tmp / "runs/mnist1d/teacher/version_0/checkpoints/teacher.ckpt"
    first_bytes = first.read_bytes()
    assert torch.load(first, weights_only=False)["global_step"] == 3
    with pytest.warns(UserWarning, match="Resumed with another run length"):
        main(["fit", "--config", "mnist1d/teacher", *SMALL, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert f"--ckpt_path last: resuming from {first.relative_to(in_tmp)}," in capsys.readouterr().out
    second = torch.load(
        in_tmp / "runs/mnist1d/teacher/version_1/checkpoints/teacher.ckpt", weights_only=False
    )
    assert second["global_step"] == 6 and second["epoch"] == 1
    logged = (in_tmp / "runs/mnist1d/teacher/version_1/metrics.csv").read_text().splitlines()
    epoch = logged[0].split(",").index("epoch")
    assert {row.split(",")[epoch] for row in logged[1:]} == {"1"}  # epoch 0 was the first run's
    assert first.read_bytes() == first_bytes


def test_a_non_editable_install_runs_a_shipped_recipe_from_an_empty_folder(tmp_path: Path) -> None:
    root = RECIPES_DIR.parents[1]
    wheels, target, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, root], check=True)
    (wheel,) = wheels.glob("lightning_kd-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    script = (
        "import lightning_kd, sys; print(lightning_kd.__file__); from lightning_kd.cli import main; main()"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    run = subprocess.run(
        [sys.executable, "-c", script, "fit", "--config", "mnist1d/teacher", *SMALL],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.splitlines()[0].startswith(str(target))  # the installed copy, not the checkout
    assert (empty / "runs/mnist1d/teacher/latest.ckpt").resolve().is_file()
    assert (target / "lightning_kd/py.typed").exists() and list(
        target.glob("lightning_kd-*/licenses/LICENSE")
    )


def test_the_command_introduces_itself_and_its_help_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert "Knowledge distillation" in top and "`lightning-kd recipes` lists them" in top
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lightning_kd.DistillationModule"])
    model_help = capsys.readouterr().out
    assert "--model.teacher_checkpoint" in model_help and "lightning_kd.models.MLP" in model_help
    assert len(model_help.splitlines()) < 300  # every torch/timm module class was listed: ~1,500 lines
    assert "torch.nn.ReLU" not in model_help and ":func:" not in model_help
