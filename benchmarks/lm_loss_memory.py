"""Peak memory and time of a token-level distillation loss + backward at a 128k vocabulary, per path.

    OMP_NUM_THREADS=1 PYTHONPATH=.:/tmp/ligersite python benchmarks/lm_loss_memory.py   # CPU, ~10 min
    python benchmarks/lm_loss_memory.py --device cuda                                  # GPU, with Liger
    python benchmarks/lm_loss_memory.py --quick                                        # a smoke run

Setting: 2,048 tokens (2 sequences of 1,024), hidden size 1,024, vocabulary 128,000, float32;
student and teacher each have last hidden states ``(2, 1024, 1024)`` and an LM head
``(128000, 1024)``; every token counts. One step is the loss and its backward into the student's
hidden states and head weight. Paths:

- ``plain``: ``logits = hidden @ W.T`` (and the teacher's under ``no_grad``), then
  ``token_divergence`` on the full ``(2, 1024, 128000)`` logits (``--plain-tokens 256,512``: measured
  at two smaller token counts and extrapolated linearly, where the machine lacks the memory);
- ``chunked``: the same logits, then ``token_divergence_chunked`` (``--chunk-size`` positions at a time);
- ``fused``: ``token_divergence_fused`` from the hidden states and both heads, no full logits;
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``, pure torch:
  ``compiled=False`` on the CPU, ``torch.compile`` on CUDA) with ``weight_hard_loss=0``,
  ``weight_soft_loss=1``; ``jsd`` at ``beta`` and ``forward_kl`` as its ``beta=0``. Run where
  ``liger_kernel`` imports (e.g. ``pip install --no-deps --target /tmp/ligersite liger-kernel`` and
  ``PYTHONPATH=/tmp/ligersite``); otherwise its rows say why they are left out.

Each (path, divergence) runs in a fresh process. On the CPU the memory of a step is the peak resident
set size (``VmHWM``, reset by ``/proc/self/clear_refs`` once the inputs are built) minus the resident
set size then (so the head weights'
gradients, 500 MiB, count in every path); on CUDA ``max_memory_allocated()`` minus
``memory_allocated()`` at the same point. Time: the mean of the steps after the first, wall clock and
CPU time of the process (``time.process_time``, less affected by other work on a shared machine). The
loss values are printed so the paths can be seen to agree. Writes benchmarks/results/lm_loss_memory.md
(``--out`` to change; ``--quick`` runs tiny sizes in this process and writes nothing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from memory import MIB, current_rss  # benchmarks/memory.py, beside this script

from lightning_kd.losses._token_chunks import DEFAULT_CHUNK_SIZE
from lightning_kd.losses.functional import token_divergence, token_divergence_chunked, token_divergence_fused

RESULTS = Path(__file__).parent / "results" / "lm_loss_memory.md"
PATHS = ("plain", "chunked", "fused", "liger")


def reset_peak_rss() -> None:
    """Make the process's peak resident set size (``VmHWM``) its current one (Linux ``clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """The peak resident set size since the last :func:`reset_peak_rss`, in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("No VmHWM line in /proc/self/status: RSS measurement needs Linux.")


