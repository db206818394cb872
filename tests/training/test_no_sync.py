"""No training step waits for the device, except Lightning's logging steps.

On the CPU nothing is "on a device", so the batch is handed to the step as a :class:`DeviceTensor`
(a tensor subclass, through the module's ``transfer_batch_to_device``): every tensor computed from
it is one too, and each read of its values on the host (``.item()``, ``bool()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``float()``, ``int()``, ``torch.equal`` ...) is recorded with its stack
while a non-logging training step runs: from ``on_train_batch_start`` until the next step starts
(so Lightning's own end-of-batch work, the progress bar and the loggers, is included).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import (
    CausalLMDistillationModule,
    CrossEntropyTerm,
    CTKDTerm,
    DistillationModule,
    DKDTerm,
    FitNetTerm,
    KDTerm,
    MLKDTerm,
    TeacherOutputCache,
    TokenCrossEntropyTerm,
    TokenDivergenceTerm,
)
from lightning_kd.data import TwoViews, WithIndex, collate_two_views
from lightning_kd.data.latent_noise import LatentNoiseDataModule
from lightning_kd.models.generator import Generator
from lightning_kd.paradigms import (
    DataFreeDistillationModule,
    EmbeddingDistillationModule,
    MutualLearningModule,
)
from tests.helpers import NUM_FEATURES, RandomDataModule, small_net

#: torch functions that return a Python value computed from a tensor's data, or a tensor whose
#: shape depends on the data (on an accelerator the host waits to learn the size)
_READING_FUNCTIONS = {
    "equal",
    "allclose",
    "is_nonzero",
    "unique",
    "unique_consecutive",
    "nonzero",
    "argwhere",
    "masked_select",
    "bincount",
}


def _boolean_index(func: Any, args: Any) -> bool:
    """Whether ``func(args)`` indexes with a bool tensor (its result's size depends on the data)."""
    if getattr(func, "__name__", "") != "__getitem__" or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(part, Tensor) and part.dtype == torch.bool for part in index)


#: reads inside files under this path are the models' own (transformers' forward), not the step's
_MODEL_CODE = f"{os.sep}transformers{os.sep}"


class SyncRecorder:
    """The reads of :class:`DeviceTensor` values while ``active``, each with its stack."""

    active = False
    reads: list[str] = []

    @classmethod
    def record(cls, what: str) -> None:
        if not cls.active:
            return
        stack = traceback.extract_stack()[:-2]
        if any(_MODEL_CODE in frame.filename for frame in stack):
            return  # the model's own forward (Hugging Face checks its padding mask): not the library's
        cls.reads.append(f"{what}\n{''.join(traceback.format_list(stack[-10:]))}")


class DeviceTensor(Tensor):
    """A tensor standing for one on an accelerator: reading its values on the host is recorded."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in _READING_FUNCTIONS or _boolean_index(func, args):
            SyncRecorder.record(f"torch.{func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})

    def __deepcopy__(self, memo: dict) -> Tensor:
        return self.as_subclass(Tensor).__deepcopy__(memo).as_subclass(DeviceTensor)

    def item(self) -> Any:
        SyncRecorder.record(".item()")
        return super().item()

    def tolist(self) -> Any:
        SyncRecorder.record(".tolist()")
        return super().tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        SyncRecorder.record(".numpy()")
        return super().numpy(*args, **kwargs)

    def cpu(self, *args: Any, **kwargs: Any) -> Tensor:
        SyncRecorder.record(".cpu()")
        return super().cpu(*args, **kwargs).as_subclass(Tensor)  # on the host now

    def __bool__(self) -> bool:
        SyncRecorder.record("bool()")
        return super().__bool__()

    def __float__(self) -> float:
        SyncRecorder.record("float()")
        return super().__float__()

    def __int__(self) -> int:
        SyncRecorder.record("int()")
        return super().__int__()

    def __index__(self) -> int:
        SyncRecorder.record("index")
        return super().__index__()


def _on_device(batch: Any, device: Any, dataloader_idx: int) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.as_subclass(DeviceTensor))


class StepsLogger(Logger):
    """Every ``log_metrics`` call: ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    name = "steps"
    version = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class WatchSteps(pl.Callback):
    """Records reads during training steps that are not logging steps (nor ``exempt(epoch, batch_idx)``)."""

    def __init__(self, exempt: Callable[[int, int], bool]) -> None:
        self.exempt = exempt
        self.watched = 0
        self.logging_steps: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        SyncRecorder.active = False  # the previous step ends here
        if trainer._logger_connector.should_update_logs:
            self.logging_steps.append(trainer.fit_loop.epoch_loop._batches_that_stepped)
        elif not self.exempt(trainer.current_epoch, batch_idx):
            self.watched += 1
            SyncRecorder.active = True

    def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
        SyncRecorder.active = False

    on_validation_start = on_train_end = on_train_epoch_end  # type: ignore[assignment]


