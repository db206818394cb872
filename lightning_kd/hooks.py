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
    positional input (``capture="input"``, a forward pre-hook). Which call's, for a layer that
    runs more than once in one forward of the model (a shared block), is set by ``keep``:

    - ``"once"`` (default): the layer must run once per forward; a second call is a
      ``RuntimeError`` naming the layer and its number of calls (a feature paired from one call
      of a shared block would silently be the last call's);
    - ``"last"``: the latest call's, knowingly;
    - ``"all"``: every call's, in order (a list).

    Calls are counted from the start of each forward of ``model`` (a forward pre-hook; with
    :meth:`on`, the model the paths are in) and checked at its end, or, without a model, counted
    since the last :meth:`clear`. Counting is Python bookkeeping: no device synchronisation. The
    ``captured`` dict is one object for the hooks' lifetime: :meth:`clear` empties it in place.

    Use it around one forward (``with LayerHooks.on(model, ["layer3"]) as hooks: model(x)``) or
    hold it with :meth:`attach` / :meth:`detach`.

    Args:
        layers: the modules to hook, by key (a dotted path, or any hashable name).
        capture: ``"output"`` or ``"input"``.
        keep: ``"once"``, ``"last"`` or ``"all"``.
        model: the model whose forward delimits "one forward" for ``keep="once"``.
        role: how messages name the model (``"student"``, ``"teacher"``).
    """

    def __init__(
        self,
        layers: Mapping[Hashable, nn.Module],
        capture: Literal["output", "input"] = "output",
        keep: Literal["once", "last", "all"] = "once",
        model: nn.Module | None = None,
        role: str = "model",
    ) -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}.")
        if keep not in ("once", "last", "all"):
            raise ValueError(f"keep must be 'once', 'last' or 'all', got {keep!r}.")
        self.layers = dict(layers)
        self.capture = capture
        self.keep = keep
        self.model = uncompiled(model) if model is not None else None
        self.role = role
        self.captured: dict[Hashable, Any] = {}
        self._calls: dict[Hashable, int] = {}
        self._handles: list[RemovableHandle] = []

    @classmethod
    def on(cls, model: nn.Module, paths: Iterable[str], role: str = "model", **options: Any) -> LayerHooks:
        """Hooks on the layers of ``model`` at dotted ``paths`` (checked by :func:`find_layer`)."""
        layers = {path: find_layer(model, path, role) for path in dict.fromkeys(paths)}
        return cls(layers, model=model, role=role, **options)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> LayerHooks:
        """Register the hooks (again, if they already are)."""
        self.detach()
        if self.keep == "once" and self.model is not None:
            self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._calls.clear()))
            self._handles.append(self.model.register_forward_hook(self._check_calls))
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
        """Drop what the hooks captured and their call counts (the hooks stay)."""
        self.captured.clear()
        self._calls.clear()

    def _store(self, key: Hashable, pick: Callable[..., Any]) -> Callable[..., None]:
        captured, calls = self.captured, self._calls
        keep_all = self.keep == "all"
        check_each_call = self.keep == "once" and self.model is None

        def hook(module: nn.Module, *seen: Any) -> None:
            value = pick(*seen)
            if keep_all:
                captured.setdefault(key, []).append(value)
                return
            calls[key] = calls.get(key, 0) + 1
            if check_each_call and calls[key] > 1:
                raise self._repeated_error({key: calls[key]})
            captured[key] = value

        return hook

    def _check_calls(self, *_: Any) -> None:
        """At the end of the model's forward: every ``keep="once"`` layer ran at most once."""
        repeated = {key: count for key, count in self._calls.items() if count > 1}
        if repeated:
            raise self._repeated_error(repeated)

    def _repeated_error(self, repeated: Mapping[Hashable, int]) -> RuntimeError:
        calls = ", ".join(f"{key!r} ran {count} times" for key, count in repeated.items())
        return RuntimeError(
            f"Hooked {self.role} layers run more than once in one forward: {calls}. A hook keeps one "
            f"{self.capture} per layer and forward, so only the last call's would be captured and paired, "
            "silently. Hook a layer that runs once per forward instead (a child or wrapper used by one "
            "call of the shared block), or, with LayerHooks, pass keep='last' (the last call's, knowingly) "
            "or keep='all' (every call's, in order)."
        )

    def __enter__(self) -> LayerHooks:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self._remove_handles()  # what was captured stays readable after the block

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
