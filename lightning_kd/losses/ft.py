r"""Factor transfer (FT): a paraphraser on the teacher, a translator on the student.

Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018. With :math:`Q = \operatorname{vec}(\frac{1}{C} \sum_c |F_c|^q)` of the translator's
factor (student) and the paraphraser's factor (teacher):

.. math::
    \mathcal{L} = \frac{1}{N H W} \sum_n \Big\lVert \frac{Q^s_n}{\lVert Q^s_n \rVert_2}
    - \frac{Q^t_n}{\lVert Q^t_n \rVert_2} \Big\rVert_p^p

Two terms, so that :class:`~lightning_kd.callbacks.DistillationStages` can weight the two
objectives of the method apart:

- :class:`ParaphraserTerm` owns the paraphraser (an autoencoder on the teacher's feature) and
  its value is the reconstruction error: the init stage trains the paraphraser on it alone;
- :class:`FTTerm` owns the translator (student feature -> factor) and its value is the factor
  transfer loss against the paraphraser's factor of the teacher's feature: the main stage
  trains the student and the translator on it, with cross-entropy, the paraphraser frozen.

The paraphraser is registered once, under the :class:`ParaphraserTerm`
(``loss_terms.<paraphrase>.paraphraser``); the :class:`FTTerm` keeps a plain (unregistered)
reference to that term, so the paraphraser's parameters appear once in the optimizer and the
state dict, and the prefix ``loss_terms.<ft>`` covers the translator only. How the reference is
made: see :meth:`FTTerm.bind_terms` and :meth:`FTTerm.build`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses._checks import _check_feature_maps, _check_positive
from lightning_kd.losses._maps import _attention_map, _pool_to_common_size
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["factor_channels", "ft_loss", "FTTerm", "Paraphraser", "ParaphraserTerm", "Translator"]


@float32_math
def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0, power: float = 2.0) -> Tensor:
    r"""Factor transfer: L_p distance between the normalised factors of the translator and the paraphraser.

    Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018. The paper compares the vectorised factors, each divided by its L2 norm,
    :math:`\lVert F_T / \lVert F_T \rVert_2 - F_S / \lVert F_S \rVert_2 \rVert_p` with
    :math:`p = 1`. This function follows ``FactorTransfer`` of the CRD benchmark
    (``distiller_zoo/FT.py`` of ``HobbitLong/RepDistiller``, ``p1=2``, ``p2=1``), which first
    reduces each ``(N, C, H, W)`` factor to a spatial map, as attention transfer does:

    .. math::
        Q = \operatorname{vec}\Big(\frac{1}{C} \sum_c |F_c|^{q}\Big) \in \mathbb{R}^{HW}, \qquad
        \mathcal{L} = \frac{1}{N H W} \sum_{n} \Big\lVert \frac{Q^s_n}{\lVert Q^s_n \rVert_2}
        - \frac{Q^t_n}{\lVert Q^t_n \rVert_2} \Big\rVert_p^p

    with :math:`q` = ``power`` (2) and :math:`p` = ``p`` (1): the channel mean of the squared
    factor, ``F.normalize`` (eps :math:`10^{-12}`), and the *mean* over batch and positions of
    the absolute difference to the power :math:`p`. The benchmark raises :math:`F` itself to the
    power (and the difference, for :math:`p \ne 1`); here absolute values, which is the same for
    the defaults and avoids NaN or sign cancellation otherwise.

    Spatial sizes may differ: the larger map is average-pooled down to the smaller size, each
    dimension separately (the benchmark pools to a square chosen from the heights, the same for
    square maps). Channel counts may differ (the benchmark's factors both have
    ``int(rate * C_t)`` channels). Invariant to scaling either factor.

    Args:
        student_factor: ``(N, C_s, H_s, W_s)`` (or ``(N, C_s, L_s)``) the translator's output.
        teacher_factor: ``(N, C_t, H_t, W_t)`` (or ``(N, C_t, L_t)``) the paraphraser's factor.
        p: exponent :math:`p > 0` of the distance (1 in the benchmark and the paper).
        power: exponent :math:`q > 0` of the channel mean (2 in the benchmark).

    Returns:
        Scalar: the mean over the batch and the positions of ``|difference| ** p``.
    """
    _check_feature_maps("student_factor", student_factor, "teacher_factor", teacher_factor)
    _check_positive("p", p)
    _check_positive("power", power)
    student_factor, teacher_factor = _pool_to_common_size(student_factor, teacher_factor)
    difference = _attention_map(student_factor, power) - _attention_map(teacher_factor, power)
    return difference.abs().pow(p).mean()


#: negative slope of every LeakyReLU of the benchmark's paraphraser and translator.
_LEAKY_SLOPE = 0.1


def _check_map_rank(what: str, ndim: int, shape: tuple[int, ...]) -> None:
    if ndim not in (3, 4):
        raise ValueError(
            f"{what} has shape {shape}: factor transfer needs an (N, C, H, W) (or (N, C, L)) convolutional "
            "feature map; pick a convolutional layer."
        )


def _check_ndim(ndim: int) -> None:
    if ndim not in (3, 4):
        raise ValueError(f"ndim must be 4 for (N, C, H, W) maps or 3 for (N, C, L) sequences, got {ndim}.")


def factor_channels(channels: int, rate: float) -> int:
    """Channels of the factor: ``int(channels * rate)``, as the benchmark's ``Paraphraser`` / ``Translator``.

    Raises:
        ValueError: the factor would have no channel.
    """
    out = int(channels * rate)
    if out < 1:
        raise ValueError(
            f"A paraphrase rate of {rate} leaves no factor channel for a feature with {channels} channels: "
            "int(channels * rate) must be >= 1."
        )
    return out


def _conv_stack(channels: list[int], ndim: int, use_bn: bool, transposed: bool = False) -> nn.Sequential:
    """3x3 convolutions (stride 1, padding 1) ``channels[0] -> channels[1] -> ...``, [+ BN] + LeakyReLU(0.1).

    Without BN an ``nn.Identity`` holds its place, so the indices of the convolutions (0, 3, 6) are
    those of the benchmark's modules, which put an empty ``nn.Sequential`` there.
    """
    if transposed:
        conv = nn.ConvTranspose2d if ndim == 4 else nn.ConvTranspose1d
    else:
        conv = nn.Conv2d if ndim == 4 else nn.Conv1d
    norm = nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [
            conv(c_in, c_out, kernel_size=3, stride=1, padding=1),
            norm(c_out) if use_bn else nn.Identity(),
            nn.LeakyReLU(_LEAKY_SLOPE),
        ]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The benchmark's ``Paraphraser`` (``models/util.py`` of ``HobbitLong/RepDistiller``): an autoencoder.

    Encoder: 3x3 convolutions ``C -> C -> k -> k``; decoder: 3x3 transposed convolutions
    ``k -> k -> C -> C``; all stride 1 and padding 1 (sizes are kept), with bias, default init,
    each followed by ``LeakyReLU(0.1)`` (the decoder's last one too), with a BatchNorm before it
    only if ``use_bn`` (the benchmark's paraphraser has none). ``Conv1d`` /
    ``ConvTranspose1d`` / ``BatchNorm1d`` for ``(N, C, L)`` features.

    Args:
        channels: :math:`C`, channels of the teacher's feature.
        factor_channels: :math:`k`, channels of the factor (``int(rate * C)``).
        ndim: 4 for ``(N, C, H, W)`` maps, 3 for ``(N, C, L)`` sequences.
        use_bn: a BatchNorm after every convolution.
    """

    def __init__(self, channels: int, factor_channels: int, ndim: int = 4, use_bn: bool = False) -> None:
        super().__init__()
        _check_ndim(ndim)
        self.channels = channels
        self.factor_channels = factor_channels
        k = factor_channels
        self.encoder = _conv_stack([channels, channels, k, k], ndim, use_bn)
        self.decoder = _conv_stack([k, k, channels, channels], ndim, use_bn, transposed=True)

    def encode(self, feature: Tensor) -> Tensor:
        """The factor of ``feature``: ``(N, k, ...)``."""
        return self.encoder(feature)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """``(factor, reconstruction)`` of ``feature``."""
        factor = self.encoder(feature)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """The benchmark's ``Translator``: 3x3 convolutions ``C_s -> C_s -> k -> k``, each + BN + LeakyReLU(0.1).

    Stride 1, padding 1, with bias, default init; ``use_bn=True`` as in the benchmark.
    ``Conv1d`` / ``BatchNorm1d`` for ``(N, C, L)`` features.

    Args:
        in_channels: :math:`C_s`, channels of the student's feature.
        factor_channels: :math:`k`, channels of the paraphraser's factor.
        ndim: 4 for ``(N, C, H, W)`` maps, 3 for ``(N, C, L)`` sequences.
        use_bn: a BatchNorm after every convolution.
    """

    def __init__(self, in_channels: int, factor_channels: int, ndim: int = 4, use_bn: bool = True) -> None:
        super().__init__()
        _check_ndim(ndim)
        self.encoder = _conv_stack([in_channels, in_channels, factor_channels, factor_channels], ndim, use_bn)

    def forward(self, feature: Tensor) -> Tensor:
        """The student's factor ``(N, k, ...)``."""
        return self.encoder(feature)


