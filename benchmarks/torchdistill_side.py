"""The torchdistill side of ``benchmarks/torchdistill_peer.py``: Hinton KD with torchdistill's own box.

Runs in a separate virtual environment that has torchdistill (``benchmarks/requirements-torchdistill.txt``)
and not lightning_kd, so it is started by the peer benchmark, never imported by it:

    /tmp/tdenv/bin/python benchmarks/torchdistill_side.py --bundle run/seed0.pt --out run/seed0_td.json

The bundle (written by the peer benchmark) holds the MNIST-1D splits, the teacher's state dict
(ConvNet1d, trained by lightning_kd), the student's initial state dict (MLP) and the budget.
Training uses torchdistill's ``DistillationBox`` (``get_distillation_box``) with its mid-level
``KDLoss`` (Hinton et al., 2015: ``alpha * CE + (1 - alpha) * T^2 * KL``, alpha 0.1, T 4), Adam and
a per-step ``CosineAnnealingLR``, in the loop of torchdistill's image-classification example:
``pre_epoch_process`` -> per batch ``forward_process`` + ``post_forward_process`` ->
``post_epoch_process``, with a validation pass after every epoch. Prints nothing but logs; writes a
JSON file with the test accuracy of the final student and the timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType

import torch
import torchdistill
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torchdistill.core.distillation import get_distillation_box

SMALL_MODELS = Path(__file__).resolve().parents[1] / "lightning_kd" / "models" / "small.py"


def small_models() -> ModuleType:
    """lightning_kd's ``MLP`` / ``ConvNet1d`` file, loaded alone (it needs torch only, not Lightning)."""
    spec = importlib.util.spec_from_file_location("lightning_kd_small_models", SMALL_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_config(
    epochs: int, steps: int, lr: float, batch_size: int, temperature: float, alpha: float
) -> dict:
    """torchdistill's training configuration (what its YAML ``train`` section holds), as a dict."""
    return {
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": batch_size, "num_workers": 0},
        },
        "val_data_loader": {
            "dataset_id": "val",
            "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
            "kwargs": {"batch_size": batch_size, "num_workers": 0},
        },
        # torchdistill 1.1.5 has no default forward process: without one it raises
        # "No forward process function `None` registered".
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "Adam", "kwargs": {"lr": lr}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": steps}, "scheduling_step": 1},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": temperature,
                                "alpha": alpha,
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``loader``."""
    model.eval()
    correct = total = 0
    for inputs, targets in loader:
        correct += (model(inputs).argmax(dim=1) == targets).sum().item()
        total += len(targets)
    return correct / total


def main(argv: list[str] | None = None) -> dict:
    """Train the bundle's student with torchdistill and write the results JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="file written by benchmarks/torchdistill_peer.py")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # as the lightning_kd side: one thread each
    bundle = torch.load(args.bundle, weights_only=True)
    config = bundle["config"]
    models = small_models()
    teacher = models.ConvNet1d(num_classes=10)
    teacher.load_state_dict(bundle["teacher"])
    teacher.eval()  # the box switches only the student to train mode: the frozen teacher keeps BN statistics
    student = models.MLP(in_features=40, num_classes=10, hidden=(256, 256))
    student.load_state_dict(bundle["student_init"])

    datasets = {split: TensorDataset(*bundle[split]) for split in ("train", "val", "test")}
    batch_size, epochs = config["batch_size"], config["epochs"]
    steps_per_epoch = -(-len(datasets["train"]) // batch_size)
    torch.manual_seed(config["seed"] + 1)  # the shuffling order of the training batches
    box = get_distillation_box(
        teacher,
        student,
        datasets,
        train_config(
            epochs,
            epochs * steps_per_epoch,
            config["lr"],
            batch_size,
            config["temperature"],
            config["ce_weight"],
        ),
        device=torch.device("cpu"),
        device_ids=None,
        distributed=False,
        lr_factor=1,
    )

    step_seconds = 0.0
    steps = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            step_started = time.perf_counter()
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            step_seconds += time.perf_counter() - step_started
            steps += 1
        val_accuracy = accuracy(box.student_model, box.val_data_loader)
        box.post_epoch_process(metrics=val_accuracy)
    fit_seconds = time.perf_counter() - started
    if teacher.training:
        raise RuntimeError("the teacher was switched to train mode during distillation")

    test_loader = DataLoader(datasets["test"], batch_size=batch_size)
    result = {
        "framework": "torchdistill",
        "version": torchdistill.__version__,
        "torch": torch.__version__,
        "seed": config["seed"],
        "epochs": epochs,
        "steps": steps,
        "test_accuracy": accuracy(box.student_model, test_loader),
        "val_accuracy": val_accuracy,
        "fit_seconds": fit_seconds,
        "step_seconds": step_seconds,
        "final_lr": box.optimizer.param_groups[0]["lr"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
