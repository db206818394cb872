"""The top-k token store: codec, reconstruction, fingerprints, damage, one writer, resume, fits, command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_kd.cli import main
from lightning_kd.data import WithIndex
from lightning_kd.data.text import TokenBlocks
from lightning_kd.language import (
    CausalLMDistillationModule,
    TokenStoreDistillationModule,
    TopKCodec,
    TopKTokenStore,
    fill_token_store,
)
from lightning_kd.language.stored_teacher import StoredTeacher
from lightning_kd.language.token_codec import pack_fields, unpack_fields
from lightning_kd.losses import TokenCrossEntropyTerm, TokenDivergenceTerm
from lightning_kd.losses._token_chunks import DecodedRows
from lightning_kd.losses.token_divergence import token_divergence, token_divergence_chunked
from tests.language.helpers import VOCAB, tiny_gpt2

LENGTH = 8


def blocks(count: int = 12, vocab: int = VOCAB, seed: int = 0, completion: bool = False) -> TokenBlocks:
    """Random blocks; ``completion``: block i has a prompt of 1 + i % 3 tokens and i % 4 padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (count, LENGTH), generator=generator)
    attention, learned = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    if completion:
        for row in range(count):
            learned[row, : 1 + row % 3] = False
            attention[row, LENGTH - row % 4 :] = 0
        ids = ids.masked_fill(attention == 0, 1)
    return TokenBlocks(ids, attention, learned)