@float32_math
def _reconstruction_error(reconstruction: Tensor, feature: Tensor) -> Tensor:
    """Mean squared error over all elements (the benchmark's ``nn.MSELoss()``), in float32."""
    return F.mse_loss(reconstruction, feature)


class ParaphraserTerm(LossTerm):
    r"""The paraphraser of factor transfer and its reconstruction error on the teacher's feature.

    The term owns a :class:`Paraphraser` (built in :meth:`build` from the probe step's teacher
    feature unless given) and its value is
    :math:`\operatorname{mean}\big((\mathrm{dec}(\mathrm{enc}(t)) - t)^2\big)` on the
    (detached) teacher feature :math:`t`, as the init stage of the CRD benchmark
    (``helper/pretrain.py`` of ``HobbitLong/RepDistiller``: ``nn.MSELoss()`` of the paraphraser's
    reconstruction of ``feat_t[-2]``, the paraphraser alone trained). The :class:`FTTerm` that
    reads this paraphraser names this term in ``paraphraser_term``; in a
    :class:`~lightning_kd.DistillationModule`'s ``losses`` list this term comes first.

    Args:
        teacher_layer: dotted path of the teacher layer (the benchmark: the last stage's output,
            before pooling).
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; the benchmark's init stage uses the reconstruction
            error unweighted.
        rate: the paraphrase rate :math:`k / C`: the factor has ``int(rate * C)`` channels
            (0.5 in the benchmark).
        use_bn: BatchNorm in the paraphraser (``False`` in the benchmark).
        paraphraser: a module with ``encode(feature) -> factor`` and
            ``forward(feature) -> (factor, reconstruction)``; default: built from the shape.
    """

    adapter_attributes = {"paraphraser": "paraphraser"}

    def __init__(
        self,
        teacher_layer: str,
        name: str = "paraphrase",
        weight: float = 1.0,
        rate: float = 0.5,
        use_bn: bool = False,
        paraphraser: nn.Module | None = None,
    ) -> None:
        super().__init__(name, weight)
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}.")
        self.teacher_layer = teacher_layer
        self.rate = float(rate)
        self.use_bn = use_bn
        self.paraphraser = paraphraser

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """The one teacher layer this term reads."""
        return (self.teacher_layer,)

    def teacher_feature(self, outputs: StepOutputs) -> Tensor:
        """The (detached) teacher feature of this step."""
        return self.captured_feature(outputs, "teacher", self.teacher_layer)

    def build(self, outputs: StepOutputs) -> None:
        """Create the paraphraser from the probe's teacher feature."""
        teacher = self.teacher_feature(outputs)
        _check_map_rank(f"Loss term {self.name!r}: the teacher feature", teacher.ndim, tuple(teacher.shape))
        channels = teacher.shape[1]
        self.paraphraser = Paraphraser(
            channels, factor_channels(channels, self.rate), teacher.ndim, use_bn=self.use_bn
        ).to(teacher.device)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """The reconstruction error ``mean((decoder(encoder(t)) - t) ** 2)`` of the teacher feature."""
        paraphraser = self.built_adapter("paraphraser")
        teacher = self.teacher_feature(outputs)
        _, reconstruction = paraphraser(teacher)
        return _reconstruction_error(reconstruction, teacher)

    def extra_repr(self) -> str:
        """Name, weight, layer and rate, shown in the module repr."""
        return f"{super().extra_repr()}, teacher_layer={self.teacher_layer!r}, rate={self.rate}"


