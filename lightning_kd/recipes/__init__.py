"""The recipes that ship with the package: YAML files for ``lightning-kd``, found by name.

``lightning-kd fit --config mnist1d/kd`` reads ``lightning_kd/recipes/mnist1d/kd.yaml`` from any
folder (a path that exists is read as a path first); ``lightning-kd recipes`` lists them and
``lightning-kd recipes copy mnist1d/kd my_kd.yaml`` copies one out to edit.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

__all__ = ["RECIPES_DIR", "copy_recipe", "find_recipe", "recipe_names", "resolve_config"]

#: the folder of the shipped recipes
RECIPES_DIR = Path(__file__).resolve().parent


def recipe_names() -> list[str]:
    """Every shipped recipe by name (its path under :data:`RECIPES_DIR` without ``.yaml``), sorted."""
    return sorted(
        path.relative_to(RECIPES_DIR).with_suffix("").as_posix() for path in RECIPES_DIR.rglob("*.yaml")
    )


def find_recipe(name: str) -> Path:
    """The file of the shipped recipe ``name`` (``"mnist1d/kd"``; ``.yaml`` may be given).

    Raises:
        FileNotFoundError: no recipe has that name; the message lists the closest names.
    """
    relative = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = (RECIPES_DIR / relative).resolve()
    if path.is_file() and RECIPES_DIR in path.parents:
        return path
    names = recipe_names()
    closest = difflib.get_close_matches(name.removesuffix(".yaml"), names, n=5, cutoff=0.4)
    raise FileNotFoundError(
        f"No file {name!r} and no shipped recipe of that name. Closest recipes: {closest or 'none'}; "
        "`lightning-kd recipes` lists them all."
    )


def resolve_config(value: str) -> str:
    """``value`` of a ``--config`` option: a file that exists as given, else a shipped recipe's path.

    Inline YAML (a value with ``:`` or a newline, which jsonargparse also accepts) is left alone.
    """
    if Path(value).expanduser().is_file() or ":" in value or "\n" in value:
        return value
    return str(find_recipe(value))


def copy_recipe(name: str, destination: str | Path | None = None) -> Path:
    """Copy the shipped recipe ``name`` to ``destination`` (default: ``<last part of name>.yaml`` here).

    Raises:
        FileExistsError: the destination exists (nothing is overwritten).
    """
    source = find_recipe(name)
    target = Path(destination) if destination is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise FileExistsError(f"{str(target)!r} exists; give another destination (nothing was overwritten).")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
