"""Helpers shared by the test modules: small random data, tiny models, a quiet CPU trainer, and the
float64 references and fixtures-in-code that several test files use. Plain functions, imported explicitly."""

from __future__ import annotations

import os

# scripts under tests/scripts import this module outside pytest (and so outside conftest.py)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from lightning_kd import DistillationModule, StepOutputs  # noqa: E402
from lightning_kd.losses import SEEDTerm  # noqa: E402
from lightning_kd.models import MLP, SentenceEncoder, small_bert_encoder  # noqa: E402
from lightning_kd.paradigms import EmbeddingDistillationModule  # noqa: E402

NUM_FEATURES = 8
NUM_CLASSES = 4


#: command-line overrides that shrink an MNIST-1D recipe to a few steps of tiny data
TINY_MNIST1D_FIT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_samples=600",
    "--data.init_args.val_samples=100",
    "--data.init_args.test_samples=200",
]


class RandomDataModule(pl.LightningDataModule):
    """Gaussian inputs with labels from a fixed random linear map (learnable, deterministic)."""

    def __init__(self, n: int = 64, batch_size: int = 16, as_dict: bool = False, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, NUM_FEATURES, generator=generator)
        weight = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
        self.y = (self.x @ weight).argmax(dim=1)
        self.batch_size = batch_size
        self.as_dict = as_dict

    def _dataset(self) -> Dataset:
        if self.as_dict:
            return DictDataset(self.x, self.y)
        return TensorDataset(self.x, self.y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(), batch_size=self.batch_size)

    test_dataloader = val_dataloader


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"signal": self.x[i], "label": self.y[i]}


