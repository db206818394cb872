"""Size the offline language-model example: tokens/s and validation perplexity per CPU-minute, one thread.

    OMP_NUM_THREADS=1 python benchmarks/lm_sizing.py throughput --sizes teacher student
    OMP_NUM_THREADS=1 python benchmarks/lm_sizing.py train --size teacher --minutes 2.5 5 10 15 --seed 0
    OMP_NUM_THREADS=1 python benchmarks/lm_sizing.py schedules --size student --steps 200

A plain PyTorch loop (AdamW, linear warm-up then a constant learning rate, gradient clipping at
1) trains ``tiny_gpt2`` models on ``PythonDocsText`` (packed blocks of 128 tokens, vocabulary
4,096) with ``torch.set_num_threads(1)``. The budget is CPU time of this process
(``time.process_time``), so a busy machine does not shorten it; evaluation is not counted.
``train`` prints the validation perplexity (exp of the mean next-token NLL over every validation
token) each time the CPU time passes one of ``--minutes``. ``throughput`` times training steps and
teacher forward passes (the extra cost a distillation step pays per batch). ``schedules`` trains
one start on the same batches (a data-loader generator seeded by ``--seed``) with each learning-rate
schedule, in this plain loop and in ``CausalLMDistillationModule`` (no teacher, the same AdamW and
clipping), and prints the training loss of both loops at a few steps and the validation and test
perplexity: the two loops agree, the schedules do not.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_kd import CausalLMDistillationModule, TokenCrossEntropyTerm
from lightning_kd.callbacks.report.compression import count_parameters
from lightning_kd.data import PythonDocsText
from lightning_kd.data.text import describe_corpus
from lightning_kd.models import GPT2_SIZES, tiny_gpt2

#: extra candidate sizes beyond GPT2_SIZES (layers, width, heads)
CANDIDATES = {
    **GPT2_SIZES,
    "teacher-narrow": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "student-1layer": {"n_layer": 1, "n_embd": 64, "n_head": 2},
    "student-wide": {"n_layer": 2, "n_embd": 96, "n_head": 3},
}


def build(name: str, vocab_size: int, block_size: int) -> torch.nn.Module:
    return tiny_gpt2(vocab_size, n_positions=block_size, **CANDIDATES[name])


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: PythonDocsText, split: str = "val") -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in data.val_dataloader() if split == "val" else data.test_dataloader():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((labels != -100).sum())
    model.train()
    return math.exp(total / count)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def throughput(args: argparse.Namespace, data: PythonDocsText) -> None:
    print("| size | layers / width / heads | parameters | train tokens/s | forward tokens/s |")
    print("|---|---|---|---|---|")
    for name in args.sizes:
        torch.manual_seed(0)
        model = build(name, data.vocab_size, args.block_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = iter(data.train_dataloader())
        rates = []
        for mode in ("train", "forward"):
            start, tokens = time.process_time(), 0
            for step in range(args.warmup_steps + args.steps):
                if step == args.warmup_steps:
                    start, tokens = time.process_time(), 0
                batch = next(batches)
                if mode == "train":
                    train_step(model, optimizer, batch)
                else:
                    with torch.no_grad():
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                tokens += int(batch["attention_mask"].sum())
            rates.append(tokens / (time.process_time() - start))
        shape = CANDIDATES[name]
        print(
            f"| {name} | {shape['n_layer']} / {shape['n_embd']} / {shape['n_head']} "
            f"| {count_parameters(model) / 1e6:.2f}M | {rates[0]:,.0f} | {rates[1]:,.0f} |",
            flush=True,
        )


def train(args: argparse.Namespace, data: PythonDocsText) -> None:
    torch.manual_seed(args.seed)
    model = build(args.size, data.vocab_size, args.block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, total_iters=args.warmup_steps)
    checkpoints = sorted(args.minutes)
    cpu, wall_start, steps, tokens = 0.0, time.time(), 0, 0
    epoch_tokens = int(data.datasets["train"].attention_mask.sum())
    print(f"{args.size} seed {args.seed}: {count_parameters(model) / 1e6:.2f}M parameters", flush=True)
    print("| size | seed | CPU min | steps | tokens | epochs | last loss | val ppl | tokens/s | wall min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    while checkpoints:
        for batch in data.train_dataloader():
            start = time.process_time()
            loss = train_step(model, optimizer, batch)
            warmup.step()
            cpu += time.process_time() - start
            steps += 1
            tokens += int(batch["attention_mask"].sum())
            if cpu >= 60 * checkpoints[0]:
                ppl = perplexity(model, data)
                print(
                    f"| {args.size} | {args.seed} | {checkpoints.pop(0):g} | {steps} | {tokens / 1e6:.2f}M "
                    f"| {tokens / epoch_tokens:.1f} | {loss:.3f} | {ppl:.2f} | {tokens / cpu:,.0f} "
                    f"| {(time.time() - wall_start) / 60:.1f} |",
                    flush=True,
                )
                if not checkpoints:
                    break


#: the learning-rate schedules of ``schedules``: (optimizer, steps, warm-up steps) -> LRScheduler;
#: "cosine" is the module's default (CosineToZeroLR: no warm-up, a half cosine to 0 at the last step)
SCHEDULES = {
    "warmup-constant": lambda opt, steps, warmup: torch.optim.lr_scheduler.LinearLR(
        opt, 0.01, 1.0, total_iters=warmup
    ),
    "constant": lambda opt, steps, warmup: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0),
    "cosine": lambda opt, steps, warmup: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (1 + math.cos(math.pi * min(1.0, t / steps))) / 2
    ),
}


def module_losses(
    model: torch.nn.Module, batches: list, schedule: str, args: argparse.Namespace
) -> list[float]:
    """Training losses of ``CausalLMDistillationModule`` (no teacher) on ``batches``, one step each."""
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    module = CausalLMDistillationModule(
        model,
        losses=[TokenCrossEntropyTerm("ce")],
        optimizer=functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.01),
        lr_scheduler=functools.partial(SCHEDULES[schedule], steps=len(batches), warmup=args.warmup_steps),
        lr_scheduler_interval="step",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[Record()],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return losses


def schedules(args: argparse.Namespace, data: PythonDocsText) -> None:
    torch.manual_seed(args.seed)
    start = build(args.size, data.vocab_size, args.block_size)
    loader = torch.utils.data.DataLoader(
        data.datasets["train"],
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches: list = []
    while len(batches) < args.steps:
        batches += [batch for batch, _ in zip(loader, range(args.steps - len(batches)), strict=False)]
    shown = sorted({0, args.steps // 4, args.steps // 2, args.steps - 1})
    print(f"| schedule | loop | train loss at steps {', '.join(map(str, shown))} | val ppl | test ppl |")
    print("|---|---|---|---|---|")
    for schedule in args.schedules:
        for loop in args.loops:
            model = copy.deepcopy(start)
            if loop == "plain":
                optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
                scheduler = SCHEDULES[schedule](optimizer, args.steps, args.warmup_steps)
                losses = []
                for batch in batches:
                    losses.append(train_step(model, optimizer, batch))
                    scheduler.step()
            else:
                losses = module_losses(model, batches, schedule, args)
            print(
                f"| {schedule} | {loop} | {' / '.join(f'{losses[i]:.4f}' for i in shown)} "
                f"| {perplexity(model, data):.2f} | {perplexity(model, data, 'test'):.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["throughput", "train", "schedules"])
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--loops", nargs="+", choices=["plain", "module"], default=["plain", "module"])
    parser.add_argument("--sizes", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--size", default="teacher")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per size (throughput, schedules)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = PythonDocsText(block_size=args.block_size, batch_size=args.batch_size, cache_dir=args.cache_dir)
    data.setup("fit")
    if args.mode == "throughput":
        print(
            describe_corpus(data.documents),
            f"vocabulary {data.vocab_size}, train blocks",
            len(data.datasets["train"]),
        )
        args.warmup_steps = 3
        throughput(args, data)
    elif args.mode == "schedules":
        schedules(args, data)
    else:
        train(args, data)


if __name__ == "__main__":
    main()
