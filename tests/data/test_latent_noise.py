"""LatentNoise: fresh noise every epoch, seeded."""

from __future__ import annotations

import torch

from lightning_kd.data.latent_noise import LatentNoise


def test_latent_noise_is_fresh_every_epoch_and_seeded() -> None:
    first, second = list(LatentNoise(3, 4, 2, seed=1)), list(LatentNoise(3, 4, 2, seed=1))
    assert len(first) == 2 and first[0].shape == (4, 3)
    assert torch.equal(first[0], second[0]) and not torch.equal(first[0], first[1])
    noise = LatentNoise(3, 4, 1, seed=1)
    assert not torch.equal(next(iter(noise)), next(iter(noise)))  # a new pass draws new noise


def test_a_loaded_state_goes_on_in_the_middle_of_its_pass() -> None:
    noise = LatentNoise(3, 4, 3, seed=1)
    first_pass = list(noise)
    stream = iter(noise)  # the second pass, stopped after one batch
    given = next(stream)
    state = noise.state_dict()
    assert state == {"passes": 2, "position": 1}

    restored = LatentNoise(3, 4, 3, seed=1)
    restored.load_state_dict(state)
    rest = list(restored)  # the rest of the second pass
    reference = LatentNoise(3, 4, 3, seed=1)
    list(reference)
    second_pass = list(reference)
    assert torch.equal(given, second_pass[0]) and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(rest, second_pass[1:], strict=True))
    assert not torch.equal(second_pass[0], first_pass[0])
    third = list(restored)  # then a fresh pass, as in the uninterrupted run
    assert all(torch.equal(a, b) for a, b in zip(third, list(reference), strict=True))