class FTTerm(LayerPairTerm):
    r"""Factor transfer (Kim et al., NeurIPS 2018): the translator's factor against the paraphraser's.

    See :func:`lightning_kd.losses.functional.ft_loss`. The term owns a :class:`Translator`
    (student feature -> factor of :math:`k` channels, built in :meth:`build` unless given and
    trained with the student) and reads the paraphraser of the :class:`ParaphraserTerm` named
    ``paraphraser_term`` (same teacher layer): its value is
    ``ft_loss(translator(s), paraphraser.encode(t), p, power)``, the teacher's factor computed
    without gradients (a fixed target, as in the benchmark, whose paraphraser is in eval mode and
    not optimised in the main stage).

    As ``factor`` in the CRD benchmark (``train_student.py`` of ``HobbitLong/RepDistiller``):
    ``feat[-2]`` of both models (the last stage's output, after its ReLU, before pooling), rate
    0.5, an init stage that trains the paraphraser alone on its reconstruction (the
    :class:`ParaphraserTerm`), then cross-entropy + 200 x FT with the translator and the student
    trained (``-a 0 -b 200``): recipe ``cifar100/methods/ft`` with
    :class:`~lightning_kd.callbacks.DistillationStages`.

    **The paraphraser is shared, not owned.** This term keeps a plain reference to the
    :class:`ParaphraserTerm` (not a registered submodule), made in one of two ways:

    - :meth:`bind_terms` with the module's terms (or :meth:`bind_paraphraser` with the term),
      before :meth:`build`; any order of the terms then works;
    - otherwise :meth:`build` finds the paraphraser term that was built on the same probe step
      (:class:`~lightning_kd.DistillationModule` builds its terms in their order, on one
      :class:`~lightning_kd.losses.base.StepOutputs`): list the :class:`ParaphraserTerm` before
      this term, and let the module build both.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer; must be the paraphraser term's.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 200 as in the benchmark.
        paraphraser_term: name of the :class:`ParaphraserTerm` whose paraphraser gives the
            teacher's factor.
        p: exponent of the distance (1, the benchmark's L1).
        power: exponent of the factor's channel mean (2, the benchmark's).
        use_bn: BatchNorm in the translator (``True`` in the benchmark).
        translator: a module mapping the student feature onto the factor's channels; default:
            built from the shapes.
    """

    adapter_attributes = {"translator": "translator"}

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "ft",
        weight: float = 200.0,
        paraphraser_term: str = "paraphrase",
        p: float = 1.0,
        power: float = 2.0,
        use_bn: bool = True,
        translator: nn.Module | None = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}.")
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}.")
        self.paraphraser_term = paraphraser_term
        self.p = float(p)
        self.power = float(power)
        self.use_bn = use_bn
        self.translator = translator
        # A tuple, not a module attribute: the paraphraser stays registered under its own term only.
        self._bound: tuple[ParaphraserTerm, ...] = ()

    @property
    def paraphraser(self) -> nn.Module | None:
        """The bound paraphraser term's paraphraser (``None`` until bound and built)."""
        return self._bound[0].paraphraser if self._bound else None

    @property
    def needs_build(self) -> bool:
        """Until the translator exists and the paraphraser term is bound."""
        return super().needs_build or not self._bound

    def bind_paraphraser(self, term: ParaphraserTerm) -> None:
        """Read the paraphraser of ``term`` (kept as a plain reference, not a submodule).

        Raises:
            TypeError: ``term`` is not a :class:`ParaphraserTerm`.
            ValueError: it reads another teacher layer.
        """
        if not isinstance(term, ParaphraserTerm):
            raise TypeError(
                f"Loss term {self.name!r}: paraphraser_term={self.paraphraser_term!r} is a "
                f"{type(term).__name__}, not a ParaphraserTerm."
            )
        if term.teacher_layer != self.teacher_layer:
            raise ValueError(
                f"Loss term {self.name!r} reads teacher layer {self.teacher_layer!r} but its paraphraser "
                f"term {term.name!r} reads {term.teacher_layer!r}: the factor must come from the feature the "
                "paraphraser was trained on. Use the same teacher layer in both."
            )
        self._bound = (term,)

    def bind(self, student: nn.Module, teacher: nn.Module | None, terms: Mapping[str, LossTerm]) -> None:
        """Bind the sibling :class:`ParaphraserTerm` among the module's ``terms``."""
        if not self._bound:
            self.bind_terms(terms)

    def bind_terms(self, terms: Mapping[str, LossTerm]) -> None:
        """Bind the term named ``paraphraser_term`` among ``terms`` (e.g. ``module.loss_terms``).

        Raises:
            KeyError: no term has that name.
        """
        if self.paraphraser_term not in terms:
            raise KeyError(
                f"Loss term {self.name!r}: no loss term named {self.paraphraser_term!r} (its "
                f"paraphraser_term); terms: {list(terms)}. Add a ParaphraserTerm with that name."
            )
        self.bind_paraphraser(terms[self.paraphraser_term])  # type: ignore[arg-type]

    def build(self, outputs: StepOutputs) -> None:
        """Create the translator from the probe step's shapes (after :meth:`bind`).

        Raises:
            RuntimeError: the paraphraser term is not bound yet.
        """
        if not self._bound:
            raise RuntimeError(
                f"Loss term {self.name!r} is not bound to its ParaphraserTerm {self.paraphraser_term!r}: "
                "DistillationModule.build_terms binds it; outside a module call "
                "term.bind_terms(module.loss_terms) first."
            )
        if self.translator is None:
            student, teacher = self.pair(outputs)
            _check_map_rank(
                f"Loss term {self.name!r}: the student feature", student.ndim, tuple(student.shape)
            )
            _check_map_rank(
                f"Loss term {self.name!r}: the teacher feature", teacher.ndim, tuple(teacher.shape)
            )
            if student.ndim != teacher.ndim or student.shape[0] != teacher.shape[0]:
                raise ValueError(
                    f"Loss term {self.name!r}: the student feature has shape {tuple(student.shape)} and the "
                    f"teacher feature {tuple(teacher.shape)}; both must be (N, C, H, W) (or (N, C, L)) maps "
                    "of the same batch."
                )
            k = factor_channels(teacher.shape[1], self._bound[0].rate)
            self.translator = Translator(student.shape[1], k, student.ndim, use_bn=self.use_bn).to(
                student.device
            )

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``ft_loss(translator(s), paraphraser.encode(t))``; the teacher's factor carries no gradient."""
        translator, paraphraser = self.built_adapter("translator"), self.paraphraser
        if paraphraser is None:
            raise self.unbuilt_error("paraphraser")
        student, teacher = self.pair(outputs)
        with torch.no_grad():
            teacher_factor = paraphraser.encode(teacher)
        return ft_loss(translator(student), teacher_factor, p=self.p, power=self.power)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        settings = f"paraphraser_term={self.paraphraser_term!r}, p={self.p}, power={self.power}"
        return f"{super().extra_repr()}, {settings}"
