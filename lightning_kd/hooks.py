"""Find layers by dotted path and capture what they see with forward hooks (plain PyTorch).

Every place in the package that reads an intermediate layer goes through :class:`LayerHooks`:
the loss terms' :class:`~lightning_kd.callbacks.FeatureHooks`, BYOT's early-exit heads, the
CKA report, the data-free teacher taps and :class:`~lightning_kd.models.LayerEmbedding`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Literal

from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils.hooks import RemovableHandle

__all__ = ["LayerHooks", "find_layer", "first_tensor", "uncompiled"]


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile(model)`` wraps, or ``model`` itself when it is not compiled.

    The compiled wrapper runs the original module, so hooks on its submodules still fire; their
    paths are the original ones (``"layer3"``, not ``"_orig_mod.layer3"``).
    """
    return model._orig_mod if isinstance(model, OptimizedModule) else model


def find_layer(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """Return the submodule of ``model`` at dotted ``path`` (``"layer3.1.conv2"``).

    A model wrapped by ``torch.compile`` is searched by its original paths (see :func:`uncompiled`).

    Raises:
        ValueError: the path names no submodule; the message lists the closest names.
    """
    model = uncompiled(model)
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [name for name in modules if name]
    closest = difflib.get_close_matches(path, names, n=5, cutoff=0.3)
    top_level = [name for name in names if "." not in name]
    raise ValueError(
        f"Unknown {role} layer {path!r} in {type(model).__name__}. "
        f"Closest module names: {closest or 'none'}; top-level modules: {top_level}. "
        f"Use a dotted path from `{role}.named_modules()`, e.g. one of the nearest existing names above."
    )


def first_tensor(value: Any) -> Tensor:
    """The tensor of a hooked output: the output itself, or the first tensor of a tuple/list."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"A hooked layer returned {type(value).__name__}; expected a tensor or tuple of tensors.")


class LayerHooks:
    """Hooks on a set of layers; every call of a hooked layer stores what it saw under the layer's key.

    ``captured[key]`` holds the layer's output (``capture="output"``, a forward hook) or its first
    positional input (``capture="input"``, a forward pre-hook); the latest call's (``keep="last"``)
    or every call's in order (``keep="all"``, a list). The ``captured`` dict is one object for the
    hooks' lifetime: :meth:`clear` empties it in place.

    Use it around one forward (``with LayerHooks.on(model, ["layer3"]) as hooks: model(x)``) or
    hold it with :meth:`attach` / :meth:`detach`.

    Args:
        layers: the modules to hook, by key (a dotted path, or any hashable name).
        capture: ``"output"`` or ``"input"``.
        keep: ``"last"`` or ``"all"``.
    """

    def __init__(
        self,
        layers: Mapping[Hashable, nn.Module],
        capture: Literal["output", "input"] = "output",
        keep: Literal["last", "all"] = "last",
    ) -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}.")
        if keep not in ("last", "all"):
            raise ValueError(f"keep must be 'last' or 'all', got {keep!r}.")
        self.layers = dict(layers)
        self.capture = capture
        self.keep = keep
        self.captured: dict[Hashable, Any] = {}
        self._handles: list[RemovableHandle] = []

    @classmethod
    def on(cls, model: nn.Module, paths: Iterable[str], role: str = "model", **options: Any) -> LayerHooks:
        """Hooks on the layers of ``model`` at dotted ``paths`` (checked by :func:`find_layer`)."""
        return cls({path: find_layer(model, path, role) for path in dict.fromkeys(paths)}, **options)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> LayerHooks:
        """Register the hooks (again, if they already are)."""
        self.detach()
        for key, layer in self.layers.items():
            if self.capture == "output":
                handle = layer.register_forward_hook(self._store(key, lambda args, output: output))
            else:
                handle = layer.register_forward_pre_hook(self._store(key, lambda args: first_tensor(args)))
            self._handles.append(handle)
        return self

    def detach(self) -> None:
        """Remove every hook and drop what they captured."""
        self._remove_handles()
        self.clear()

    def clear(self) -> None:
        """Drop what the hooks captured (the hooks stay)."""
        self.captured.clear()

    def _store(self, key: Hashable, pick: Callable[..., Any]) -> Callable[..., None]:
        captured = self.captured
        keep_all = self.keep == "all"

        def hook(module: nn.Module, *seen: Any) -> None:
            value = pick(*seen)
            if keep_all:
                captured.setdefault(key, []).append(value)
            else:
                captured[key] = value

        return hook

    def __enter__(self) -> LayerHooks:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self._remove_handles()  # what was captured stays readable after the block

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
