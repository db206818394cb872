"""WithIndex: datasets that append the sample index."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_kd.data import WithIndex


def test_with_index_appends_the_index() -> None:
    x, y = torch.randn(5, 3), torch.arange(5)
    tuples = WithIndex(TensorDataset(x, y))
    assert len(tuples) == 5
    item = tuples[3]
    assert len(item) == 3 and torch.equal(item[0], x[3]) and item[2] == 3

    class Dicts(Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict:
            return {"signal": x[i], "label": y[i]}

    assert WithIndex(Dicts())[4]["index"] == 4
    with pytest.raises(KeyError, match="already have a key 'label'"):
        WithIndex(Dicts(), key="label")[0]
    batch = next(iter(torch.utils.data.DataLoader(tuples, batch_size=5)))
    assert torch.equal(batch[2], torch.arange(5))