def _data() -> tuple[Tensor, Tensor]:
    data = RandomDataModule(n=96)
    return data.x, data.y


def _loader(indexed: bool = False) -> DataLoader:
    dataset = TensorDataset(*_data())
    return DataLoader(WithIndex(dataset) if indexed else dataset, batch_size=16)


def _kd() -> tuple[pl.LightningModule, DataLoader]:
    return DistillationModule(small_net(), small_net(hidden=32)), _loader()


def _fitnet() -> tuple[pl.LightningModule, DataLoader]:
    terms = [KDTerm("kd", weight=0.9), FitNetTerm("0", "0", weight=1.0)]
    return DistillationModule(small_net(), small_net(hidden=32), losses=terms), _loader()


def _mlkd_ctkd() -> tuple[pl.LightningModule, DataLoader]:
    terms = [
        CrossEntropyTerm("ce", weight=0.2),
        MLKDTerm("mlkd", weight=0.9, standardize=True),
        CTKDTerm(DKDTerm(standardize=True), "ctkd", temperature="instance", strength=0.5),
    ]
    two_views = TwoViews(TensorDataset(*_data()), None, lambda x: x + 0.1 * torch.randn_like(x))
    return DistillationModule(small_net(), small_net(hidden=32), losses=terms), DataLoader(
        two_views, batch_size=16, collate_fn=collate_two_views
    )


def _cached() -> tuple[pl.LightningModule, DataLoader]:
    module = DistillationModule(small_net(), small_net(hidden=32), teacher_cache=TeacherOutputCache())
    return module, _loader(indexed=True)


def _mutual() -> tuple[pl.LightningModule, DataLoader]:
    return MutualLearningModule([small_net(), small_net(hidden=32)]), _loader()


def _embedding() -> tuple[pl.LightningModule, DataLoader]:
    return EmbeddingDistillationModule(small_net(), small_net(hidden=32)), _loader()


def _data_free() -> tuple[pl.LightningModule, DataLoader]:
    generator = Generator((NUM_FEATURES,), 4, hidden=(16,))
    noise = LatentNoiseDataModule(RandomDataModule(), 4, batch_size=16, batches_per_epoch=6)
    return DataFreeDistillationModule(small_net(), small_net(hidden=32), generator), noise.train_dataloader()


def _first_epoch_and_first_served_batch(epoch: int, batch_idx: int) -> bool:
    # the first epoch stores the teacher's outputs in host memory (a read per step, by design), and
    # the first served batch reads the cache's input check once
    return epoch == 0 or (epoch == 1 and batch_idx == 0)


def _causal_lm() -> tuple[pl.LightningModule, DataLoader]:
    from tests.language.helpers import tiny_gpt2, token_loader, token_samples

    module = CausalLMDistillationModule(tiny_gpt2(16), tiny_gpt2(32, seed=1))
    return module, token_loader(token_samples(24), batch_size=4)


def _causal_lm_fused() -> tuple[pl.LightningModule, DataLoader]:
    from tests.language.helpers import tiny_gpt2, token_loader, token_samples

    terms = [TokenCrossEntropyTerm("ce", path="fused"), TokenDivergenceTerm("kd", path="fused")]
    module = CausalLMDistillationModule(tiny_gpt2(16), tiny_gpt2(32, seed=1), losses=terms)
    return module, token_loader(token_samples(24), batch_size=4)


def _token_store(path: str) -> tuple[pl.LightningModule, DataLoader]:
    # the store's rows are read on the host before the transfer (check_batch); the step decodes them
    import shutil
    import tempfile
    import weakref

    from lightning_kd.language import TokenStoreDistillationModule, fill_token_store
    from tests.language.helpers import tiny_gpt2
    from tests.language.test_token_store import blocks

    data, directory = blocks(24), tempfile.mkdtemp(prefix="token-store-")
    fill_token_store(tiny_gpt2(32, seed=1), data, directory, k=6)
    terms = [TokenCrossEntropyTerm("ce"), TokenDivergenceTerm("kd", path=path, chunk_size=8)]
    module = TokenStoreDistillationModule(tiny_gpt2(16), directory, losses=terms)
    weakref.finalize(module, shutil.rmtree, directory, True)
    return module, DataLoader(WithIndex(data), batch_size=4)


def _cross_tokenizer() -> tuple[pl.LightningModule, DataLoader]:
    from lightning_kd import CrossTokenizerDistillationModule
    from tests.language.cross_tokenizer_setup import cross_loader, student_tokenizer, teacher_tokenizer
    from tests.language.helpers import tiny_gpt2

    student = tiny_gpt2(16, vocab=len(student_tokenizer()), pad_token_id=0)
    teacher = tiny_gpt2(16, vocab=len(teacher_tokenizer()), seed=1, pad_token_id=0)
    return CrossTokenizerDistillationModule(student, teacher), cross_loader(24, batch_size=4)


