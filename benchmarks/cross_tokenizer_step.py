"""Time per training step of ULD with a teacher of another tokenizer vs same-tokenizer KD; aligned fraction.

The recipes' sizes (python_docs/kd.yaml and python_docs/uld.yaml): a 0.37M GPT-2 student of the
4,096-token BPE, a 2.59M teacher of the same BPE (KD) or of the 2,048-token BPE (ULD), batches of
32 x 128 tokens, untrained weights (the cost does not depend on them). A step is teacher forward,
student forward, loss, backward and an AdamW step, timed in CPU seconds (``time.process_time``);
the collator's cost per batch (tokenizing twice and pairing) is timed apart. One thread:

    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lightning_kd import CausalLMDistillationModule, CrossTokenizerDistillationModule
from lightning_kd.data import PythonDocsCrossTokenizerText, PythonDocsText
from lightning_kd.models import tiny_gpt2


def step_seconds(module: CausalLMDistillationModule, batch: dict, steps: int) -> float:
    """Median CPU seconds of one optimizer step on ``batch`` (after one warm-up step)."""
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    module.train()
    times = []
    for _ in range(steps + 1):
        start = time.process_time()
        total, _ = module.compute_loss(module.step_outputs(batch))
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.process_time() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    """Print the two step times, the collator's time per batch and the aligned fraction."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    same = PythonDocsText(block_size=128, vocab_size=4096, batch_size=32)
    same.setup()
    cross = PythonDocsCrossTokenizerText(
        vocab_size=4096, teacher_vocab_size=2048, block_size=128, batch_size=32
    )
    cross.setup()
    kd_batch = next(iter(same.train_dataloader()))
    pieces = [cross.datasets["train"][i] for i in range(32)]
    start = time.process_time()
    uld_batch = cross.collate_fn(pieces)
    collate = time.process_time() - start
    student = tiny_gpt2(4096, "student", n_positions=128)
    kd = CausalLMDistillationModule(student, tiny_gpt2(4096, "teacher", n_positions=128))
    uld = CrossTokenizerDistillationModule(
        tiny_gpt2(4096, "student", n_positions=128), tiny_gpt2(2048, "teacher", n_positions=128)
    )
    kd_time, uld_time = step_seconds(kd, kd_batch, args.steps), step_seconds(uld, uld_batch, args.steps)
    aligned = counted = 0
    for batch in cross.val_dataloader():
        mask = batch["labels"][:, 1:] != -100
        counted += int(mask.sum())
        aligned += int((mask & (batch["teacher_positions"] >= 0)).sum())
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"KD, same tokenizer (CE + forward KL): {kd_time:.3f} CPU s/step")
    print(
        f"ULD, teacher of the 2,048-token BPE (CE + ULD): {uld_time:.3f} CPU s/step "
        f"({uld_time / kd_time:.2f}x)"
    )
    print(f"collator (two tokenizations + pairing) per batch of 32: {collate:.3f} CPU s")
    print(f"validation: {aligned}/{counted} = {aligned / counted:.3f} of the student's tokens paired")
    print(
        f"tokens per piece: {uld_batch['attention_mask'].sum(1).float().mean():.1f} student, "
        f"{uld_batch['teacher_attention_mask'].sum(1).float().mean():.1f} teacher"
    )


if __name__ == "__main__":
    main()
