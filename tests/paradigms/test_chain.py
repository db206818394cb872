"""Chains of distillation (born-again networks, teacher assistants): teachers, resuming, the YAML command."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_kd.cli import chain_main, run_chain_command
from lightning_kd.paradigms import ChainLink, run_chain
from lightning_kd.paradigms.chain import chain_table, ensemble_accuracy
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import CrashAtEpoch, RandomDataModule, small_net

CONFIGS = RECIPES_DIR / "mnist1d" / "paradigms"


TINY: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "limit_val_batches": 1,
    "logger": False,
    "enable_progress_bar": False,
}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """The student's weights in a checkpoint written by a link."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("student."): v for k, v in state.items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(pl.Callback):
    """Records every fit: its link's teacher (weights, frozen or not), loss terms and first epoch."""

    def __init__(self) -> None:
        self.fits: list[dict[str, Any]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = pl_module.teacher
        self.fits.append(
            {
                "teacher": None if teacher is None else state_of(teacher),
                "frozen": teacher is not None
                and not teacher.training
                and not any(p.requires_grad for p in teacher.parameters()),
                "terms": list(pl_module.loss_terms),
                "epoch": trainer.current_epoch,
            }
        )


def generations(count: int, epochs: int = 1, callbacks: list[pl.Callback] | None = None) -> list[ChainLink]:
    return [ChainLink(f"gen{k}", small_net(), epochs, callbacks=list(callbacks or [])) for k in range(count)]


def test_each_generation_is_taught_by_the_previous_ones_trained_weights(tmp_path: Path) -> None:
    recorder = Recorder()
    links = generations(3, callbacks=[recorder])
    initial = [state_of(link.model) for link in links]
    results = run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)

    assert [r.teacher for r in results] == [None, "gen0", "gen1"]
    assert [r.status for r in results] == ["trained"] * 3
    first, *taught = recorder.fits
    assert first["teacher"] is None and first["terms"] == ["ce"]  # the first link learns from the labels
    for k, fit in enumerate(taught, start=1):
        trained = state_of(links[k - 1].model)
        assert not same_state(trained, initial[k - 1])  # generation k-1 did train
        assert same_state(fit["teacher"], trained)
        assert same_state(fit["teacher"], checkpoint_weights(results[k - 1].checkpoint))
        assert fit["frozen"] and fit["terms"] == ["ce", "kd"]
    for result in results:
        stored = json.loads((tmp_path / result.name / "result.json").read_text())
        assert stored["accuracy"] == result.accuracy and 0.0 <= result.accuracy <= 1.0
        assert result.seconds_per_epoch > 0


def test_a_rerun_reuses_finished_links_and_refuses_another_chain(tmp_path: Path) -> None:
    first = run_chain(generations(2), RandomDataModule(), tmp_path, trainer=TINY)
    trained = [checkpoint_weights(r.checkpoint) for r in first]

    recorder = Recorder()
    links = generations(2, callbacks=[recorder])
    again = run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)
    assert recorder.fits == []
    assert [r.status for r in again] == ["reused", "reused"]
    assert [r.accuracy for r in again] == [r.accuracy for r in first]
    for link, saved in zip(links, trained, strict=True):
        assert same_state(state_of(link.model), saved)

    with pytest.raises(ValueError, match="another chain.*epochs"):
        run_chain(generations(2, epochs=2), RandomDataModule(), tmp_path, trainer=TINY)


def test_an_interrupted_link_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    links = generations(2, epochs=2)
    links[1].callbacks = [CrashAtEpoch(1)]  # after epoch 0 of gen1 is checkpointed
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)
    assert (tmp_path / "gen0" / "result.json").is_file()
    assert not (tmp_path / "gen1" / "result.json").exists()

    recorder = Recorder()
    results = run_chain(
        generations(2, epochs=2, callbacks=[recorder]), RandomDataModule(), tmp_path, trainer=TINY
    )
    assert [r.status for r in results] == ["reused", "resumed"]
    assert [fit["epoch"] for fit in recorder.fits] == [1]  # only gen1 fitted, from its second epoch


def test_an_interrupted_link_rerun_with_more_epochs_is_recorded_as_replanned(tmp_path: Path) -> None:
    links = generations(2, epochs=2)
    links[1].callbacks = [CrashAtEpoch(1)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)

    links = generations(2, epochs=2)
    links[1].epochs = 3
    with pytest.warns(UserWarning, match=r"planned for 8 optimizer steps \(max_epochs=2\), this run has 12"):
        results = run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)
    assert [(r.status, r.epochs, r.planned_epochs) for r in results] == [
        ("reused", 2, None),
        ("replanned", 3, 2),
    ]
    stored = json.loads((tmp_path / "gen1" / "result.json").read_text())
    assert (stored["status"], stored["planned_epochs"]) == ("replanned", 2)
    assert "replanned (planned 2 epochs)" in chain_table(results)

    again = run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)
    assert [(r.status, r.planned_epochs) for r in again] == [("reused", None), ("reused", 2)]


