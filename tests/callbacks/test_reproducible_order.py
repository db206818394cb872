"""ReproducibleOrder: deprecated, it is ExactResume with a fixed seed (and refuses another seed on resume)."""

from __future__ import annotations

import pytest

from lightning_kd import DistillationModule
from lightning_kd.callbacks import ReproducibleOrder
from lightning_kd.callbacks.exact_resume import ExactResume
from tests.helpers import RandomDataModule, make_trainer, small_net


def test_it_warns_that_it_is_deprecated_and_fixes_the_seed_of_exact_resume() -> None:
    with pytest.warns(FutureWarning, match=r"ReproducibleOrder is deprecated.*ExactResume\(seed=3\)"):
        callback = ReproducibleOrder(seed=3)
    trainer = make_trainer(max_steps=1, callbacks=[callback])
    trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())
    installed = [c for c in trainer.callbacks if isinstance(c, ExactResume)]
    assert installed == [callback] and callback.run_seed == 3  # the module adds no second one


def test_resuming_with_another_seed_is_an_error() -> None:
    with pytest.warns(FutureWarning):
        callback = ReproducibleOrder(seed=2)
    callback.load_state_dict({"seed": 2})
    with pytest.raises(ValueError, match=r"ReproducibleOrder\(seed=2\) resumes a run made with seed=1"):
        callback.load_state_dict({"seed": 1})  # what a checkpoint of ReproducibleOrder(seed=1) holds
