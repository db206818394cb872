r"""Sequence-level knowledge distillation: the student learns the teacher's own completions.

Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016, Sec. 3.2): instead of matching
the teacher's next-token distributions on the data, the student is trained with cross-entropy on
the sequences the teacher generates, :math:`\hat y \approx \arg\max_y p_T(y \mid x)` (there by
beam search; here greedy decoding, or sampling), for every prompt :math:`x` of the training set:
:math:`\mathcal L = -\sum_t \log p_S(\hat y_t \mid \hat y_{<t}, x)`.

A generation pass (:func:`generate_teacher_completions`) writes the completions to a folder, one
file per batch of prompts, with the fingerprint of teacher, tokenizer, prompts and generation
settings in ``manifest.json``; a killed pass resumes where it stopped (the batches already written
are kept, each batch is sampled from its own seed, so the result is that of an uninterrupted
pass), and a folder of other completions is refused. :class:`SequenceKDData` runs the pass when its
folder is not complete (``prepare_data``) and serves prompt + completion for completion-only training.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_kd.checkpoint_io import atomic_save, checkpoint_problem
from lightning_kd.data.prompts import left_padded
from lightning_kd.language.completion import CompletionOnlyCollator
from lightning_kd.language.generation import (
    GenerationSettings,
    check_can_generate,
    check_context,
    derived_seed,
    end_of_sequence_id,
    generate_completions,
)
from lightning_kd.teachers.fingerprints import teacher_fingerprint
from lightning_kd.teachers.loading import load_weights

__all__ = [
    "SequenceKDData",
    "completion_rows",
    "completions_identity",
    "generate_teacher_completions",
    "read_teacher_completions",
    "tokenizer_fingerprint",
]

MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer: its ``tokenizers`` JSON when it has one, else its sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def prompts_fingerprint(prompts: Sequence[Tensor]) -> str:
    """SHA-256 of the prompts' token ids, in order."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt.tolist()).encode() + b"\n")
    return digest.hexdigest()


def completion_rows(sequences: Tensor, width: int, eos_token_id: int) -> list[list[int]]:
    """Each row's generated tokens (after the ``width`` prompt columns) up to and including its first EOS."""
    rows = []
    for tokens in sequences[:, width:].tolist():
        rows.append(tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens)
    return rows


@contextmanager
def _one_writer(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory/lock`` for the pass, or an error naming the fix."""
    descriptor = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"Another process is generating completions into {directory}: wait for it to finish, or give "
                "this run another output_dir."
            ) from None
        yield
    finally:
        os.close(descriptor)


def _shard(directory: Path, index: int) -> Path:
    return directory / f"batch-{index:05d}.pt"


def completions_identity(
    teacher: nn.Module,
    prompts: Sequence[Tensor],
    settings: GenerationSettings,
    seed: int,
    batch_size: int,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What identifies a folder of completions: teacher, prompts, generation settings, seed, batch size."""
    return {
        "teacher": teacher_fingerprint(teacher),
        "prompts": prompts_fingerprint(prompts),
        "prompt_count": len(prompts),
        "generation": {**settings.as_dict(), "seed": seed, "batch_size": batch_size},
        **(fingerprint or {}),
    }


def _checked_manifest(directory: Path, fingerprint: dict[str, Any], create: bool) -> None:
    """Refuse a folder whose manifest names other completions; write a new one's manifest (``create``)."""
    path = directory / MANIFEST
    if not path.is_file():
        if not create:
            raise FileNotFoundError(
                f"{directory} holds no teacher completions: run the generation pass (`lightning-kd generate "
                "--config RECIPE`, or a fit, which runs it when the folder is incomplete)."
            )
        atomic_save(fingerprint, path, write=lambda obj, file: file.write(json.dumps(obj, indent=1).encode()))
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} cannot be read ({error}): delete {directory} to generate the completions again."
        ) from None
    differing = [key for key in fingerprint if stored.get(key) != fingerprint[key]]
    if differing:
        details = "; ".join(
            f"{key}: stored {stored.get(key)!r}, now {fingerprint[key]!r}" for key in differing
        )
        raise ValueError(
            f"The completions in {directory} were generated with another {', '.join(differing)} ({details}). "
            "Delete the folder to generate them again for this run, or set output_dir to another folder."
        )


def _read_shard(path: Path) -> list[list[int]]:
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"{path} is damaged ({problem}): delete that file; the next pass generates it again, identically."
        )
    return torch.load(path, weights_only=True)["completions"]


