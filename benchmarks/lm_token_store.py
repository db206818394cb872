"""The top-k token store on the offline LM example: size, bytes per token, KL error, fill and step time.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/lm_token_store.py --out benchmarks/results/lm_token_store.md

The teacher is ``tiny_gpt2(V, "teacher")`` on ``PythonDocsText`` (blocks of 128, V = 4096), loaded from
``--teacher-checkpoint`` or, without one, trained here for ``--teacher-steps`` steps (a weaker teacher
than the example's 15-minute one: its distributions are flatter, so top-k truncation loses more).
The store covers ``--blocks`` training blocks. KL error: per counted token, KL(p_teacher || p_stored)
in float64 against the full teacher distribution; "top-k exact" is the same truncation without
quantisation (exact log-probabilities, uniform tail), so the difference is the codec's own error.
V = 128k: rows of random logits (the format's size does not depend on the values). Times are CPU
process times, one thread.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from lightning_kd.data import WithIndex
from lightning_kd.data.text import PythonDocsText
from lightning_kd.language import (
    CausalLMDistillationModule,
    TokenStoreDistillationModule,
    TopKCodec,
    TopKTokenStore,
    fill_token_store,
)
from lightning_kd.language.stored_teacher import StoredTeacher
from lightning_kd.losses.token_divergence import token_divergence, token_divergence_chunked
from lightning_kd.models.gpt import tiny_gpt2
from lightning_kd.teachers.loading import load_weights

COMPACT = ((6, 8), (2, 32))  # fits 300 bytes at V = 128k, k = 128


def kl64(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    log_p, log_q = log_p.double(), log_q.double()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def exact_top_k(log_p: torch.Tensor, k: int) -> torch.Tensor:
    top, ids = log_p.topk(k, dim=-1)
    tail = (1 - top.exp().sum(-1)).clamp_min(1e-300)
    out = (tail / (log_p.shape[-1] - k)).log().unsqueeze(-1).expand_as(log_p).clone()
    return out.scatter_(-1, ids, top)


def train_teacher(data: PythonDocsText, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = tiny_gpt2(data.vocab_size, "teacher", n_positions=128)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    loader = DataLoader(data.datasets["train"], batch_size=16, shuffle=True)
    done = 0
    while done < steps:
        for batch in loader:
            loss = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return teacher.eval()


@torch.no_grad()
def kl_errors(
    teacher: torch.nn.Module,
    stores: dict[int, TopKTokenStore],
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    blocks_per_call: int = 16,
) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]:
    """Per counted token, KL(teacher || reconstruction) of each store (prior and uniform tail) and of
    the exact top-k truncation, in float64, and the teacher's mean NLL; ``blocks_per_call`` blocks at
    a time (the float64 ``(blocks, 127, V)`` tensors stay small)."""
    found: dict[int, dict[str, list[torch.Tensor]]] = {
        k: {"prior": [], "uniform": [], "exact": []} for k in stores
    }
    losses = []
    for start in range(0, len(ids), blocks_per_call):
        part = slice(start, start + blocks_per_call)
        logits = teacher(input_ids=ids[part], attention_mask=mask[part]).logits
        full = torch.log_softmax(logits.double(), -1)[:, :-1]
        counted = (labels[part, 1:] != -100) & mask[part, 1:].bool() & mask[part, :-1].bool()
        losses.append(-full.gather(-1, ids[part, 1:].unsqueeze(-1)).squeeze(-1)[counted])
        indices = torch.arange(start, start + len(full))
        for k, store in stores.items():
            rows = store.rows(indices, ids[part], mask[part], labels[part])
            found[k]["prior"].append(kl64(full, store.codec.decode(rows, store.log_prior))[counted])
            found[k]["uniform"].append(kl64(full, store.codec.decode(rows))[counted])
            found[k]["exact"].append(kl64(full, exact_top_k(full, k))[counted])
    errors = {k: {rule: torch.cat(parts) for rule, parts in rules.items()} for k, rules in found.items()}
    return errors, torch.cat(losses).mean()


def step_time(module: torch.nn.Module, loader: DataLoader, steps: int) -> float:
    """CPU seconds per training step (forward, loss, backward, optimizer) after one warm-up step."""
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    module.train()
    module.teacher.eval()
    times = []
    for index, batch in enumerate(loader):
        if index > steps:
            break
        start = time.process_time()
        module.check_batch(batch, "training")
        outputs = module.step_outputs(batch)
        loss, _ = module.compute_loss(outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if index:
            times.append(time.process_time() - start)
    return sum(times) / len(times)


#: the decode-memory variants: (path, whether the teacher's (N, L - 1, V) tensor is decoded in full)
DECODES = {
    "plain, full decode": ("plain", True),
    "chunked, full decode": ("chunked", True),
    "chunked, per-chunk decode": ("chunked", False),
}


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS (``clear_refs`` 5, Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _loss_peak(directory: str, variant: str, blocks: dict[str, torch.Tensor], results: object) -> None:
    """In a fresh process: the peak RSS added by one KD loss's forward and backward (MiB)."""
    torch.set_num_threads(1)
    path, full = DECODES[variant]
    store = TopKTokenStore(directory)
    teacher = StoredTeacher(store)
    ids = blocks["input_ids"]
    rows = store.rows(torch.arange(len(ids)), ids, blocks["attention_mask"], blocks["labels"])
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(*rows.shape[:2], store.codec.vocab_size, generator=generator).requires_grad_()
    counted = torch.ones(rows.shape[:2], dtype=torch.bool)
    _reset_peak_rss()
    before = _status_mib("VmRSS")  # the inputs (student logits, stored rows) are allocated
    started = time.process_time()
    if full:
        decoded = teacher(rows)[:, :-1]
        loss = (token_divergence if path == "plain" else token_divergence_chunked)(student, decoded, counted)
    else:
        loss = token_divergence_chunked(student, teacher.decoded_rows(rows), counted)
    loss.backward()
    results.put((variant, _status_mib("VmHWM") - before, time.process_time() - started, float(loss.detach())))