def kl64(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, in float64, from the formula."""
    log_p, log_q = log_p.double(), log_q.double()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def ideal_top_k(log_p: Tensor, k: int) -> Tensor:
    """Exact top-k log-probabilities and the exact tail mass spread uniformly, in float64."""
    log_p = log_p.double()
    top, ids = log_p.topk(k, dim=-1)
    tail = 1 - top.exp().sum(-1)
    out = (tail / (log_p.shape[-1] - k)).log().unsqueeze(-1).expand_as(log_p).clone()
    return out.scatter_(-1, ids, top)


def test_fields_pack_most_significant_bit_first_and_round_trip() -> None:
    assert pack_fields(torch.tensor([[5, 17]]), [3, 5]).tolist() == [[0b101_10001]]
    assert pack_fields(torch.tensor([[1, 0, 3]]), [1, 2, 2]).tolist() == [[0b1_00_11_000]]
    generator = torch.Generator().manual_seed(0)
    widths = torch.randint(1, 26, (40,), generator=generator).tolist()
    values = torch.stack([torch.randint(0, 2**w, (17,), generator=generator) for w in widths], dim=1)
    packed = pack_fields(values, widths)
    assert packed.shape == (17, math.ceil(sum(widths) / 8))
    assert torch.equal(unpack_fields(packed.view(17, 1, -1), widths).view(17, -1), values)


@pytest.mark.parametrize("k", [4, 16, 60])
def test_reconstruction_is_the_top_k_distribution_up_to_the_quantisation(k: int) -> None:
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(200, vocab) * 3
    codec = TopKCodec(vocab, k)
    rows, _ = codec.encode(logits)
    assert rows.shape == (200, codec.row_bytes) and codec.row_bytes == math.ceil(sum(codec.widths) / 8)
    log_p = torch.log_softmax(logits.double(), -1)
    decoded = codec.decode(rows)
    assert torch.allclose(decoded.double().exp().sum(-1), torch.ones(200, dtype=torch.float64), atol=1e-5)
    ideal = kl64(log_p, ideal_top_k(log_p, k))
    # the quantisation's own error is far below the top-k truncation's
    assert (kl64(log_p, decoded) - ideal).abs().max() < 1e-3
    top, ids = log_p.topk(k, dim=-1)
    assert torch.equal(decoded.topk(k, dim=-1).indices.sort(-1).values, ids.sort(-1).values)
    assert (decoded.gather(-1, ids).double() - top)[:, :4].abs().max() < 0.02  # the 8-bit ranks


def test_with_k_equal_to_v_the_distribution_comes_back() -> None:
    torch.manual_seed(1)
    logits = torch.randn(50, 32) * 2
    codec = TopKCodec(32, 32, residual_bits=((12, 32),))
    decoded = codec.decode(codec.encode(logits)[0])
    assert kl64(torch.log_softmax(logits.double(), -1), decoded).max() < 1e-5


class PatternTeacher(nn.Module):
    """Logits = a fixed tail shape plus +5 on three ids that depend on the input token."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.shape = nn.Parameter(torch.linspace(0, -2, vocab), requires_grad=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        bumps = torch.zeros(*input_ids.shape, self.shape.numel())
        for offset in range(3):
            bumps.scatter_(-1, ((input_ids + 7 * offset) % self.shape.numel()).unsqueeze(-1), 5.0)
        return self.shape + bumps


def test_the_tail_prior_recovers_a_shared_tail_shape(tmp_path: Path) -> None:
    data, teacher = blocks(), PatternTeacher()
    store = fill_token_store(teacher, data, tmp_path, k=3, blocks_per_shard=5)
    ids = data.input_ids[:4]
    log_p = torch.log_softmax(teacher(ids).double(), -1)[:, :-1]
    rows = store.rows(torch.arange(4), ids, torch.ones_like(ids), data.labels[:4])
    prior = store.codec.decode(rows, store.log_prior)
    uniform = store.codec.decode(rows)
    assert kl64(log_p, prior).max() < 1e-3
    assert kl64(log_p, uniform).min() > 0.005
    assert (kl64(log_p, uniform) - kl64(log_p, ideal_top_k(log_p, 3))).abs().max() < 1e-3


def test_a_store_of_another_teacher_is_refused_then_rebuilt(tmp_path: Path) -> None:
    data = blocks()
    fill_token_store(tiny_gpt2(seed=0), data, tmp_path, k=4)
    with pytest.raises(ValueError, match="was filled from another teacher .* overwrite=True"):
        fill_token_store(tiny_gpt2(seed=1), data, tmp_path, k=4)
    with pytest.raises(ValueError, match="was filled from another data"):
        fill_token_store(tiny_gpt2(seed=0), blocks(seed=5), tmp_path, k=4)
    with pytest.raises(ValueError, match="has another codec"):
        fill_token_store(tiny_gpt2(seed=0), data, tmp_path, k=5)
    with pytest.warns(UserWarning, match="another teacher .* rebuilding it"):
        store = fill_token_store(tiny_gpt2(seed=1), data, tmp_path, k=4, overwrite=True)
    assert json.loads((tmp_path / "meta.json").read_text())["complete"] and store.num_blocks == 12


class Tokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_another_tokenizer_or_other_inputs_are_refused_at_read(tmp_path: Path) -> None:
    data = blocks()
    tokenizer = Tokenizer({f"t{i}": i for i in range(VOCAB)})
    store = fill_token_store(tiny_gpt2(), data, tmp_path, k=4, tokenizer=tokenizer)
    TopKTokenStore(tmp_path, tokenizer=Tokenizer(tokenizer.get_vocab()))  # an equal vocabulary opens
    with pytest.raises(ValueError, match="another tokenizer"):
        TopKTokenStore(tmp_path, tokenizer=Tokenizer({f"u{i}": i for i in range(VOCAB)}))
    changed = data.input_ids[[3]].clone()
    changed[0, 2] += 1
    with pytest.raises(RuntimeError, match="input of block 3 is not the one"):
        store.rows(torch.tensor([3]), changed, torch.ones_like(changed), changed)
    with pytest.raises(IndexError, match="holds 12 blocks but a batch has index 12"):
        store.rows(torch.tensor([12]), changed, torch.ones_like(changed), changed)


def test_only_the_counted_positions_are_stored(tmp_path: Path) -> None:
    data, teacher = blocks(completion=True), tiny_gpt2(seed=2)
    store = fill_token_store(teacher, data, tmp_path, k=6, blocks_per_shard=5)
    labels, attention = data.labels, data.attention_mask
    counted = (labels[:, 1:] != -100) & (attention[:, 1:] == 1) & (attention[:, :-1] == 1)
    assert store.positions == int(counted.sum()) < 12 * (LENGTH - 1)
    stored = sum(np.load(path).shape[0] for path in sorted(tmp_path.glob("shard-*.rows.npy")))
    assert stored == int(counted.sum())
    rows = store.rows(torch.arange(12), data.input_ids, attention, labels)
    assert torch.all(rows[~counted] == 0) and torch.all(rows[counted].amax(-1) > 0)
    expected = torch.log_softmax(teacher(input_ids=data.input_ids, attention_mask=attention).logits, -1)
    top, ids = expected[:, :-1][counted].topk(6, dim=-1)
    decoded = store.codec.decode(rows[counted])
    assert torch.equal(decoded.topk(6, dim=-1).indices.sort(-1).values, ids.sort(-1).values)
    assert (decoded.gather(-1, ids) - top)[:, :4].abs().max() < 0.02  # the 8-bit ranks
    other = labels[[5]].clone()
    other[0, 3] = -100  # one more token left out: another block
    with pytest.raises(RuntimeError, match="input of block 5 is not the one"):
        store.rows(torch.tensor([5]), data.input_ids[[5]], attention[[5]], other)
    with pytest.raises(ValueError, match="filled from blocks with labels: give the batch's labels"):
        store.rows(torch.tensor([5]), data.input_ids[[5]], attention[[5]])
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format": 1}))  # every position stored
    with pytest.raises(RuntimeError, match="has format 1, this version reads 2: rebuild it .* --overwrite"):
        TopKTokenStore(tmp_path)


def test_a_flipped_byte_is_an_error_naming_the_shard(tmp_path: Path) -> None:
    data = blocks()
    fill_token_store(tiny_gpt2(), data, tmp_path, k=4, blocks_per_shard=5)
    path = tmp_path / "shard-00001.rows.npy"
    content = bytearray(path.read_bytes())
    content[-40] ^= 0x10
    path.write_bytes(bytes(content))
    store = TopKTokenStore(tmp_path)
    ones = torch.ones(2, LENGTH, dtype=torch.long)
    store.rows(torch.tensor([0, 4]), data.input_ids[[0, 4]], ones, data.labels[[0, 4]])  # shard 0: intact
    with pytest.raises(RuntimeError, match=r"damaged: shard-00001\.rows\.npy \(shard 1\)"):
        store.rows(torch.tensor([0, 6]), data.input_ids[[0, 6]], ones, data.labels[[0, 6]])
    tail = tmp_path / "shard-00002.tail.npy"
    tail.write_bytes(tail.read_bytes()[:-8])
    with pytest.raises(RuntimeError, match=r"damaged: shard-00002\.tail\.npy"):
        TopKTokenStore(tmp_path)


def test_a_second_writer_is_refused_with_the_holder(tmp_path: Path) -> None:
    holder = (
        "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'since': 's'}).encode(), 0); "
        "print('locked', flush=True); time.sleep(30)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError) as refused:
            fill_token_store(tiny_gpt2(), blocks(), tmp_path, k=4)
        assert str(refused.value).startswith(
            f"The top-k token store directory {tmp_path} is in use by another process (pid {process.pid} "
            "on host h, writing since s). Two runs cannot build one top-k token store at the same time"
        )
        assert "TeacherOutputCache" not in str(refused.value)
        assert not (tmp_path / "meta.json").exists()
    finally:
        process.kill()
        process.wait(timeout=10)


class Killed(Exception):
    pass


class Counting(nn.Module):
    """The teacher, counting its calls; raises ``Killed`` at call ``fail_at``."""

    def __init__(self, teacher: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.teacher, self.calls, self.fail_at = teacher, 0, fail_at

    def forward(self, **inputs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Killed
        return self.teacher(**inputs)


def test_a_killed_fill_resumes_at_the_first_unfinished_shard(tmp_path: Path) -> None:
    data, teacher = blocks(), tiny_gpt2()
    # call 1 reads the vocabulary; then 2 calls per shard (5 blocks, batch 3): killed inside shard 1
    with pytest.raises(Killed):
        fill_token_store(
            Counting(teacher, fail_at=5), data, tmp_path / "a", k=4, blocks_per_shard=5, batch_size=3
        )
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert sorted(meta["shards"]) == ["0"] and not meta["complete"]
    with pytest.raises(RuntimeError, match=r"incomplete \(1 of 3 shards"):
        TopKTokenStore(tmp_path / "a")
    resumed = Counting(teacher)
    fill_token_store(resumed, data, tmp_path / "a", k=4, blocks_per_shard=5, batch_size=3)
    assert resumed.calls == 1 + 2 + 1  # vocabulary, shard 1, shard 2
    fill_token_store(teacher, data, tmp_path / "b", k=4, blocks_per_shard=5, batch_size=3)
    for name in ("shard-00000.rows.npy", "shard-00001.rows.npy", "shard-00002.tail.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def fit(module: pl.LightningModule, data: TokenBlocks, steps: int = 3) -> list[float]:
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, index: int) -> None:
            losses.append(float(trainer.callback_metrics["train/loss_kd"]))

    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(module, DataLoader(WithIndex(data), batch_size=4))
    return losses


@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_a_fit_from_the_store_with_k_equal_to_v_is_the_fit_with_the_live_teacher(
    tmp_path: Path, path: str
) -> None:
    data, teacher = blocks(completion=True), tiny_gpt2(seed=3)  # prompts and padding: not stored
    fill_token_store(teacher, data, tmp_path, k=VOCAB, residual_bits=((16, VOCAB),))

    def terms() -> list:
        return [
            TokenCrossEntropyTerm("ce", weight=0.5),
            TokenDivergenceTerm("kd", weight=0.5, divergence="jsd", path=path, chunk_size=16),
        ]

    settings = {"losses": terms(), "cosine_decay": False}
    live = CausalLMDistillationModule(tiny_gpt2(hidden=8, seed=4), teacher, **settings)
    live_losses = fit(live, data)
    stored = TokenStoreDistillationModule(
        tiny_gpt2(hidden=8, seed=4), tmp_path, losses=terms(), cosine_decay=False
    )
    stored_losses = fit(stored, data)
    # 16-bit residuals: the stored log-probabilities are within ~1e-4 of the teacher's
    assert stored_losses == pytest.approx(live_losses, abs=1e-5)
    for a, b in zip(live.student.parameters(), stored.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_the_chunked_loss_decodes_stored_rows_chunk_by_chunk_with_the_full_decodes_values(
    tmp_path: Path, divergence: str
) -> None:
    data = blocks()
    store = fill_token_store(tiny_gpt2(seed=2), data, tmp_path, k=5)
    teacher = StoredTeacher(store)
    ids = data.input_ids[:3]
    rows = store.rows(torch.arange(3), ids, torch.ones_like(ids), ids)
    decoded = []
    rows_of = teacher.decoded_rows(rows)
    chunks = DecodedRows(
        rows_of.packed, lambda packed, out: decoded.append(len(packed)) or rows_of.decode(packed, out), VOCAB
    )
    student = torch.randn(3, LENGTH - 1, VOCAB, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, LENGTH - 1, generator=torch.Generator().manual_seed(0)) < 0.7
    by_chunk = token_divergence_chunked(student.float(), chunks, mask, divergence=divergence, chunk_size=5)
    (grad,) = torch.autograd.grad(by_chunk, student)
    assert decoded == [5, 5, 5, 5, 1]  # 21 positions, chunks of 5: one chunk decoded at a time
    # float64, from the formula, on the full decode
    log_t = teacher(rows)[:, :-1].double()
    log_s = torch.log_softmax(student, -1)
    if divergence == "forward_kl":
        values = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:  # beta = 0.5: 0.5 KL(t || m) + 0.5 KL(s || m)
        log_m = torch.log(0.5 * log_t.exp() + 0.5 * log_s.exp())
        values = 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1)
    expected = values[mask].sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert float(by_chunk.detach()) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)
    assert torch.all(grad[~mask] == 0)
    # the same as the chunked path on the full decode, which forms the (N, L - 1, V) tensor
    logits = student.detach().float().requires_grad_()
    full = token_divergence_chunked(logits, log_t.float(), mask, divergence=divergence, chunk_size=5)
    full.backward()
    assert float(full) == pytest.approx(float(by_chunk.detach()), rel=1e-6)
    torch.testing.assert_close(grad.float(), logits.grad, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="hold 21 positions of 48 token ids but the student's logits 14"):
        token_divergence_chunked(student[:2].float().detach(), chunks, chunk_size=5)


def test_the_module_decodes_by_chunk_only_when_every_teacher_term_is_chunked(tmp_path: Path) -> None:
    data = blocks()
    fill_token_store(tiny_gpt2(seed=2), data, tmp_path, k=5)
    chunked = [TokenCrossEntropyTerm("ce"), TokenDivergenceTerm("kd", path="chunked", chunk_size=8)]
    plain = [*chunked, TokenDivergenceTerm("plain_kd")]
    batch = next(iter(DataLoader(WithIndex(data), batch_size=4)))
    for terms, by_chunk in ((chunked, True), (plain, False)):
        module = TokenStoreDistillationModule(tiny_gpt2(hidden=8), tmp_path, losses=terms)
        module.check_batch(batch, "training")
        tokens = module.step_outputs(batch).tokens
        assert module.decodes_by_chunk is by_chunk
        assert (tokens.teacher_logits is None) is by_chunk and (tokens.teacher_rows is None) is not by_chunk
        if by_chunk:
            full = module.teacher(batch["teacher_topk_rows"])[:, :-1]
            loss = module.loss_terms["kd"](module.step_outputs(batch))
            expected = token_divergence(tokens.student_logits.detach(), full, tokens.mask)
            assert float(loss) == pytest.approx(float(expected), rel=1e-4)  # float32 sums


def test_the_module_refuses_a_fused_term_and_batches_without_an_index(tmp_path: Path) -> None:
    data = blocks()
    fill_token_store(tiny_gpt2(), data, tmp_path, k=4)
    with pytest.raises(ValueError, match=r"\['kd'\] take the fused LM-head path, .* path='chunked'"):
        TokenStoreDistillationModule(tiny_gpt2(), tmp_path, losses=[TokenDivergenceTerm("kd", path="fused")])
    with pytest.raises(ValueError, match="student predicts 40 token ids but the store holds a teacher of 48"):
        TokenStoreDistillationModule(tiny_gpt2(vocab=40), tmp_path)
    with pytest.raises(ValueError, match="takes no teacher: the teacher is the store"):
        TokenStoreDistillationModule(tiny_gpt2(), tmp_path, teacher=tiny_gpt2())
    with pytest.raises(ValueError, match="takes no teacher_mode"):
        TokenStoreDistillationModule(tiny_gpt2(), tmp_path, teacher_mode="ema")
    # the defaults the command line fills in are accepted
    TokenStoreDistillationModule(tiny_gpt2(), tmp_path, teacher=None, teacher_mode="frozen", target_key=1)
    module = TokenStoreDistillationModule(tiny_gpt2(hidden=8), tmp_path)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(KeyError, match="WithIndex"):
        trainer.fit(module, DataLoader(data, batch_size=4))


class BlockData(pl.LightningDataModule):
    """Random token blocks with a ``datasets`` dict, for the command's test."""

    def __init__(self, count: int = 6) -> None:
        super().__init__()
        self.datasets = {"train": blocks(count)}


def test_cache_tokens_command_fills_a_store_from_a_recipe(tmp_path: Path, capsys: Any) -> None:
    teacher = tiny_gpt2()
    torch.save({f"teacher.{k}": v for k, v in teacher.state_dict().items()}, tmp_path / "teacher.ckpt")
    config = {
        "model": {
            "class_path": "lightning_kd.CausalLMDistillationModule",
            "init_args": {
                "teacher": {
                    "class_path": "transformers.GPT2LMHeadModel",
                    "init_args": {
                        "config": {
                            "class_path": "transformers.GPT2Config",
                            "init_args": {
                                "vocab_size": VOCAB,
                                "n_positions": 32,
                                "n_embd": 16,
                                "n_layer": 2,
                                "n_head": 2,
                            },
                        }
                    },
                },  # fmt: skip
                "teacher_checkpoint": str(tmp_path / "teacher.ckpt"),
            },
        },
        "data": {"class_path": "tests.language.test_token_store.BlockData"},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(config))
    directory = str(tmp_path / "s")
    main(["cache-tokens", "--config", str(tmp_path / "recipe.yaml"), "--directory", directory, "--k", "8",
          "--residual-bits", "8x4,4x4", "--blocks-per-shard", "4", "--device", "cpu"])  # fmt: skip
    assert "Stored 6 blocks x 7 positions" in capsys.readouterr().out
    store = TopKTokenStore(tmp_path / "s")
    ids = blocks(6).input_ids
    expected = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)[:, :-1]
    decoded = store.codec.decode(store.rows(torch.arange(6), ids, torch.ones_like(ids), ids))
    top, index = expected.topk(8, dim=-1)
    assert (decoded.gather(-1, index).double() - top)[..., :4].abs().max() < 0.02
