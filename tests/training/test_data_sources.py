"""Feature terms (with and without adapters) work with every way Lightning accepts data, no extra call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import ATTerm, CRDTerm, CrossEntropyTerm, DistillationModule, FitNetTerm, LossTerm, VIDTerm
from lightning_kd.data import WithIndex
from lightning_kd.models import ConvNet1d
from tests.helpers import NUM_FEATURES, RandomDataModule, make_trainer, small_net

SAMPLES = 64

TERMS: dict[str, Callable[[], LossTerm]] = {  # layer "2": after the ReLU, 16 student and 32 teacher features
    "fitnet": lambda: FitNetTerm("2", "2"),
    "vid": lambda: VIDTerm("2", "2"),
    "crd": lambda: CRDTerm("2", "2", num_samples=SAMPLES, feat_dim=8, num_negatives=8),
    "at": lambda: ATTerm("conv3", "conv3"),  # feature maps: 1-D CNNs below
}


def _dataset(indexed: bool) -> Any:
    data = RandomDataModule(n=SAMPLES)
    dataset = TensorDataset(data.x, data.y)
    return WithIndex(dataset) if indexed else dataset


def _module(term: str, module_class: type[DistillationModule] = DistillationModule) -> DistillationModule:
    losses = [CrossEntropyTerm(), TERMS[term]()]
    if term == "at":
        student = ConvNet1d(num_classes=4, length=NUM_FEATURES, widths=(4, 8, 8), hidden=16)
        teacher = ConvNet1d(num_classes=4, length=NUM_FEATURES, widths=(8, 16, 16), hidden=16)
        return module_class(student, teacher, losses=losses)
    return module_class(small_net(hidden=16), small_net(hidden=32), losses=losses)


class OwnLoaders(DistillationModule):
    """A module that brings its own dataloaders (Lightning's oldest way)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_dataset(self.indexed), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_dataset(self.indexed), batch_size=16)


def _fit(term: str, source: str) -> DistillationModule:
    indexed = term == "crd"
    loader = DataLoader(_dataset(indexed), batch_size=16, shuffle=True)
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    if source == "own dataloaders":
        module = _module(term, OwnLoaders)
        module.indexed = indexed
        trainer.fit(module)
        return module
    module = _module(term)
    if source == "positional dataloaders":
        trainer.fit(module, loader, loader)
    elif source == "train_dataloaders=":
        trainer.fit(module, train_dataloaders=loader)
    elif source == "from_datasets":
        dataset = _dataset(indexed)
        datamodule = pl.LightningDataModule.from_datasets(dataset, dataset, batch_size=16)
        trainer.fit(module, datamodule=datamodule)
    return module


@pytest.mark.parametrize(
    "source",
    [
        "positional dataloaders",
        "train_dataloaders=",
        "from_datasets",
        "own dataloaders",
    ],
)
@pytest.mark.parametrize("term", sorted(TERMS))
def test_adapters_are_built_from_whatever_data_the_fit_call_gets(term: str, source: str) -> None:
    module = _fit(term, source)
    assert f"train/loss_{term}" in module.trainer.callback_metrics
    built = module.loss_terms[term]
    assert not built.needs_build
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in built.parameters() if p.requires_grad} <= optimized  # the adapter is trained


def test_example_input_array_keeps_lightnings_meaning() -> None:
    module = _module("fitnet")
    module.example_input_array = torch.randn(3, NUM_FEATURES)  # the student's input, as Lightning means it
    trainer = make_trainer(max_steps=1, enable_model_summary=True)
    trainer.fit(module, DataLoader(_dataset(False), batch_size=16))
    assert not module.loss_terms["fitnet"].needs_build
    assert module(module.example_input_array).shape == (3, 4)  # ModelSummary's forward works too


def test_the_input_alone_sizes_the_adapters_outside_a_trainer() -> None:
    module = _module("fitnet")
    module.build_terms(inputs=torch.randn(3, NUM_FEATURES))
    assert module.loss_terms["fitnet"].regressor is not None
    with pytest.raises(ValueError, match="either `batch`"):
        module.build_terms()


def test_a_call_without_data_names_every_way_to_give_one() -> None:
    module = _module("fitnet")
    with pytest.raises(ValueError, match=r"\['fitnet'\].*validate call has no data.*example_input_array"):
        make_trainer().validate(module)
