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