def liger_loss() -> Any:
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` class, or the reason it cannot be imported (a str)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as error:  # noqa: BLE001 - any import failure is the reason the row is left out
        return f"liger_kernel does not import here ({type(error).__name__}: {error})"
    return LigerFusedLinearJSDLoss


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Student and teacher hidden states and heads (the student's take gradients), on ``args.device``."""
    generator = torch.Generator().manual_seed(0)
    n, length = 2, args.tokens // 2

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).to(args.device)

    return {
        "hidden": randn(n, length, args.hidden, scale=1.0).requires_grad_(True),
        "weight": randn(args.vocab, args.hidden, scale=args.hidden**-0.5 * 2).requires_grad_(True),
        "teacher_hidden": randn(n, length, args.hidden, scale=1.0),
        "teacher_weight": randn(args.vocab, args.hidden, scale=args.hidden**-0.5 * 3),
        "mask": torch.ones(n, length, dtype=torch.bool, device=args.device),
    }


def step(
    args: argparse.Namespace, path: str, divergence: str, x: dict[str, torch.Tensor], liger: Any
) -> float:
    """One loss + backward on ``path``; returns the loss value."""
    settings = {"divergence": divergence, "temperature": args.temperature, "beta": args.beta}
    if path in ("plain", "chunked"):
        logits = x["hidden"] @ x["weight"].T
        with torch.no_grad():
            teacher = x["teacher_hidden"] @ x["teacher_weight"].T
        if path == "plain":
            loss = token_divergence(logits, teacher, x["mask"], **settings)
        else:
            loss = token_divergence_chunked(
                logits, teacher, x["mask"], chunk_size=args.chunk_size, **settings
            )
    elif path == "fused":
        loss = token_divergence_fused(
            x["hidden"],
            x["weight"],
            teacher_hidden=x["teacher_hidden"],
            teacher_weight=x["teacher_weight"],
            mask=x["mask"],
            chunk_size=args.chunk_size,
            **settings,
        )
    else:
        loss_fn = liger(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=0.0 if divergence == "forward_kl" else args.beta,
            temperature=args.temperature,
            compiled=args.device == "cuda",
            chunk_size=args.chunk_size,
        )
        hidden_size = x["hidden"].shape[-1]
        labels = torch.where(x["mask"], 0, -100).reshape(-1)
        loss = loss_fn(
            x["hidden"].reshape(-1, hidden_size),
            x["weight"],
            x["teacher_hidden"].reshape(-1, hidden_size),
            x["teacher_weight"],
            labels,
        )
    loss.backward()
    value = loss.item()
    x["hidden"].grad = x["weight"].grad = None
    return value


def measure(args: argparse.Namespace, path: str, divergence: str) -> dict[str, Any]:
    """Build the inputs, run ``args.steps`` steps; memory above the inputs, seconds per step, the loss."""
    liger = liger_loss() if path == "liger" else None
    if isinstance(liger, str):
        return {"left_out": liger}
    if path == "liger" and divergence not in ("jsd", "forward_kl"):
        return {"left_out": "Liger's fused linear JSD covers jsd and forward_kl (beta=0) only"}
    x = inputs(args)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()  # building the inputs (randn, then scaled) peaked above what they hold
        start = current_rss()
    times, cpu_times, value = [], [], float("nan")
    for _ in range(args.steps):
        began, cpu_began = time.perf_counter(), time.process_time()
        value = step(args, path, divergence, x, liger)  # .item() synchronises
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu_began)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss()
    timed, cpu_timed = times[1:] or times, cpu_times[1:] or cpu_times
    return {
        "memory": peak - start,
        "seconds": sum(timed) / len(timed),
        "cpu_seconds": sum(cpu_timed) / len(cpu_timed),
        "loss": value,
    }


def render(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The markdown table: memory above the inputs, ratio to the plain path, time per step, loss."""
    what = "torch.cuda.max_memory_allocated - memory_allocated" if args.device == "cuda" else "peak RSS - RSS"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [
        f"Token-level loss + backward, {args.tokens} tokens (2 sequences), hidden {args.hidden}, vocabulary "
        f"{args.vocab}, float32, temperature {args.temperature}, beta {args.beta}, chunk size "
        f"{args.chunk_size}; device: {device} (torch.get_num_threads() = {torch.get_num_threads()}); "
        f"memory: {what} with the inputs built; {args.steps} steps, time = mean of the steps after the "
        f"first; {'quick: all rows in one process' if args.quick else 'each row in a fresh process'}; "
        f"torch {torch.__version__}.",
        "",
        f"One float32 (tokens, vocabulary) tensor: {args.tokens * args.vocab * 4 / MIB:.0f} MiB; one head "
        f"weight (and its gradient): {args.vocab * args.hidden * 4 / MIB:.0f} MiB.",
        "",
        "| path | divergence | memory (MiB) | / plain | s per step | CPU s per step | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for (path, divergence), row in results.items():
        if "left_out" in row:
            lines.append(f"| {path} | {divergence} | left out: {row['left_out']} | | | | |")
            continue
        plain = results[("plain", divergence)]["memory"]
        memory, loss = f"{row['memory'] / MIB:.0f}", f"{row['loss']:.6f}"
        if "note" in row:
            memory += f" ({row['note']})"
            loss += f" (at {row['loss_at']} tokens)"
        ratio = f"{row['memory'] / plain:.2f}" if plain > 0 else "n/a"  # --quick: in one process
        times = f"{row['seconds']:.2f} | {row['cpu_seconds']:.2f}"
        lines.append(f"| {path} | {divergence} | {memory} | {ratio} | {times} | {loss} |")
    return "\n".join(lines) + "\n"


def run_worker(
    args: argparse.Namespace, argv: list[str] | None, path: str, divergence: str, tokens: int | None = None
) -> dict[str, Any]:
    """:func:`measure` in a fresh process (at ``tokens`` instead of ``--tokens`` if given)."""
    passed = list(argv if argv is not None else sys.argv[1:])
    if tokens is not None:
        passed += ["--tokens", str(tokens)]  # the last --tokens wins
    run = subprocess.run(
        [sys.executable, __file__, *passed, "--worker", f"{path}:{divergence}"],
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    if run.returncode != 0:
        sys.exit(f"{path}:{divergence} failed:\n{run.stderr[-3000:]}")
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "tokens": tokens or args.tokens}


def extrapolated(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Memory and time at ``--tokens``, on the line through two runs at fewer tokens."""
    (t1, a), (t2, b) = ((run["tokens"], run) for run in runs)
    at = (args.tokens - t1) / (t2 - t1)
    row = {key: a[key] + (b[key] - a[key]) * at for key in ("memory", "seconds", "cpu_seconds")}
    measured = ", ".join(f"{run['memory'] / MIB:.0f} at {run['tokens']}" for run in runs)
    return {**row, "loss": b["loss"], "note": f"extrapolated from {measured} tokens", "loss_at": t2}


def main(argv: list[str] | None = None) -> str:
    """Run every (path, divergence) and return (and, unless ``--quick``, write) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--plain-tokens",
        type=lambda text: [int(t) for t in text.split(",")],
        help="two token counts, e.g. 256,512: run the plain rows at both and extrapolate memory and time "
        "linearly to --tokens (the plain path's intermediates are (tokens, vocabulary)), on a machine "
        "without the memory for the plain path at --tokens",
    )
    parser.add_argument("--divergences", default="forward_kl,jsd")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row's process")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in this process, nothing written")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.hidden, args.chunk_size, args.steps = 300, 16, 8, 5, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch.")
    if args.worker:
        path, divergence = args.worker.split(":")
        print(json.dumps(measure(args, path, divergence)))
        return ""
    results = {}
    for divergence in args.divergences.split(","):
        for path in args.paths.split(","):
            if args.quick:
                results[(path, divergence)] = measure(args, path, divergence)
            elif path == "plain" and args.plain_tokens:
                runs = [run_worker(args, argv, path, divergence, tokens) for tokens in args.plain_tokens]
                results[(path, divergence)] = extrapolated(args, runs)
            else:
                results[(path, divergence)] = run_worker(args, argv, path, divergence)
            print(path, divergence, results[(path, divergence)], flush=True)
    table = render(args, results)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
