"""Exact resume by default: SIGKILL a fit at a random step, resume from its last checkpoint (mid-epoch or
epoch-end), and get the uninterrupted run's weights, optimizer state and logged metrics bit for bit."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

from lightning_kd import DistillationModule, TeacherViewCache
from lightning_kd.callbacks.exact_resume import ExactResume
from lightning_kd.data import ReplayedViews
from lightning_kd.teachers.fingerprints import input_signature
from lightning_kd.teachers.view_cache import view_cache_fingerprint
from tests.helpers import NUM_FEATURES, RandomDataModule, make_trainer, small_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from kill_resume import EPOCHS, SAMPLES, VIEWS, fit, run, run_and_kill, view_augmentation  # noqa: E402

STEPS_PER_EPOCH = 3  # kill_resume.py: 48 samples, batches of 16

#: name -> (scenario, options, the steps a kill may be chosen from)
CASES = {
    # dropout and random transforms in the main process, loaders re-created every epoch
    "mid-epoch, random transforms, reloaded loaders": (
        "schedules",
        ["--every-step", "--augment", "--reload"],
        range(2, 12),
    ),
    # random transforms in 2 worker processes, CRD's random negatives
    "mid-epoch, 2 workers, CRD": ("crd", ["--every-step", "--workers", "2", "--augment"], range(2, 12)),
    # killed in the first epoch, while the teacher cache is being filled
    "mid-epoch, teacher cache being filled": ("cache", ["--every-step", "--workers", "2"], range(2, 3)),
    # a TeacherViewCache of 2 replayable views (top-2, float16) filled in epochs 0 and 1: killed in epoch 0
    # after the teacher stored views the checkpoint does not know of, which the resumed run replays
    "mid-epoch, teacher view cache being filled": ("views", ["--every-step", "--workers", "2"], range(2, 4)),
    # ... and killed in epoch 2, where every view is replayed from the cache
    "mid-epoch, views replayed from the view cache": ("views", ["--every-step"], range(8, 10)),
}


def assert_equal(resumed: Any, reference: Any, where: str) -> None:
    """Equal nested containers, tensors bit for bit."""
    if isinstance(reference, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and torch.equal(resumed, reference), f"{where} differs"
    elif isinstance(reference, dict):
        assert resumed.keys() == reference.keys(), f"{where}: keys {resumed.keys()} vs {reference.keys()}"
        for key in reference:
            assert_equal(resumed[key], reference[key], f"{where}[{key!r}]")
    elif isinstance(reference, (list, tuple)):
        assert len(resumed) == len(reference), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(resumed, reference, strict=True)):
            assert_equal(a, b, f"{where}[{i}]")
    else:
        assert resumed == reference, f"{where}: {resumed!r} vs {reference!r}"


def assert_view_cache_of_the_run(
    directory: Path, reference: Path, state: dict[str, torch.Tensor], samples: int = SAMPLES
) -> None:
    """The ``views`` scenario's cache in ``directory``: every (sample, view) stored and intact, each the
    teacher's top-2 soft labels of the very view it was served for, and the files byte for byte those
    of the uninterrupted run's cache in ``reference``."""
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "lock"} == {
        p.name: p.read_bytes() for p in reference.iterdir() if p.name != "lock"
    }
    teacher = small_net(hidden=32).eval()
    teacher.load_state_dict(
        {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    )
    data = RandomDataModule(n=samples)
    views = ReplayedViews(TensorDataset(data.x, data.y), view_augmentation(), VIEWS)
    cache = TeacherViewCache(directory, views=VIEWS, top_k=2, dtype="float16")
    cache.open(view_cache_fingerprint(teacher, views), samples, teacher(data.x[:1]), num_params=3)
    try:
        assert cache.complete  # the fingerprint the fits computed; meta.json says complete
        keys = [(index, view) for index in range(samples) for view in range(VIEWS)]
        x, _, _, _, _ = batch = default_collate([views[key] for key in keys])
        rows = cache.indices_of(batch)
        assert torch.equal(rows, torch.arange(samples * VIEWS))
        # served: each row's CRC-32, stored view parameters and input signature checked against this view
        assert cache.lookup(rows, input_signature(x, len(rows))) is not None
        with torch.no_grad():
            top = teacher(x).topk(2, dim=-1)
        assert torch.equal(cache.arrays["topk_indices"].long(), top.indices)
        torch.testing.assert_close(cache.arrays["topk_values"].float(), top.values, rtol=1e-3, atol=1e-3)
    finally:
        cache.release()


def assert_same_run(resumed: dict[str, Any], reference: dict[str, Any], resumed_from: int) -> None:
    """The resumed run ends where the uninterrupted one does and logged what it logged at every step."""
    assert resumed["global_step"] == reference["global_step"]
    assert_equal(resumed["state"], reference["state"], "weights")
    assert_equal(resumed["optimizer"], reference["optimizer"], "optimizer state")
    assert_equal(resumed["metrics"], reference["metrics"], "final metrics")
    steps = sorted({step for step, where in resumed["records"] if where == "step"})
    assert steps == list(
        range(resumed_from + 1, reference["global_step"] + 1)
    )  # each batch once, none skipped
    for key, metrics in resumed["records"].items():
        assert "train/loss" in metrics
        expected = reference["records"][key]  # metrics logged before the resume are not in a checkpoint
        assert_equal(metrics, {name: expected[name] for name in metrics}, f"metrics logged at {key}")


@pytest.mark.parametrize("case", CASES)
def test_a_fit_killed_at_a_random_step_resumes_exactly(tmp_path: Path, case: str) -> None:
    scenario, options, steps = CASES[case]
    kill_at = random.Random(f"issue 18: {case}").choice(steps)  # seeded: the same in every session
    every_step = "--every-step" in options
    workers = int(options[options.index("--workers") + 1]) if "--workers" in options else 0
    flags = dict(
        every_step=every_step, workers=workers, augment="--augment" in options, reload="--reload" in options
    )
    reference = fit(tmp_path / "full", scenario, **flags)

    killed = tmp_path / "killed"
    assert run_and_kill(killed, scenario, kill_at, *options) == (kill_at, (kill_at - 1) // STEPS_PER_EPOCH)
    last = torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)
    # the kill step's own checkpoint is not written (checkpoints are saved after the other callbacks)
    saved_at = kill_at - 1 if every_step else STEPS_PER_EPOCH * ((kill_at - 1) // STEPS_PER_EPOCH)
    assert last["global_step"] == saved_at
    resumed = fit(killed, scenario, resume=True, **flags)

    assert_same_run(resumed, reference, saved_at)
    saved = last["state_dict"]  # the run did move on from the checkpoint (else equal weights prove nothing)
    assert any(not torch.equal(saved[k], v) for k, v in reference["state"].items() if k in saved)
    if scenario == "views":
        assert reference["teacher_steps"] == list(range(2 * STEPS_PER_EPOCH))  # 2 epochs fill, 2 replay
        assert_view_cache_of_the_run(
            killed / "view_cache", tmp_path / "full" / "view_cache", reference["state"]
        )


def test_a_2_process_ddp_fit_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    options = ["--every-step", "--augment", "--devices", "2"]
    kill_at = random.Random("issue 18: ddp").choice(
        range(2, 8)
    )  # 24 samples per process: 2 steps per epoch, 8 in all
    run(tmp_path / "full", "schedules", *options)
    killed = tmp_path / "killed"
    assert run_and_kill(killed, "schedules", kill_at, *options) == (kill_at, (kill_at - 1) // 2)
    assert torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == kill_at - 1
    run(killed, "schedules", "--resume", *options)

    for rank in (0, 1):
        reference = torch.load(tmp_path / "full" / f"final-rank{rank}.pt", weights_only=False)
        resumed = torch.load(killed / f"final-rank{rank}.pt", weights_only=False)
        assert reference["global_step"] == 2 * EPOCHS
        assert_same_run(resumed, reference, kill_at - 1)


def test_a_2_process_ddp_fit_filling_a_view_cache_killed_and_resumed_is_exact(tmp_path: Path) -> None:
    # 47 samples: the DistributedSampler pads each epoch with one repeated view, which both processes
    # see (rank 0 in its first batch, rank 1 in its last: 24 samples each, 2 steps per epoch) and the
    # first stores; epoch-end checkpoints; killed after step 4, the last batch of epoch 1, the second
    # filling epoch (the rerun of epoch 1 replays the views the killed run stored, the repeated one too)
    options = ["--devices", "2", "--samples", "47"]
    run(tmp_path / "full", "views", *options)
    killed = tmp_path / "killed"
    assert run_and_kill(killed, "views", 4, *options) == (4, 1)
    assert torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 2
    run(killed, "views", "--resume", *options)

    for rank in (0, 1):
        reference = torch.load(tmp_path / "full" / f"final-rank{rank}.pt", weights_only=False)
        resumed = torch.load(killed / f"final-rank{rank}.pt", weights_only=False)
        assert reference["global_step"] == 2 * EPOCHS
        assert reference["teacher_steps"] == [0, 1, 2, 3]  # epochs 0 and 1 fill, epochs 2 and 3 replay
        assert_same_run(resumed, reference, 2)
    cache = tmp_path / "full" / "view_cache"
    assert_view_cache_of_the_run(killed / "view_cache", cache, reference["state"], samples=47)
    # a second fit (one process) on the cache the two processes filled: served without the teacher
    second = fit(tmp_path / "second", "views", cache_dir=cache, samples=47)
    assert second["teacher_steps"] == [] and second["global_step"] == 3 * EPOCHS


class Stream(IterableDataset):
    """An IterableDataset without state: its position cannot be saved."""

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            yield (
                torch.randn(8, NUM_FEATURES, generator=generator),
                torch.randint(4, (8,), generator=generator),
            )


def _dataset() -> TensorDataset:
    return TensorDataset(torch.randn(32, NUM_FEATURES), torch.randint(4, (32,)))


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        (
            lambda: DataLoader(Stream(), batch_size=None),
            r"The training loader of the train_dataloaders given to Trainer\.fit is not resumed exactly: its "
            r"dataset, a Stream, is an IterableDataset without state_dict/load_state_dict, so a resumed run "
            r"restarts its stream\. Give the dataset state_dict/load_state_dict",
        ),
        (
            lambda: DataLoader(_dataset(), batch_size=8, sampler=WeightedRandomSampler([1.0] * 32, 32)),
            r"is not resumed exactly: its sampler, a WeightedRandomSampler, has no "
            r"state_dict/load_state_dict\. Give it state_dict/load_state_dict \(its position in the epoch "
            r"and its random state\), set order_set_by_epoch = True on it if its order depends on "
            r"set_epoch's epoch alone, or use shuffle=True",
        ),
    ],
    ids=["iterable dataset", "sampler"],
)
def test_a_loader_that_cannot_resume_exactly_is_named_once_at_the_start(loader: Any, message: str) -> None:
    trainer = make_trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1)  # asked for twice
    with pytest.warns(UserWarning, match=message) as warned:
        trainer.fit(DistillationModule(small_net()), train_dataloaders=loader())
    assert sum("is not resumed exactly" in str(w.message) for w in warned) == 1
    assert trainer.global_step == 8  # trained as given


def test_a_shuffled_dataloader_is_rebuilt_as_a_stateful_one_over_the_same_data() -> None:
    trainer = make_trainer(max_steps=1)
    trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())
    loader = trainer.train_dataloader
    assert type(loader).__name__ == "StatefulDataLoader" and loader.batch_size == 16
    assert [callback for callback in trainer.callbacks if isinstance(callback, ExactResume)]


def test_a_resume_with_another_explicit_seed_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="model")
    trainer = make_trainer(
        max_steps=2, callbacks=[checkpoint, ExactResume(seed=3)], enable_checkpointing=True
    )
    trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())
    resumed = make_trainer(max_steps=4, callbacks=[ExactResume(seed=4)])
    with pytest.raises(
        ValueError, match=r"ExactResume\(seed=4\) resumes a run made with seed=3; pass the checkpoint"
    ):
        resumed.fit(
            DistillationModule(small_net()), datamodule=RandomDataModule(), ckpt_path=tmp_path / "model.ckpt"
        )