def generate_teacher_completions(
    teacher: nn.Module,
    prompts: Sequence[Tensor],
    directory: str | Path,
    settings: GenerationSettings,
    pad_token_id: int,
    batch_size: int = 32,
    seed: int = 0,
    fingerprint: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The teacher's completion of every prompt, generated batch by batch into ``directory`` (resumable).

    Batch ``b`` holds prompts ``[b * batch_size, (b + 1) * batch_size)``, left-padded, sampled under a
    seed derived from ``(seed, b)``, and is written atomically to ``batch-<b>.pt``. Batches already
    in the folder are read, not generated again, so a pass killed at any point and run again gives
    the completions of an uninterrupted pass. ``manifest.json`` records the fingerprint (teacher,
    prompts, generation settings, seed and batch size, and the ``fingerprint`` entries given, e.g.
    the tokenizer's); a folder with another one is refused. One process writes a folder at a time.

    Args:
        teacher: a Hugging Face causal LM (:func:`~lightning_kd.language.generation.check_can_generate`).
        prompts: 1-D token-id tensors, one per prompt.
        directory: the output folder (created).
        settings: how to generate (:class:`~lightning_kd.language.GenerationSettings`).
        pad_token_id: the id of the prompts' left padding.
        batch_size: prompts per generated batch (part of the fingerprint).
        seed: the base seed of the batches' sampling.
        fingerprint: more entries identifying the completions (e.g. ``{"tokenizer": ...}``).
        device: where the teacher generates.
        on_batch: called with each batch's index after it is written.

    Returns:
        Each prompt's completion: its tokens up to and including the teacher's first end-of-sequence token.

    Raises:
        ValueError: a folder of other completions (the message names what differs), a damaged batch file.
        RuntimeError: another process is writing the folder.
    """
    check_can_generate(teacher, "teacher")
    eos = end_of_sequence_id(teacher)
    assert eos is not None  # check_can_generate
    if not prompts or any(prompt.ndim != 1 or len(prompt) == 0 for prompt in prompts):
        raise ValueError("Give at least one prompt, each a non-empty 1-D tensor of token ids.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    identity = completions_identity(teacher, prompts, settings, seed, batch_size, fingerprint)
    check_context(teacher, "teacher", max(len(prompt) for prompt in prompts), settings)
    completions: list[list[int]] = []
    with _one_writer(directory):
        _checked_manifest(directory, identity, create=True)
        teacher_device = next(teacher.parameters()).device
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            path = _shard(directory, index)
            if path.is_file():
                completions.extend(_read_shard(path))
                continue
            ids, mask = left_padded(list(prompts[start : start + batch_size]), pad_token_id)
            teacher.to(device)
            sequences = generate_completions(
                teacher, ids.to(device), mask.to(device), settings, derived_seed(seed, "sequence-kd", index)
            )
            rows = completion_rows(sequences, ids.shape[1], eos)
            atomic_save({"completions": rows}, path)
            completions.extend(rows)
            if on_batch is not None:
                on_batch(index)
        teacher.to(teacher_device)
    return completions


def read_teacher_completions(directory: str | Path, identity: dict[str, Any]) -> list[list[int]]:
    """The completions of a complete folder whose manifest is ``identity`` (:func:`completions_identity`).

    Reads without locking (any number of processes). Raises: FileNotFoundError (no pass yet),
    ValueError (other completions, a damaged file, or an unfinished pass: the message names the fix).
    """
    directory = Path(directory)
    _checked_manifest(directory, identity, create=False)
    count = identity["prompt_count"]
    batches = sorted(directory.glob("batch-*.pt"))
    completions = [row for path in batches for row in _read_shard(path)]
    if len(completions) != count:
        raise ValueError(
            f"{directory} holds {len(completions)} completions for {count} prompts: the generation pass "
            "did not finish. Run it again (`lightning-kd generate --config RECIPE`); it resumes where it "
            "stopped."
        )
    return completions


class SequenceKDData(pl.LightningDataModule):
    """Training on the teacher's completions of the training prompts; held-out batches from ``text``.

    ``prepare_data`` (one process per node, before the fit) runs :func:`generate_teacher_completions`
    unless ``output_dir`` is complete: the teacher (``teacher_checkpoint`` loaded into it) completes
    the prompt of every training row of ``text``, in order. ``setup`` reads the completions (the
    manifest's fingerprint is checked again) and serves ``prompt + completion`` rows, labels on the
    completion only (:class:`~lightning_kd.language.CompletionOnlyCollator`). Validation and test
    batches are ``text``'s (every token counted), so perplexities compare with the other recipes'.

    Args:
        text: the prompts and held-out text (:class:`~lightning_kd.data.PythonDocsPrompts`, or any
            datamodule with ``tokenizer``, ``datasets["train"]`` and a ``prompt_collator``).
        teacher: the teacher causal LM.
        output_dir: the folder of the teacher's completions.
        teacher_checkpoint: the teacher's checkpoint (e.g. a teacher run's ``latest.ckpt``); ``None``: as is.
        max_new_tokens: the most tokens per completion.
        do_sample: ``False``: greedy decoding (Kim & Rush's beam search with one beam); ``True``: sampling.
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling (with ``do_sample``).
        seed: the base seed of the batches' sampling.
        generation_batch_size: prompts per generated batch.
        batch_size: training rows per batch; ``None``: ``text.batch_size``.
        max_prompts: complete only the first training rows (small runs); ``None``: every row.
    """

    def __init__(
        self,
        text: pl.LightningDataModule,
        teacher: nn.Module,
        output_dir: str,
        teacher_checkpoint: str | None = None,
        max_new_tokens: int = 96,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        generation_batch_size: int = 32,
        batch_size: int | None = None,
        max_prompts: int | None = None,
    ) -> None:
        super().__init__()
        if max_prompts is not None and max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or None (every training row), got {max_prompts}.")
        self.max_prompts = max_prompts
        self.text = text
        self.teacher = teacher
        self.output_dir = Path(output_dir)
        self.teacher_checkpoint = teacher_checkpoint
        self.settings = GenerationSettings(max_new_tokens, temperature, top_p, do_sample)
        self.seed = seed
        self.generation_batch_size = generation_batch_size
        self.batch_size = batch_size if batch_size is not None else int(text.batch_size)
        self.samples: list[dict[str, Any]] = []
        self._teacher_loaded = False

    def prompts(self) -> tuple[list[Tensor], int]:
        """The training rows' prompts, in order, and the padding id (after ``text.setup``)."""
        self.text.setup("fit")
        collator = self.text.prompt_collator
        rows = self.text.datasets["train"]
        count = len(rows) if self.max_prompts is None else min(self.max_prompts, len(rows))
        prompts: list[Tensor] = []
        for start in range(0, count, 256):
            batch = collator([rows[i] for i in range(start, min(start + 256, count))])
            for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], strict=True):
                prompts.append(ids[mask.bool()])
        return prompts, int(collator.pad_token_id)

    def _load_teacher(self) -> None:
        if not self._teacher_loaded and self.teacher_checkpoint is not None:
            load_weights(self.teacher, self.teacher_checkpoint)
        self._teacher_loaded = True

    @property
    def extra_fingerprint(self) -> dict[str, str]:
        """The tokenizer's fingerprint (:func:`tokenizer_fingerprint`), recorded beside the pass's own."""
        return {"tokenizer": tokenizer_fingerprint(self.text.tokenizer)}

    def generate(self, device: torch.device | str | None = None) -> list[list[int]]:
        """Run (or resume) the generation pass; the completions of every training prompt.

        ``device``: where the teacher generates; default: the Trainer's device, else the CPU.
        """
        self._load_teacher()
        if device is None:
            trainer = self.trainer
            device = trainer.strategy.root_device if trainer is not None else "cpu"
        prompts, pad = self.prompts()
        return generate_teacher_completions(
            self.teacher,
            prompts,
            self.output_dir,
            self.settings,
            pad,
            batch_size=self.generation_batch_size,
            seed=self.seed,
            fingerprint=self.extra_fingerprint,
            device=device,
        )

    def prepare_data(self) -> None:
        """The generation pass, unless ``output_dir`` is complete (then only its fingerprint is checked)."""
        self.generate()

    def setup(self, stage: str | None = None) -> None:
        """Read the completions of :meth:`prepare_data` (fingerprint checked); build the training rows."""
        self.text.setup(stage)
        if self.samples:
            return
        prompts, _ = self.prompts()
        self._load_teacher()
        identity = completions_identity(
            self.teacher,
            prompts,
            self.settings,
            self.seed,
            self.generation_batch_size,
            self.extra_fingerprint,
        )
        completions = read_teacher_completions(self.output_dir, identity)
        self.samples = [
            {
                "input_ids": torch.cat([prompt, torch.tensor(completion, dtype=torch.long)]),
                "prompt_length": len(prompt),
            }
            for prompt, completion in zip(prompts, completions, strict=True)
        ]

    def train_dataloader(self) -> DataLoader:
        """Shuffled prompt + completion rows, labels on the completions."""
        return DataLoader(
            self.samples,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=CompletionOnlyCollator(self.text.tokenizer.pad_token_id),
        )

    def val_dataloader(self) -> Any:
        """``text``'s validation batches."""
        return self.text.val_dataloader()

    def test_dataloader(self) -> Any:
        """``text``'s test batches."""
        return self.text.test_dataloader()