def decode_memory(directory: str | Path, blocks: dict[str, torch.Tensor]) -> list[str]:
    """Peak memory of the forward-KL loss from the store, full decode vs per-chunk decode (table rows).

    Each variant runs in its own process, its peak RSS reset just before the loss (tensors this
    large are mmap-allocated, so RSS follows the live tensors). The student's ``(N, L - 1, V)`` float32 logits
    and the stored rows exist before and are not counted; their gradient (the same size) is.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    rows = []
    for variant in DECODES:
        process = context.Process(target=_loss_peak, args=(str(directory), variant, blocks, results))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"The memory run of {variant!r} failed (exit code {process.exitcode}).")
        name, peak, seconds, loss = results.get(timeout=10)
        rows.append(f"| {name} | {peak:.0f} | {seconds:.2f} | {loss:.6f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=[8, 32, 128],
        help="the stores' k (128 among them: the step and memory tables read it)",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the decode-memory table: a k = 128 store of --blocks blocks (at least 32) of an untrained "
        "teacher (memory does not depend on the values)",
    )
    args = parser.parse_args()
    if 128 not in args.ks:
        parser.error(f"--ks {args.ks}: include 128 (the step-time and memory tables read the k = 128 store)")
    torch.set_num_threads(1)
    data = PythonDocsText(block_size=128, vocab_size=4096, batch_size=8)
    data.setup("fit")
    if args.memory_only:
        memory_only(data, args.blocks)
        return
    started = time.process_time()
    if args.teacher_checkpoint:
        teacher = tiny_gpt2(data.vocab_size, "teacher", n_positions=128)
        load_weights(teacher, args.teacher_checkpoint)
        origin = f"loaded from {args.teacher_checkpoint}"
    else:
        teacher = train_teacher(data, args.teacher_steps)
        seconds = time.process_time() - started
        origin = f"trained here for {args.teacher_steps} steps of 16 blocks ({seconds:.0f} CPU s)"
    teacher.eval()
    blocks = Subset(data.datasets["train"], range(args.blocks))
    ids = torch.stack([blocks[i]["input_ids"] for i in range(len(blocks))])
    mask = torch.stack([blocks[i]["attention_mask"] for i in range(len(blocks))])
    labels = torch.stack([blocks[i]["labels"] for i in range(len(blocks))])
    counted = (labels[:, 1:] != -100) & mask[:, 1:].bool() & mask[:, :-1].bool()
    stores, fills = {}, {}
    root = Path(tempfile.mkdtemp())
    for k in args.ks:
        start = time.process_time()
        stores[k] = fill_token_store(
            teacher, blocks, root / f"k{k}", k=k, tokenizer=data.tokenizer, batch_size=8, blocks_per_shard=16
        )
        fills[k] = time.process_time() - start
    errors, nll = kl_errors(teacher, stores, ids, mask, labels)
    lines = [
        "# The top-k token store (benchmarks/lm_token_store.py)",
        "",
        f"Teacher: tiny_gpt2(4096, 'teacher'), {origin}; perplexity on the stored blocks "
        f"{float(nll.exp()):.1f}. Store: {args.blocks} training blocks of PythonDocsText (block 128, "
        f"{int(counted.sum())} counted tokens). CPU process times, one thread; load average "
        f"{os.getloadavg()[0]:.1f} at the start.",
        "",
        "## V = 4096 (the example)",
        "",
        "| k | bytes/token (row) | bytes/token (files) | KL error, prior tail: mean / p99 / max "
        "| uniform tail: mean | top-k exact (uniform): mean | fill s/1k tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, store in stores.items():
        prior, uniform, exact = (errors[k][rule] for rule in ("prior", "uniform", "exact"))
        lines.append(
            f"| {k} | {store.codec.row_bytes} | {store.bytes_per_token:.1f} | {prior.mean():.2e} / "
            f"{prior.quantile(0.99):.2e} / {prior.max():.2e} | {uniform.mean():.2e} | {exact.mean():.2e} | "
            f"{1000 * fills[k] / (len(blocks) * 127):.3f} |"
        )
        print(lines[-1], flush=True)
    lines += ["", "## V = 128k (131072), random logits N(0, 3^2), 256 positions", "",
              "| k | residual bits | bytes/token (row) | KL - top-k exact KL (the codec's error), mean |",
              "|---|---|---|---|"]  # fmt: skip
    torch.manual_seed(0)
    logits = torch.randn(256, 131072) * 3
    log_p = torch.log_softmax(logits.double(), -1)
    for k, bits in ((8, None), (32, None), (128, None), (128, COMPACT)):
        codec = TopKCodec(131072, k) if bits is None else TopKCodec(131072, k, bits)
        decoded = codec.decode(codec.encode(logits)[0])
        extra = (kl64(log_p, decoded) - kl64(log_p, exact_top_k(log_p, k))).mean()
        name = "default 8x4,6x12,4x32,2x80" if bits is None else "compact 6x8,2x32"
        lines.append(f"| {k} | {name} | {codec.row_bytes} | {extra:.2e} |")
        print(lines[-1], flush=True)
    loader = DataLoader(WithIndex(blocks), batch_size=8)
    student = tiny_gpt2(data.vocab_size, "student", n_positions=128)
    live = CausalLMDistillationModule(student, teacher, cosine_decay=False)
    from_store = TokenStoreDistillationModule(
        tiny_gpt2(data.vocab_size, "student", n_positions=128), root / "k128"
    )
    live_s = step_time(live, loader, args.steps)
    store_s = step_time(from_store, loader, args.steps)
    first = {"input_ids": ids[:32], "attention_mask": mask[:32], "labels": labels[:32]}
    lines += ["", *memory_header(len(first["input_ids"])), *decode_memory(root / "k128", first)]
    lines += ["", "## Time per training step (batch 8 x 128, tiny_gpt2 'student', CE + forward KL)", "",
              "| teacher | CPU s / step |", "|---|---|",
              f"| live (in memory) | {live_s:.3f} |", f"| store, k = 128 | {store_s:.3f} |"]  # fmt: skip
    print("\n".join(lines[-4:]))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def memory_header(blocks: int) -> list[str]:
    """The decode-memory table's title, explanation and header, for a batch of ``blocks`` blocks."""
    mib = blocks * 127 * 4096 * 4 / 2**20
    return [
        f"## Peak memory of the forward-KL loss from the store (batch {blocks} x 128, V = 4096, k = 128)",
        "",
        "Peak RSS above the RSS before the loss, over its forward and backward (one process each; the",
        f"student's logits and the stored rows exist before; the logits' gradient, {mib:.1f} MiB, is",
        f"counted). Full decode: the ({blocks}, 127, 4096) float32 teacher tensor ({mib:.1f} MiB) is formed",
        "first.",
        "",
        "| loss | peak MiB | CPU s | loss value |",
        "|---|---|---|---|",
    ]


def memory_only(data: PythonDocsText, blocks: int) -> None:
    """The decode-memory table alone, from an untrained teacher's k = 128 store."""
    torch.manual_seed(0)
    teacher = tiny_gpt2(data.vocab_size, "teacher", n_positions=128).eval()
    subset = Subset(data.datasets["train"], range(max(blocks, 32)))
    directory = Path(tempfile.mkdtemp()) / "k128"
    fill_token_store(teacher, subset, directory, k=128, batch_size=8, blocks_per_shard=16)
    first = {key: torch.stack([subset[i][key] for i in range(32)]) for key in subset[0]}
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("\n".join(memory_header(32)))
    decode_memory(directory, first)


if __name__ == "__main__":
    main()
