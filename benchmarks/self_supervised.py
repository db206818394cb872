"""Self-supervised distillation on MNIST-1D: k-NN and linear-probe accuracy of the student's embeddings.

Per seed: a ConvNet1d teacher is trained with labels; its 128-d penultimate embedding
(:class:`~lightning_kd.models.layer_embedding.LayerEmbedding`) is then distilled, WITHOUT labels
(:class:`~lightning_kd.data.unlabelled.UnlabelledDataModule`), into an MLP (trunk 256-256 +
linear projection to 128) with cosine, MSE, or SEED (Fang et al., ICLR 2021). Rows: the
teacher's embeddings, the randomly initialised student, and the three distilled students;
columns: weighted k-NN accuracy on the test split (k=20, T=0.07, training split as reference;
Wu et al., CVPR 2018), linear-probe accuracy (logistic regression on frozen embeddings), and the
mean cosine between the student's and the teacher's test embeddings.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/self_supervised.py            # 3 seeds
    python benchmarks/self_supervised.py --seeds 0 --epochs 2 --output /tmp/x.md  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from seeds import mean_std, quiet_trainer, write_table
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule
from lightning_kd.callbacks.report import embed_dataset, linear_probe_accuracy, weighted_knn_scores
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.data.unlabelled import UnlabelledDataModule
from lightning_kd.losses import EmbeddingMatchTerm, SEEDTerm
from lightning_kd.models import MLP, ConvNet1d
from lightning_kd.models.layer_embedding import LayerEmbedding
from lightning_kd.paradigms.embedding import EmbeddingDistillationModule

RESULTS = Path(__file__).resolve().parent / "results" / "self_supervised.md"
ROWS = ["teacher", "random student", "cosine", "mse", "seed", "seed tau_T=1e-4"]


def evaluate(model: torch.nn.Module, teacher: torch.nn.Module, data: MNIST1DDataModule) -> tuple[float, ...]:
    """(k-NN accuracy, linear-probe accuracy, mean cosine to the teacher) on the test split."""
    device = torch.device("cpu")
    reference_loader = DataLoader(data.datasets["train"], batch_size=512)
    reference, reference_labels = embed_dataset(model, reference_loader, device)
    test_loader = data.test_dataloader()
    test, labels = embed_dataset(model, test_loader, device)
    teacher_test, _ = embed_dataset(teacher, test_loader, device)
    scores = weighted_knn_scores(test, reference, reference_labels, 10, k=20, temperature=0.07)
    knn = (scores.argmax(dim=1) == labels).float().mean().item()
    linear = linear_probe_accuracy(reference, reference_labels, test, labels, 10, steps=100).item()
    cosine = F.cosine_similarity(test, teacher_test, dim=1).mean().item()
    return knn, linear, cosine


def run_seed(seed: int, teacher_epochs: int, epochs: int, train_samples: int) -> dict[str, tuple[float, ...]]:
    data = MNIST1DDataModule(train_samples=train_samples, val_samples=500, test_samples=2500, batch_size=128)
    data.setup("fit")
    pl.seed_everything(seed, verbose=False)
    classifier = ConvNet1d(num_classes=10)
    quiet_trainer(teacher_epochs).fit(DistillationModule(classifier), data)
    teacher = LayerEmbedding(classifier, "embedding").eval()
    pl.seed_everything(seed, verbose=False)
    initial_student = MLP(40, num_classes=128, hidden=(256, 256))
    results = {
        "teacher": evaluate(teacher, teacher, data),
        "random student": evaluate(initial_student, teacher, data),
    }
    terms = {
        "cosine": EmbeddingMatchTerm("cosine", kind="cosine"),
        "mse": EmbeddingMatchTerm("mse", kind="mse"),
        "seed": SEEDTerm("seed", queue_size=4096, student_temperature=0.2, teacher_temperature=0.01),
        "seed tau_T=1e-4": SEEDTerm(
            "seed", queue_size=4096, student_temperature=0.2, teacher_temperature=1e-4
        ),
    }
    for name, term in terms.items():
        pl.seed_everything(seed, verbose=False)
        student = copy.deepcopy(initial_student)
        module = EmbeddingDistillationModule(student, copy.deepcopy(teacher), losses=[term], input_key=None)
        start = time.perf_counter()
        quiet_trainer(epochs).fit(module, UnlabelledDataModule(data))
        results[name] = (*evaluate(student, teacher, data), (time.perf_counter() - start) / epochs)
        print(
            f"seed {seed} {name:<16} knn {100 * results[name][0]:6.2f} linear {100 * results[name][1]:6.2f} "
            f"cos {results[name][2]:.3f}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    runs = [run_seed(seed, args.teacher_epochs, args.epochs, args.train_samples) for seed in args.seeds]
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "# Self-supervised distillation on MNIST-1D (no labels in distillation)",
        "",
        f"`benchmarks/self_supervised.py`: seeds {args.seeds}, {args.train_samples - 500} training samples "
        "(the k-NN reference set and the distillation data, labels hidden), 2500 test samples. "
        f"Teacher: ConvNet1d trained {args.teacher_epochs} epochs with labels; its 128-d penultimate "
        "embedding is the target. "
        "Student: MLP 40-256-256 + linear projection to 128, distilled "
        f"{args.epochs} epochs (Adam 1e-3, cosine decay, batch 128) from the same initialisation per seed. "
        "k-NN: weighted vote of the 20 most cosine-similar training embeddings, weights exp(cos/0.07) "
        "(Wu et al., CVPR 2018). Linear probe: logistic regression (100 L-BFGS iterations) on the frozen "
        "embeddings. Cosine: mean cosine between student and teacher test embeddings. SEED: queue 4096, "
        "tau_S 0.2, tau_T 0.01 (the default here) or 1e-4 (the authors' code default)."
        f" Mean ± std over seeds; {minutes:.1f} min in total on this machine (CPU, "
        "OMP_NUM_THREADS=1).",
        "",
        "| embeddings | k-NN acc (%) | linear probe (%) | cosine to teacher |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        knn, linear, cosine = ([run[row][i] for run in runs] for i in range(3))
        spread = statistics.stdev(cosine) if len(cosine) > 1 else 0.0
        lines.append(
            f"| {row} | {mean_std(knn)} | {mean_std(linear)} | {statistics.mean(cosine):.3f} ± {spread:.3f} |"
        )
    write_table(lines, args.output)


if __name__ == "__main__":
    main()
