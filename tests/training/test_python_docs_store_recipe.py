"""python_docs/kd_store: kd.yaml's student trained from a top-k store that ``cache-tokens`` filled.

Tiny overrides as in test_python_docs_recipes.py; ``cache-tokens`` reads a copy of kd.yaml with the
same overrides written into it (the command takes a recipe, not overrides).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main
from lightning_kd.data.text import PythonDocsText
from lightning_kd.models import tiny_gpt2
from tests.training.test_python_docs_recipes import CONFIGS, JSON_PACKAGE, STUDENT, small

DATA = {
    "stdlib": JSON_PACKAGE,
    "max_documents": 12,  # 237 training blocks: the store covers the whole training split
    "vocab_size": 512,
    "block_size": 32,
    "batch_size": 4,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
}


def recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def test_kd_store_is_kd_with_the_teacher_read_from_the_store() -> None:
    kd, store = recipe("kd"), recipe("kd_store")
    for part in (kd, store):  # what differs by design: the run's name, the teacher, the index
        part["trainer"]["logger"]["init_args"].pop("name")
        part["trainer"]["callbacks"][0]["init_args"].pop("filename")
        for key in ("teacher", "teacher_checkpoint", "teacher_mode", "store", "tail"):
            part["model"]["init_args"].pop(key, None)
        part["model"].pop("class_path")
        part["model"]["init_args"]["losses"][1]["init_args"].pop("path", None)
    assert store["data"]["init_args"].pop("return_index") is True
    assert store == kd


def test_kd_store_without_a_store_names_the_command_that_fills_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"No top-k token store in runs/python_docs/store-k128 .*cache-tokens"
    ):
        main(["fit", "--config", str(CONFIGS / "kd_store.yaml")])


def test_kd_store_recipe_trains_from_a_store_filled_by_cache_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    kd = recipe("kd")
    teacher_config = kd["model"]["init_args"]["teacher"]["init_args"]["config"]["init_args"]
    teacher_config.update(vocab_size=512, n_positions=32, n_layer=1, n_embd=32, n_head=2)
    kd["data"]["init_args"].update(DATA, cache_dir=str(cache))
    (tmp_path / "kd_small.yaml").write_text(yaml.safe_dump(kd))
    torch.manual_seed(0)
    teacher = tiny_gpt2(512, "student", n_positions=32)  # any weights of the recipe's teacher shape
    teacher = type(teacher)(type(teacher.config)(**{**teacher.config.to_dict(), **teacher_config}))
    torch.save({f"student.{k}": v for k, v in teacher.state_dict().items()}, tmp_path / "teacher.ckpt")
    store = str(tmp_path / "runs/python_docs/store-k16")
    main(["cache-tokens", "--config", str(tmp_path / "kd_small.yaml"), "--directory", store, "--k", "16",
          "--teacher-checkpoint", str(tmp_path / "teacher.ckpt"), "--device", "cpu"])  # fmt: skip
    student = [
        *STUDENT,
        "--model.init_args.student.init_args.config.init_args.vocab_size=512",
        "--model.init_args.student.init_args.config.init_args.n_positions=32",
    ]
    main(["fit", "--config", str(CONFIGS / "kd_store.yaml"), *small(cache),
          "--data.init_args.max_documents=12", *student, f"--model.init_args.store={store}"])  # fmt: skip
    header = (tmp_path / "runs/python_docs/kd_store/version_0/metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss_ce", "train/loss_kd", "val/perplexity"):
        assert column in header, column
    assert "val/teacher_perplexity" not in header
    data = PythonDocsText(**DATA, cache_dir=str(cache), return_index=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    blocks = data.datasets["train"]
    for row, index in enumerate(batch["index"].tolist()):  # each block comes with its position
        assert torch.equal(batch["input_ids"][row], blocks[index]["input_ids"])