def small_net(hidden: int = 16, num_classes: int = NUM_CLASSES, batchnorm: bool = True) -> nn.Module:
    """A tiny MLP with BatchNorm (so running statistics are exercised)."""
    layers: list[nn.Module] = [nn.Linear(NUM_FEATURES, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def fit_to_checkpoint(module: pl.LightningModule, directory: Path, epochs: int = 1, **kwargs: Any) -> Path:
    """Fit ``module`` on :class:`RandomDataModule` for ``epochs``; the checkpoint written in ``directory``."""
    checkpoint = ModelCheckpoint(dirpath=directory, filename="model", enable_version_counter=False)
    trainer = make_trainer(max_epochs=epochs, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, datamodule=RandomDataModule(), **kwargs)
    return Path(checkpoint.last_model_path or checkpoint.best_model_path)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def t32(x: Any) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def rand(*shape: int, seed: int = 0, positive: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.abs(x) if positive else x


def step(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> StepOutputs:
    batch = next(iter(student.values())).shape[0]
    return StepOutputs(torch.zeros(batch, 2), student_features=student, teacher_features=teacher)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CrashAtEpoch(pl.Callback):
    """Raise at the start of epoch ``epoch``: the run stops after ``epoch`` epochs, as if killed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class Snapshots(pl.Callback):
    """States of the given submodules (by attribute path) at the start and after every epoch."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.initial: dict[str, dict[str, torch.Tensor]] = {}
        self.epochs: list[dict[str, dict[str, torch.Tensor]]] = []

    def _take(self, pl_module: Any) -> dict[str, dict[str, torch.Tensor]]:
        return {key: state(pl_module.get_submodule(path)) for key, path in self.paths.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.initial = self._take(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.epochs.append(self._take(pl_module))


LATENT = 6


class KeywordEncoder(nn.Module):
    """Takes ``signal=`` as a keyword and returns ``{"embedding": ...}``, like a wrapped HF encoder."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, signal: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self.net(signal)}


PNG = b"\x89PNG\r\n\x1a\n"


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from HSIC with a centering matrix, in float64: HSIC(K, L) = tr(K H L H) / (n - 1)^2."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return (hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))).item()


class Pair(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher


def _softmax64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(logits.double() / temperature)
    return e / e.sum(dim=-1, keepdim=True)


def mlp() -> MLP:
    return MLP(in_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden=(16,))


def rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def block_mean(f: np.ndarray, h: int, w: int) -> np.ndarray:
    """Average pooling of (N, C, H, W) to (N, C, h, w) when h | H and w | W."""
    n, c, big_h, big_w = f.shape
    return f.reshape(n, c, h, big_h // h, w, big_w // w).mean(axis=(3, 5))


def reference_at(student: np.ndarray, teacher: np.ndarray, p: float = 2.0) -> float:
    """Zagoruyko & Komodakis (benchmark form): mean over N*HW of the squared difference of the
    L2-normalised channel means of |f|^p; the larger map is first mean-pooled to the smaller."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    s, t = block_mean(s, h, w), block_mean(t, h, w)

    def attention(f: np.ndarray) -> np.ndarray:
        q = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    return float(np.mean((attention(s) - attention(t)) ** 2))


def reference_nst(student: np.ndarray, teacher: np.ndarray) -> float:
    """Huang & Wang: per sample, squared MMD between the L2-normalised channel vectors with the
    kernel k(x, y) = (x . y)^2, averaged over the batch."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    s, t = block_mean(s, h, w), block_mean(t, h, w)
    total = 0.0
    for f_s, f_t in zip(s, t, strict=True):
        a = f_s.reshape(len(f_s), -1)
        b = f_t.reshape(len(f_t), -1)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)

        def k(x: np.ndarray, y: np.ndarray) -> float:
            return float(np.mean([(xi @ yj) ** 2 for xi in x for yj in y]))

        total += k(b, b) + k(a, a) - 2 * k(a, b)
    return total / len(s)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i p_i log(p_i / q_i), skipping p_i = 0."""
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


STUDENT = [[1.0, 2.0, 3.0, -0.5], [0.5, -1.0, 0.0, 2.0], [2.0, 1.5, -2.0, 0.0]]


TEACHER = [[3.0, 2.0, 1.0, 0.0], [2.0, 0.0, -2.0, 1.0], [-1.0, 4.0, 0.5, 0.5]]


def make_outputs(with_targets: bool = True) -> tuple[StepOutputs, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5, requires_grad=True)  # a co-trained teacher carries gradients
    targets = torch.randint(0, 5, (6,)) if with_targets else None
    return StepOutputs(student_logits=student, targets=targets, teacher_logits=teacher), student, teacher


class RecordTemperatureAndWeight(pl.Callback):
    """Records (global_step, temperature, kd weight) as the training step sees them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        kd = pl_module.loss_terms["kd"]
        # global_step already advanced: the step that just ran is global_step - 1
        self.seen.append((trainer.global_step - 1, kd.temperature, kd.weight))


def _kd_module() -> DistillationModule:
    pl.seed_everything(0, verbose=False)
    return DistillationModule(small_net(), small_net())


WIDTH = 6


def encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, WIDTH))


def seed_module(queue_size: int = 10, input_key: int | None = 0) -> EmbeddingDistillationModule:
    return EmbeddingDistillationModule(
        encoder(1),
        encoder(2),
        losses=[SEEDTerm(queue_size=queue_size)],
        input_key=input_key,
        cosine_decay=False,
    )


VOCAB = 50


KEYS = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_bert(hidden: int = 16, layers: int = 2, heads: int = 2, **flags: bool) -> SentenceEncoder:
    return small_bert_encoder(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        **flags,
    )


def token_batch(n: int = 4, length: int = 7, seed: int = 0) -> dict[str, Tensor]:
    """Random token ids; sequence i has length - i real tokens (at least 2), the rest padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    real = torch.arange(length)[None, :] < torch.tensor([max(length - i, 2) for i in range(n)])[:, None]
    return {
        "input_ids": torch.where(real, input_ids, 0),
        "attention_mask": real.long(),
        "token_type_ids": torch.zeros(n, length, dtype=torch.long),
    }


def per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(1, -1, *([1] * (ndim - 2)))


def pointwise(x: np.ndarray, weight: torch.Tensor) -> np.ndarray:
    """A bias-free 1x1 convolution (or Linear) with the given (out, in, ...) weight, in float64."""
    w = f64(weight).reshape(weight.shape[0], weight.shape[1])
    return np.einsum("oi,ni...->no...", w, x)


def outputs_of(student: torch.Tensor, teacher: torch.Tensor) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(len(student), 3),
        student_features={"s": student},
        teacher_features={"t": teacher},
    )
