"""TeacherViewCache: the teacher's outputs per replayed view, served only for the view the teacher saw.

Each fault test injects one fault (a changed augmentation, a damaged row, another format, a
second writer, a mismatched setup) and asserts the exact message or the correct result.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_kd import CrossEntropyTerm, DistillationModule, FitNetTerm, KDTerm, TeacherViewCache
from lightning_kd.cli import main
from lightning_kd.data import (
    ReplayableAugmentation,
    ReplayedViews,
    ReplayedViewsDataModule,
    SignalNoise,
    SignalScale,
    SignalShift,
    SplitsDataModule,
)
from lightning_kd.recipes import RECIPES_DIR
from lightning_kd.teachers import fill_view_cache
from lightning_kd.teachers import view_cache as view_cache_module
from lightning_kd.teachers.fingerprints import input_signature
from tests.helpers import NUM_CLASSES, NUM_FEATURES, make_trainer, small_net

N, V = 24, 2  # samples, views


class Signals(SplitsDataModule):
    """``N`` random 8-sample signals with labels of a fixed linear map."""

    def __init__(self) -> None:
        super().__init__(batch_size=8, num_workers=0)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, NUM_FEATURES, generator=generator)
        self.y = (self.x @ torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)).argmax(dim=1)

    def setup(self, stage: str | None = None) -> None:
        self.datasets = {name: TensorDataset(self.x, self.y) for name in ("train", "val", "test")}


def augmentation(seed: int = 0) -> ReplayableAugmentation:
    return ReplayableAugmentation([SignalShift(2), SignalScale(0.8, 1.2), SignalNoise(0.1)], seed=seed)


def views_data(views: int = V, seed: int = 0) -> ReplayedViewsDataModule:
    return ReplayedViewsDataModule(Signals(), augmentation(seed), views)


def kd_fit(
    cache: TeacherViewCache | None, epochs: int, teacher: torch.nn.Module | None = None, **data: Any
) -> tuple:
    """(module, teacher calls per epoch) of a KD fit on replayed views; the same seeds in every call."""
    torch.manual_seed(0)
    teacher, student = teacher if teacher is not None else small_net(), small_net()
    losses = [CrossEntropyTerm("ce", weight=0.1), KDTerm("kd", weight=0.9, temperature=4.0)]
    module = DistillationModule(student, teacher, losses=losses, teacher_cache=cache)
    calls: list[int] = []
    module.teacher.register_forward_hook(lambda *_: calls.append(module.current_epoch))
    make_trainer(max_epochs=epochs, limit_val_batches=0).fit(module, datamodule=views_data(**data))
    return module, calls


def stored_cache(
    directory: Path | None, rows: list[tuple[int, int]], top_k: int | None = None
) -> TeacherViewCache:
    """A cache of ``N`` samples with the views ``rows`` stored (logits: a fixed random draw)."""
    cache = TeacherViewCache(directory, views=V, top_k=top_k)
    cache.open("teacher-a", N, torch.zeros(1, NUM_CLASSES), num_params=3)
    batch = keyed_batch(rows)
    indices = cache.indices_of(batch)
    cache.store(indices, logits_of(indices), {}, input_signature(batch[0], len(rows)))
    cache.finish_epoch()
    return cache


def keyed_batch(rows: list[tuple[int, int]], seed: int = 0) -> tuple:
    x = Signals().x
    items = [augmentation(seed)(x[i], i, v) for i, v in rows]
    return (
        torch.stack([view for view, _ in items]),
        None,
        torch.tensor([i for i, _ in rows]),
        torch.tensor([v for _, v in rows]),
        torch.stack([params for _, params in items]),
    )


def logits_of(rows: torch.Tensor) -> torch.Tensor:
    return torch.randn(N * V, NUM_CLASSES, generator=torch.Generator().manual_seed(5))[rows]


ALL = [(i, v) for i in range(N) for v in range(V)]


def test_a_cached_fit_trains_on_the_replayed_views_and_skips_the_teacher_once_they_are_stored() -> None:
    online, online_calls = kd_fit(None, epochs=3)
    cache = TeacherViewCache(views=V)
    module, calls = kd_fit(cache, epochs=3)
    assert online_calls.count(2) == 3  # online KD: the teacher runs on each of the 3 batches of every epoch
    assert calls.count(0) == 1 + 3 and calls.count(1) == 3 and calls.count(2) == 0  # probe, 2 fill epochs
    assert cache.complete
    x = Signals().x
    with torch.no_grad():  # every row: the teacher's output on that view, and the view's parameters
        for index, view in ALL:
            replayed, params = augmentation()(x[index], index, view)
            row = index * V + view
            assert torch.equal(cache.arrays["params"][row], params)
            torch.testing.assert_close(
                cache.arrays["logits"][row], module.teacher(replayed[None])[0], rtol=0, atol=1e-6
            )
    for name, value in online.student.state_dict().items():  # the student saw the same views and soft labels
        torch.testing.assert_close(module.student.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_topk_rows_rebuild_the_top_k_probabilities_and_spread_the_tail_mass() -> None:
    cache = stored_cache(None, ALL, top_k=2)
    rows = [(3, 1), (7, 0)]
    batch = keyed_batch(rows)
    indices = cache.indices_of(batch)
    served, _ = cache.lookup(indices, input_signature(batch[0], 2))
    teacher = torch.softmax(logits_of(indices).double(), dim=-1)  # float64, from the stored draw
    top, classes = teacher.topk(2, dim=-1)
    expected = ((1 - top.sum(-1, keepdim=True)) / (NUM_CLASSES - 2)).expand(-1, NUM_CLASSES).clone()
    expected.scatter_(-1, classes, top)
    torch.testing.assert_close(torch.softmax(served.double(), dim=-1), expected, rtol=0, atol=1e-6)


def test_a_view_the_teacher_did_not_see_is_never_served() -> None:
    cache = stored_cache(None, [(i, 0) for i in range(N)])  # only view 0 of each sample
    batch = keyed_batch([(0, 0), (5, 1)])
    assert cache.lookup(cache.indices_of(batch), input_signature(batch[0], 2)) is None  # the teacher must run
    with pytest.raises(LookupError, match="holds no view 1 of sample 5"):
        cache.view_params(5, 1)
    other_draw = keyed_batch([(0, 0), (1, 0)], seed=9)  # other parameters than the stored view 0
    with pytest.raises(
        RuntimeError, match=r"Training sample 0, view 0: the input replayed now is not the view"
    ):
        cache.lookup(cache.indices_of(other_draw), input_signature(other_draw[0], 2))
    same_input = (*keyed_batch([(2, 0)])[:4], keyed_batch([(2, 0)], seed=9)[4])  # right input, other params
    with pytest.raises(RuntimeError, match=r"Training sample 2, view 0: the batch's view parameters \["):
        cache.lookup(cache.indices_of(same_input), input_signature(same_input[0], 1))


def test_a_stored_view_keeps_its_first_soft_labels_and_is_checked_when_stored_again() -> None:
    cache = stored_cache(None, ALL[:4])  # samples 0 and 1, both views: rows 0-3
    first = cache.arrays["logits"].clone()
    batch = keyed_batch([(1, 1), (2, 0)])  # (1, 1) stored already, as by another process in this epoch
    rows = cache.indices_of(batch)
    recomputed = torch.full((2, NUM_CLASSES), 7.0)  # the teacher's values of another batch composition
    cache.store(rows, recomputed, {}, input_signature(batch[0], 2))
    assert torch.equal(cache.arrays["logits"][3], first[3])  # the first soft labels stay
    assert torch.equal(cache.arrays["logits"][4], recomputed[1]) and bool(cache.arrays["filled"][4])
    # what the step trains on
    assert torch.equal(cache.served(rows)[0], torch.stack([first[3], recomputed[1]]))

    before = {name: array.clone() for name, array in cache.arrays.items()}
    other_params = (*keyed_batch([(1, 1)])[:4], keyed_batch([(1, 1)], seed=9)[4])
    with pytest.raises(RuntimeError, match=r"Training sample 1, view 1: the batch's view parameters \["):
        cache.store(
            cache.indices_of(other_params), torch.zeros(1, NUM_CLASSES), {}, input_signature(batch[0], 1)
        )
    right = keyed_batch([(1, 1), (5, 0)])
    other_input = (right[0] + 1.0, *right[1:])  # the stored parameters, another input
    with pytest.raises(
        RuntimeError, match=r"Training sample 1, view 1: the input replayed now is not the view"
    ):
        cache.store(
            cache.indices_of(other_input), torch.zeros(2, NUM_CLASSES), {}, input_signature(other_input[0], 2)
        )
    for name, array in cache.arrays.items():  # nothing written by a refused store
        assert torch.equal(array, before[name]), name


def test_a_fit_on_a_filled_cache_repeats_the_fit_that_filled_it_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = small_net()
    filling, calls = kd_fit(TeacherViewCache(tmp_path, views=V, top_k=2, dtype="float16"), 3, teacher)
    assert calls.count(0) == 1 + 3 and calls.count(1) == 3 and calls.count(2) == 0  # probe, 2 epochs fill
    reading, calls = kd_fit(TeacherViewCache(tmp_path, views=V, top_k=2, dtype="float16"), 3, teacher)
    assert calls == [0]  # the probe at set-up only
    # the filling fit trained on the top-2 float16 soft labels it stored, not on the teacher's full logits
    for name, value in filling.student.state_dict().items():
        assert torch.equal(reading.student.state_dict()[name], value), name


def test_a_changed_replay_stops_a_fit_that_reads_a_stored_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    teacher = small_net()
    kd_fit(TeacherViewCache(tmp_path, views=V), epochs=2, teacher=teacher)  # fills both views
    original = SignalScale.apply
    monkeypatch.setattr(SignalScale, "apply", lambda self, x, p: original(self, x, p) * 1.0001)  # same repr
    with pytest.raises(
        RuntimeError, match=r"Training sample \d+, view \d: the input replayed now is not the view"
    ):
        kd_fit(TeacherViewCache(tmp_path, views=V), epochs=1, teacher=teacher)


def test_another_augmentation_or_format_rebuilds_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    teacher = small_net()
    kd_fit(TeacherViewCache(tmp_path, views=V), epochs=2, teacher=teacher)
    with pytest.warns(UserWarning, match="was built for another teacher, dataset or layout: rebuilding it"):
        _, calls = kd_fit(TeacherViewCache(tmp_path, views=V), epochs=1, teacher=teacher, seed=1)
    assert calls.count(0) == 1 + 3  # the teacher ran on every batch: nothing of the other seed's views served
    monkeypatch.setattr(view_cache_module, "VIEW_FORMAT_VERSION", view_cache_module.VIEW_FORMAT_VERSION + 1)
    with pytest.warns(UserWarning, match="was built for another teacher, dataset or layout: rebuilding it"):
        cache = stored_cache(tmp_path, [(0, 0)])
    assert int(cache.arrays["filled"].sum()) == 1


def test_a_damaged_row_is_an_error_naming_the_sample_view_and_file(tmp_path: Path) -> None:
    stored_cache(tmp_path, ALL).release()
    params = np.load(tmp_path / "params.npy", mmap_mode="r")
    offset = params.offset + (3 * V + 1) * params[0].nbytes
    with open(tmp_path / "params.npy", "r+b") as file:  # one bit of sample 3, view 1's parameters
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 1]))
    cache = TeacherViewCache(tmp_path, views=V)
    cache.open("teacher-a", N, torch.zeros(1, NUM_CLASSES), num_params=3)
    batch = keyed_batch([(3, 1)])
    with pytest.raises(
        RuntimeError,
        match=rf"cache in {tmp_path} is damaged: the row of training sample 3, view 1 in params.npy does not",
    ):
        cache.lookup(cache.indices_of(batch), input_signature(batch[0], 1))


def open_as_another_run(directory: Path, sender: Any) -> None:
    try:
        TeacherViewCache(directory, views=V).open("teacher-b", N, torch.zeros(1, NUM_CLASSES), num_params=3)
        sender.send("opened")
    except RuntimeError as error:
        sender.send(str(error))


def test_a_second_writer_is_refused_and_the_first_writers_files_survive(tmp_path: Path) -> None:
    cache = stored_cache(tmp_path, ALL[:5])  # incomplete: this process holds the writer's lock
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    other = context.Process(target=open_as_another_run, args=(tmp_path, sender))
    other.start()
    other.join(timeout=60)
    message = receiver.recv() if receiver.poll(0) else "no answer"
    assert message.startswith(
        f"The teacher cache directory {tmp_path} is in use by another process (pid {os.getpid()} on host "
        f"{socket.gethostname()}, writing since "
    ), message
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    cache.release()


def test_a_separate_fill_pass_resumes_and_serves_the_whole_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    teacher = small_net()
    data = views_data()
    data.setup("fit")
    store, stored = TeacherViewCache.store, []

    def interrupted(self: TeacherViewCache, *args: Any) -> None:  # the third of 3 batches never arrives
        if len(stored) == 2:
            raise KeyboardInterrupt
        stored.append(store(self, *args))

    monkeypatch.setattr(TeacherViewCache, "store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fill_view_cache(teacher, data.datasets["train"], TeacherViewCache(tmp_path, views=V), batch_size=16)
    monkeypatch.undo()
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    cache = fill_view_cache(
        teacher, data.datasets["train"], TeacherViewCache(tmp_path, views=V), batch_size=16
    )
    assert cache.complete and len(calls) == 1 + 1  # the probe, and the one batch not stored before
    _, calls = kd_fit(TeacherViewCache(tmp_path, views=V), epochs=2, teacher=teacher)
    assert calls == [0]  # the probe at set-up only: every view was served from the files


def test_setups_that_cannot_be_served_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="replays 2 views per sample but TeacherViewCache stores 3"):
        kd_fit(TeacherViewCache(views=3), epochs=1)
    module = DistillationModule(small_net(), small_net(), teacher_cache=TeacherViewCache(views=V))
    with pytest.raises(
        TypeError, match="the training dataset is a TensorDataset: wrap it in lightning_kd.data"
    ):
        make_trainer(limit_val_batches=0).fit(module, datamodule=Signals())
    with pytest.raises(ValueError, match=r"the loss terms read the teacher layers \['1'\]"):
        DistillationModule(
            small_net(), small_net(), losses=[FitNetTerm("1", "1")], teacher_cache=TeacherViewCache(views=V)
        )
    cache = TeacherViewCache(views=V)
    cache.open("t", N, torch.zeros(1, NUM_CLASSES), num_params=3)
    with pytest.raises(IndexError, match="stores 2 views per sample but a batch has view 2"):
        cache.indices_of((None, None, torch.tensor([0]), torch.tensor([2]), torch.zeros(1, 3)))
    with pytest.raises(KeyError, match=r"reads each sample's view at 3, which the batch lacks"):
        cache.indices_of((None, None, torch.tensor([0])))
    with pytest.raises(TypeError, match=r"read with \(sample index, view\) keys"):
        ReplayedViews(TensorDataset(torch.zeros(2, 4)), augmentation(), V)[0]


def test_the_recipe_fits_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(RECIPES_DIR / "mnist1d" / "kd_augmented_cache.yaml"),
            "--model.init_args.teacher_checkpoint=null",
            "--trainer.max_epochs=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.datamodule.init_args.train_samples=100",
            "--data.init_args.datamodule.init_args.val_samples=20",
            "--data.init_args.datamodule.init_args.test_samples=50",
        ]
    )
    cache = tmp_path / "runs/mnist1d/teacher_view_cache"
    filled = np.load(cache / "filled.npy")
    assert filled.shape == (80 * 16,) and filled.sum() == 2 * 80  # 2 epochs of 80 samples, a new view each
    assert (tmp_path / "runs/mnist1d/kd_augmented_cache/latest.ckpt").exists()