def test_an_interrupted_link_rerun_with_fewer_epochs_than_done_is_refused(tmp_path: Path) -> None:
    links = generations(1, epochs=3, callbacks=[CrashAtEpoch(2)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_chain(links, RandomDataModule(), tmp_path, trainer=TINY)
    with pytest.raises(
        ValueError,
        match=r"Link 'gen0' cannot be resumed with epochs=1: .* has trained 2 epochs.*give the link at least "
        rf"the epochs it has done, or delete '{tmp_path / 'gen0'}' to train it from scratch",
    ):
        run_chain(generations(1, epochs=1), RandomDataModule(), tmp_path, trainer=TINY)
    assert not (tmp_path / "gen0" / "result.json").exists()


def test_a_first_link_given_by_a_checkpoint_is_tested_not_trained(tmp_path: Path) -> None:
    datamodule = RandomDataModule()
    teacher = small_net(hidden=32).eval()
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    with torch.no_grad():
        expected_accuracy = (teacher(datamodule.x).argmax(dim=1) == datamodule.y).double().mean().item()

    recorder = Recorder()
    links = [
        ChainLink("teacher", small_net(hidden=32), checkpoint=str(path)),
        ChainLink("student", small_net(), epochs=1, callbacks=[recorder]),
    ]
    results = run_chain(links, datamodule, tmp_path / "out", trainer=TINY)
    assert [r.status for r in results] == ["given", "trained"]
    assert results[0].checkpoint == str(path)
    assert results[0].accuracy == pytest.approx(expected_accuracy, abs=1e-6)
    (fit,) = recorder.fits
    assert same_state(fit["teacher"], state_of(teacher))


def test_generation_ensemble_averages_probabilities() -> None:
    datamodule = RandomDataModule()
    models = [small_net().eval(), small_net().eval(), small_net().eval()]
    with torch.no_grad():
        probabilities = torch.stack([m(datamodule.x).double().softmax(dim=1) for m in models]).mean(dim=0)
    expected = (probabilities.argmax(dim=1) == datamodule.y).double().mean().item()
    accuracy = ensemble_accuracy(models, datamodule, {"accelerator": "cpu", "devices": 1})
    assert accuracy == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("links", "trainer", "message"),
    [
        ([], {}, "no links"),
        ([ChainLink("a", nn.Linear(2, 2), 1), ChainLink("a", nn.Linear(2, 2), 1)], {}, "unique"),
        ([ChainLink("a", nn.Linear(2, 2))], {}, "neither epochs nor a checkpoint"),
        ([ChainLink("a", nn.Linear(2, 2), 1, checkpoint="t.ckpt")], {}, "both a checkpoint and epochs"),
        ([ChainLink("a", nn.Linear(2, 2), 1)], {"callbacks": []}, "ChainLink.callbacks"),
    ],
)
def test_bad_chains_are_refused_with_the_fix(
    links: list[ChainLink], trainer: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        run_chain(links, RandomDataModule(), tmp_path, trainer=trainer)


@pytest.mark.parametrize(
    ("recipe", "names"),
    [("born_again", ["gen0", "gen1", "gen2"]), ("takd", ["teacher", "assistant", "student"])],
)
def test_recipe_runs_through_the_command(
    recipe: str, names: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_chain_command(
        [
            "--config",
            str(CONFIGS / f"{recipe}.yaml"),
            f"--out_dir={tmp_path}",
            "--progress=false",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--data.init_args.train_samples=600",
            "--data.init_args.val_samples=100",
            "--data.init_args.test_samples=200",
        ]
    )
    assert [r.name for r in results] == names
    assert [r.teacher for r in results] == [None, *names[:-1]]
    assert all(r.status == "trained" and r.epochs == 1 for r in results)
    assert sorted(p.parent.name for p in tmp_path.glob("*/result.json")) == sorted(names)
    table = capsys.readouterr().out
    assert all(name in table for name in names)
    assert ("ensemble of 3" in table) == (recipe == "born_again")


CHAIN_YAML = """
out_dir: {out_dir}
progress: false
trainer: {{accelerator: cpu, devices: 1, logger: false, limit_val_batches: 1}}
links:
  - name: only
    model: {{class_path: lightning_kd.models.MLP, init_args: {{in_features: 8, num_classes: 4, hidden: [8]}}}}
    epochs: {epochs}
data: {{class_path: tests.helpers.RandomDataModule}}
"""


def test_the_command_exits_with_status_0_after_a_successful_run(tmp_path: Path) -> None:
    """The console script is ``sys.exit(<entry point>())``: the entry point must return ``None`` (status 0).

    It returned the results list, which ``sys.exit`` prints to stderr with exit status 1.
    """
    entry = entry_points(group="console_scripts")["lightning-kd-chain"]
    assert entry.value == "lightning_kd.cli:chain_main"
    config = tmp_path / "chain.yaml"
    config.write_text(CHAIN_YAML.format(out_dir=tmp_path / "out", epochs=1))
    with pytest.raises(SystemExit) as exited:
        sys.exit(chain_main(["--config", str(config)]))
    assert exited.value.code is None  # the interpreter's exit status 0
    assert (tmp_path / "out" / "only" / "result.json").is_file()


def test_the_command_fails_with_the_message(tmp_path: Path) -> None:
    """A failure raises out of the entry point: the interpreter exits with status 1 and this message."""
    config = tmp_path / "chain.yaml"
    config.write_text(CHAIN_YAML.format(out_dir=tmp_path / "out", epochs=0))
    with pytest.raises(ValueError, match="Link 'only' has neither epochs nor a checkpoint: set epochs >= 1"):
        chain_main(["--config", str(config)])
