"""Replayable augmentation and replayed views: views regenerate bit for bit, drawn deterministically."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import RandomResizedCrop as TorchvisionRandomResizedCrop
from torchvision.transforms import v2

from lightning_kd.data import (
    BrightnessContrast,
    HorizontalFlip,
    PaddedCrop,
    RandomResizedCrop,
    ReplayableAugmentation,
    ReplayedViews,
    SignalNoise,
    SignalScale,
    SignalShift,
    ViewSampler,
)
from lightning_kd.data.replayable import view_generator

AUGMENTATIONS = {
    "image": lambda: ReplayableAugmentation(
        [
            RandomResizedCrop(12, scale=(0.3, 1.0)),
            PaddedCrop(12, padding=2),
            HorizontalFlip(),
            BrightnessContrast(),
        ],
        seed=3,
    ),
    "signal": lambda: ReplayableAugmentation(
        [SignalShift(3), SignalScale(0.8, 1.2), SignalNoise(0.1)], seed=3
    ),
}
SAMPLES = {"image": torch.rand(6, 1, 16, 16), "signal": torch.randn(6, 1, 40)}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("kind", list(AUGMENTATIONS))
def test_a_replayed_view_equals_the_original_bit_for_bit_in_workers_too(kind: str) -> None:
    samples, augmentation = SAMPLES[kind], AUGMENTATIONS[kind]()
    dataset = ReplayedViews(TensorDataset(samples, torch.arange(6)), augmentation, views=3)
    keys = [(index, view) for index in range(6) for view in range(3)]
    loader = DataLoader(dataset, batch_size=len(keys), sampler=keys, num_workers=2)
    (inputs, labels, indices, views, params) = next(iter(loader))  # built in two worker processes
    assert indices.tolist() == [k[0] for k in keys] and views.tolist() == [k[1] for k in keys]
    assert labels.tolist() == indices.tolist()
    for row, (index, view) in enumerate(keys):
        original, drawn = augmentation(samples[index], index, view)
        assert torch.equal(bits(inputs[row]), bits(original))  # another process, the same bits
        assert torch.equal(bits(params[row]), bits(drawn))
        assert torch.equal(
            bits(augmentation.apply(samples[index], drawn)), bits(original)
        )  # from params alone
    assert len({tuple(p.tolist()) for p in params}) == len(keys)  # every (index, view) is its own view
    other_seed = ReplayableAugmentation(augmentation.ops, seed=4)
    assert not torch.equal(other_seed(samples[0], 0, 0)[1], augmentation(samples[0], 0, 0)[1])


def test_each_op_against_a_hand_computation() -> None:
    image = torch.rand(1, 6, 6)
    padded = torch.zeros(1, 10, 10)
    padded[:, 2:8, 2:8] = image
    assert torch.equal(PaddedCrop(6, padding=2).apply(image, torch.tensor([1.0, 3.0])), padded[:, 1:7, 3:9])
    assert torch.equal(HorizontalFlip().apply(image, torch.tensor([1.0])), image.flip(-1))
    assert torch.equal(HorizontalFlip().apply(image, torch.tensor([0.0])), image)
    b, c = (
        1.1,
        0.7,
    )  # ColorJitter's formulas: clamp(b x); clamp(c x + (1 - c) mean), grey mean for one channel
    bright = (image.double() * b).clamp(0, 1)
    expected = (c * bright + (1 - c) * bright.mean()).clamp(0, 1)
    result = BrightnessContrast().apply(image, torch.tensor([b, c]))
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-6)
    signal = torch.arange(8.0).reshape(1, 8)
    assert SignalShift().apply(signal, torch.tensor([2.0])).tolist() == [[6.0, 7.0, 0, 1, 2, 3, 4, 5]]
    assert torch.equal(SignalScale().apply(signal, torch.tensor([0.5])), signal / 2)
    noise = torch.randn(1, 8, generator=torch.Generator().manual_seed(123))
    assert torch.equal(SignalNoise(0.25).apply(signal, torch.tensor([123.0])), signal + 0.25 * noise)


def test_random_resized_crop_draws_what_torchvision_draws_from_the_same_seed() -> None:
    image = torch.rand(3, 20, 30)
    op = RandomResizedCrop(8)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = TorchvisionRandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        drawn = op.draw(torch.Generator().manual_seed(seed), image)
        assert [int(v) for v in drawn] == list(expected)
    assert op.apply(image, drawn).shape == (3, 8, 8)


def test_view_drawing_is_deterministic_and_cycles_through_every_view() -> None:
    cycle = ViewSampler(10, views=4, draw="cycle", seed=1)
    seen = set()
    for epoch in range(4):
        cycle.set_epoch(epoch)
        keys = list(cycle)
        assert sorted(index for index, _ in keys) == list(range(10))  # every sample once per epoch
        assert all(view == (epoch + index) % 4 for index, view in keys)
        seen |= set(keys)
    assert seen == {(index, view) for index in range(10) for view in range(4)}
    first, second = ViewSampler(50, 16, "random", seed=7), ViewSampler(50, 16, "random", seed=7)
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)  # a function of (seed, epoch) only
    second.set_epoch(4)
    assert list(first) != list(second)
    views = first.views_of_epoch()
    assert 0 <= int(views.min()) and int(views.max()) < 16 and len(set(views.tolist())) > 8
    assert list(ViewSampler(5, 2, shuffle=False)) == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]


def test_view_seeds_are_distinct_for_neighbouring_keys() -> None:
    draws = {float(torch.rand(1, generator=view_generator(0, i, v))) for i in range(20) for v in range(20)}
    assert len(draws) == 400


def test_bad_inputs_are_refused_with_what_to_do() -> None:
    dataset = ReplayedViews(TensorDataset(torch.zeros(4, 1, 8)), AUGMENTATIONS["signal"](), views=2)
    with pytest.raises(
        TypeError, match=r"read with \(sample index, view\) keys, got 1: give its DataLoader "
    ):
        dataset[1]
    with pytest.raises(IndexError, match="view 2 is outside the 2 views of ReplayedViews"):
        dataset[(0, 2)]
    with pytest.raises(TypeError, match=r"RandomHorizontalFlip\(.*\) is not a ReplayableOp: its randomness"):
        ReplayableAugmentation([v2.RandomHorizontalFlip()])
    with pytest.raises(ValueError, match="draw must be 'cycle' or 'random', got 'shuffle'"):
        ViewSampler(4, 2, draw="shuffle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"params must have shape \(3,\), got \(2,\)"):
        AUGMENTATIONS["signal"]().apply(torch.zeros(1, 8), torch.zeros(2))