def _causal_lm_on_policy() -> tuple[pl.LightningModule, DataLoader]:
    # generation waits for the device inside transformers' generate (whether every row has ended):
    # those reads are the model code's, exempted above; the rest of the step must read nothing
    from lightning_kd.language import OnPolicyDistillationModule
    from tests.language.helpers import tiny_gpt2
    from tests.language.test_on_policy import prompt_loader

    module = OnPolicyDistillationModule(
        tiny_gpt2(16), tiny_gpt2(32, seed=1), lmbda=0.5, max_new_tokens=4, seed=0
    )
    return module, prompt_loader(rows=24)


def _first_batch(epoch: int, batch_idx: int) -> bool:
    # the fused path compares head(hidden) with the models' logits once, on the first batch
    return epoch == 0 and batch_idx == 0


CASES = {
    "kd": (_kd, None),
    "fitnet-on-a-layer": (_fitnet, None),
    "mlkd-and-ctkd": (_mlkd_ctkd, None),
    "teacher-cache": (_cached, _first_epoch_and_first_served_batch),
    "mutual": (_mutual, None),
    "embedding": (_embedding, None),
    "data-free": (_data_free, None),
    "causal-lm": (_causal_lm, None),
    "causal-lm-fused": (_causal_lm_fused, _first_batch),
    "token-store": (lambda: _token_store("plain"), None),
    "token-store-chunked": (lambda: _token_store("chunked"), None),
    "cross-tokenizer": (_cross_tokenizer, None),
    "causal-lm-on-policy": (_causal_lm_on_policy, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_training_step_reads_the_device_except_logging_steps(case: str, tmp_path: Path) -> None:
    build, exempt = CASES[case]
    module, loader = build()
    module.transfer_batch_to_device = _on_device  # type: ignore[method-assign]
    watch = WatchSteps(exempt or (lambda epoch, batch_idx: False))
    logger = StepsLogger()
    trainer = pl.Trainer(  # Lightning's defaults: progress bar, checkpoints, a logger
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        log_every_n_steps=4,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=[watch],
    )
    SyncRecorder.reads = []
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        SyncRecorder.active = False
    assert not SyncRecorder.reads, f"{len(SyncRecorder.reads)} reads; the first:\n{SyncRecorder.reads[0]}"
    assert watch.watched >= 3 and watch.logging_steps  # 12 steps, logging steps 3, 7, 11: the rest watched
    logged = {
        step for step, metrics in logger.calls if "train/loss" in metrics or "train/loss_student" in metrics
    }
    assert logged == set(watch.logging_steps)


def test_logged_values_are_the_steps_values_and_the_epochs_accuracy(tmp_path: Path) -> None:
    module, loader = _kd()
    totals: list[Tensor] = []
    predictions: list[tuple[Tensor, Tensor]] = []

    class Keep(pl.Callback):
        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            totals.append(outputs["loss"].detach())

    module.student.register_forward_hook(
        lambda layer, args, output: predictions.append((output.detach(), args[0])) if layer.training else None
    )
    logger = StepsLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        log_every_n_steps=4,
        limit_val_batches=0,
        logger=logger,
        callbacks=[Keep()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    step_losses = {step: metrics["train/loss"] for step, metrics in logger.calls if "train/loss" in metrics}
    assert step_losses == pytest.approx({step: float(totals[step]) for step in (3, 7, 11)})
    x, y = _data()
    inputs_seen = torch.cat([inputs for _, inputs in predictions])
    assert len(inputs_seen) == 2 * len(x)  # each epoch: every sample once, in order
    correct = torch.cat([output.argmax(-1) for output, _ in predictions]) == torch.cat([y, y])
    accuracies = [metrics["train/acc"] for _, metrics in logger.calls if "train/acc" in metrics]
    assert accuracies == pytest.approx(
        [float(correct[: len(y)].double().mean()), float(correct[len(y) :].double().mean())]
    )
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(totals[-1]))


class WatchValidationSteps(pl.Callback):
    """Records reads from the first validation batch's start until the last one's end.

    The epoch's end (metrics computed and read once) is not watched.
    """

    def __init__(self) -> None:
        self.watched = 0

    def on_validation_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, *args: Any) -> None:
        self.watched += 1
        SyncRecorder.active = True

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.watched == trainer.num_val_batches[0]:
            SyncRecorder.active = False


@pytest.mark.parametrize(
    "case", ["kd", "fitnet-on-a-layer", "mutual", "embedding", "causal-lm", "token-store"]
)
def test_no_validation_step_reads_the_device(case: str, tmp_path: Path) -> None:
    module, loader = CASES[case][0]()
    module.transfer_batch_to_device = _on_device  # type: ignore[method-assign]
    watch = WatchValidationSteps()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, callbacks=[watch]
    )
    SyncRecorder.reads = []
    try:
        trainer.validate(module, dataloaders=loader, verbose=False)
    finally:
        SyncRecorder.active = False
    assert not SyncRecorder.reads, f"{len(SyncRecorder.reads)} reads; the first:\n{SyncRecorder.reads[0]}"
    assert watch.watched == 6
