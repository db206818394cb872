"""Replayable augmentation: random views whose randomness is a function of (seed, sample index, view).

A view ``v`` of sample ``i`` is drawn with a ``torch.Generator`` seeded from ``(seed, i, v)``
(:func:`view_generator`), so the same view can be regenerated, bit for bit, on any epoch, in any
worker process and on another machine: what a teacher-output cache of augmented views
(:class:`~lightning_kd.teachers.view_cache.TeacherViewCache`) needs to replay the exact input
the teacher saw. Each op draws its parameters explicitly (a crop box, a flip bit, a factor) and
applies them with ``torchvision.transforms.v2.functional``; the parameters are a ``float32``
vector, recorded with the view (every value is exact in ``float32``: integers below ``2^24`` and
factors drawn as ``float32``).

The idea of storing a view's parameters with the teacher's soft labels and replaying it is
FKD's (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition",
ECCV 2022) and ReLabel's (Yun et al., CVPR 2021).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

__all__ = [
    "BrightnessContrast",
    "HorizontalFlip",
    "PaddedCrop",
    "RandomResizedCrop",
    "ReplayableAugmentation",
    "ReplayableOp",
    "SignalNoise",
    "SignalScale",
    "SignalShift",
    "view_generator",
]

#: noise seeds are drawn below this bound, so that they are exact in a float32 parameter vector
_EXACT_INT = 2**24


def view_generator(seed: int, index: int, view: int) -> torch.Generator:
    """A CPU generator seeded with the BLAKE2b hash of ``(seed, index, view)`` (three unsigned 64-bit ints).

    The hash mixes the three integers, so neighbouring samples and views get unrelated streams;
    it costs about a microsecond (``numpy.random.SeedSequence`` costs tens).
    """
    if min(seed, index, view) < 0:
        raise ValueError(f"seed, index and view must be >= 0, got {seed}, {index}, {view}.")
    digest = hashlib.blake2b(struct.pack("<3Q", seed, index, view), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _uniform(generator: torch.Generator, low: float, high: float) -> Tensor:
    return torch.empty(1).uniform_(low, high, generator=generator)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


class ReplayableOp:
    """One augmentation with explicit parameters: ``draw`` them from a generator, ``apply`` them.

    Attributes:
        num_params: the length of the ``float32`` parameter vector.
    """

    num_params: ClassVar[int]

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """The parameters ``(num_params,)`` of one view of ``sample``."""
        raise NotImplementedError

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``sample`` transformed with ``params`` (no randomness here)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"


class RandomResizedCrop(ReplayableOp):
    """A crop of random area and aspect ratio, resized to ``size`` (Szegedy et al., CVPR 2015).

    Parameters ``[top, left, height, width]``, drawn exactly as
    ``torchvision.transforms.RandomResizedCrop.get_params`` draws them (10 tries of area
    ``~ U(scale)`` and log-uniform ratio, then the central crop; the same calls in the same order),
    but from the given generator: ``get_params`` reads the global RNG, which a replay cannot own.
    """

    num_params = 4

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = [size, size] if isinstance(size, int) else list(size)
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]: {scale}, {ratio}"
            )
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[top, left, height, width]`` of the crop."""
        height, width = sample.shape[-2:]
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            uniform = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
            aspect = torch.exp(uniform).item()
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = _randint(generator, 0, height - h), _randint(generator, 0, width - w)
                return torch.tensor([top, left, h, w], dtype=torch.float32)
        aspect = width / height  # the central crop of the closest allowed ratio
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return torch.tensor([(height - h) // 2, (width - w) // 2, h, w], dtype=torch.float32)

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``F.resized_crop`` (bilinear, antialiased) of the box."""
        top, left, h, w = (int(value) for value in params)
        return F.resized_crop(sample, top, left, h, w, self.size, antialias=True)


class PaddedCrop(ReplayableOp):
    """Zero-pad by ``padding`` pixels, then crop ``size`` at a random place (the CIFAR recipe).

    Parameters ``[top, left]`` in the padded image.
    """

    num_params = 2

    def __init__(self, size: int, padding: int = 4) -> None:
        if size < 1 or padding < 0:
            raise ValueError(f"size must be >= 1 and padding >= 0, got {size} and {padding}.")
        self.size, self.padding = size, padding

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[top, left]`` of the crop in the padded image."""
        height, width = (side + 2 * self.padding for side in sample.shape[-2:])
        if height < self.size or width < self.size:
            raise ValueError(f"PaddedCrop({self.size}) is larger than the padded {height}x{width} image.")
        top, left = _randint(generator, 0, height - self.size), _randint(generator, 0, width - self.size)
        return torch.tensor([top, left], dtype=torch.float32)

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``F.pad`` with zeros, then ``F.crop``."""
        top, left = (int(value) for value in params)
        return F.crop(F.pad(sample, [self.padding]), top, left, self.size, self.size)


class HorizontalFlip(ReplayableOp):
    """Mirror left-right with probability ``p``. Parameter ``[flipped]`` (0 or 1)."""

    num_params = 1

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}.")
        self.p = p

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[1.0]`` to flip, ``[0.0]`` not to."""
        return (torch.rand(1, generator=generator) < self.p).float()

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``F.horizontal_flip`` when the parameter is 1."""
        return F.horizontal_flip(sample) if bool(params[0]) else sample


class BrightnessContrast(ReplayableOp):
    """Brightness and contrast factors ``~ U(1 - b, 1 + b)``, ``U(1 - c, 1 + c)`` (as ``ColorJitter``).

    Parameters ``[brightness factor, contrast factor]``; applied with ``F.adjust_brightness``
    then ``F.adjust_contrast`` (float images are clamped to ``[0, 1]``).
    """

    num_params = 2

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2) -> None:
        if not 0 <= brightness < 1 or not 0 <= contrast < 1:
            raise ValueError(f"brightness and contrast must be in [0, 1), got {brightness} and {contrast}.")
        self.brightness, self.contrast = brightness, contrast

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[brightness factor, contrast factor]``."""
        b, c = self.brightness, self.contrast
        return torch.cat([_uniform(generator, 1 - b, 1 + b), _uniform(generator, 1 - c, 1 + c)])

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """Brightness, then contrast."""
        return F.adjust_contrast(F.adjust_brightness(sample, float(params[0])), float(params[1]))


class SignalShift(ReplayableOp):
    """Shift a 1-D signal ``(..., L)`` by ``s ~ U{-max_shift, ..., max_shift}`` steps, circularly.

    MNIST-1D's own generator translates its templates the same way (Greydanus & Kobak, 2020).
    Parameter ``[s]``; applied with ``torch.roll``.
    """

    num_params = 1

    def __init__(self, max_shift: int = 3) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}.")
        self.max_shift = max_shift

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[s]``."""
        return torch.tensor([_randint(generator, -self.max_shift, self.max_shift)], dtype=torch.float32)

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``torch.roll`` along the last dimension."""
        return torch.roll(sample, int(params[0]), dims=-1)


class SignalScale(ReplayableOp):
    """Multiply a signal by ``a ~ U(low, high)``. Parameter ``[a]``."""

    num_params = 1

    def __init__(self, low: float = 0.8, high: float = 1.2) -> None:
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got {low} and {high}.")
        self.low, self.high = low, high

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[a]``."""
        return _uniform(generator, self.low, self.high)

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``a * x``."""
        return sample * params[0].to(sample.dtype)


class SignalNoise(ReplayableOp):
    """Add Gaussian noise ``std * N(0, 1)``; parameter ``[noise seed]``, an integer below ``2^24``.

    The noise itself is regenerated from its seed, so a view records one number, not ``L``.
    """

    num_params = 1

    def __init__(self, std: float = 0.1) -> None:
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}.")
        self.std = std

    def draw(self, generator: torch.Generator, sample: Tensor) -> Tensor:
        """``[noise seed]``."""
        return torch.tensor([_randint(generator, 0, _EXACT_INT - 1)], dtype=torch.float32)

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``x + std * randn`` from a generator seeded with the parameter."""
        generator = torch.Generator().manual_seed(int(params[0]))
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype)
        return sample + self.std * noise


class ReplayableAugmentation:
    """A sequence of :class:`ReplayableOp`, each view seeded from ``(seed, sample index, view)``.

    ``augmentation(sample, index, view)`` returns ``(view_of_sample, params)``;
    ``augmentation.apply(sample, params)`` regenerates it from the recorded parameters alone,
    bit for bit (the ops are deterministic on the CPU). ``params`` is the ``float32``
    concatenation of the ops' parameters (:attr:`num_params` long).

    Args:
        ops: the ops, applied in order.
        seed: the augmentation's seed (another seed, other views).
    """

    def __init__(self, ops: Sequence[ReplayableOp], seed: int = 0) -> None:
        if not ops:
            raise ValueError("ReplayableAugmentation needs at least one op.")
        for op in ops:
            if not isinstance(op, ReplayableOp):
                raise TypeError(
                    f"{op!r} is not a ReplayableOp: its randomness could not be replayed. Use the ops of "
                    "lightning_kd.data.replayable (or subclass ReplayableOp with explicit draw/apply)."
                )
        self.ops, self.seed = list(ops), seed
        self.num_params = sum(op.num_params for op in self.ops)

    def draw(self, sample: Tensor, index: int, view: int) -> Tensor:
        """The parameters of view ``view`` of sample ``index``."""
        return self(sample, index, view)[1]

    def apply(self, sample: Tensor, params: Tensor) -> Tensor:
        """``sample`` transformed by every op with its slice of ``params``."""
        if params.shape != (self.num_params,):
            raise ValueError(f"params must have shape ({self.num_params},), got {tuple(params.shape)}.")
        start = 0
        for op in self.ops:
            sample = op.apply(sample, params[start : start + op.num_params])
            start += op.num_params
        return sample

    def __call__(self, sample: Tensor, index: int, view: int) -> tuple[Tensor, Tensor]:
        """``(view of sample, params)``: each op draws from one generator, in order, then applies."""
        generator = view_generator(self.seed, index, view)
        params = []
        for op in self.ops:  # an op draws for the shape that the ops before it produce
            params.append(op.draw(generator, sample))
            sample = op.apply(sample, params[-1])
        return sample, torch.cat(params)

    def __repr__(self) -> str:
        return f"ReplayableAugmentation({self.ops!r}, seed={self.seed})"
