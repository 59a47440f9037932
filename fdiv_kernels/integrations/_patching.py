"""What every host module shares: importing the host lazily, and rebinding names with an undo."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_MISSING = object()


def require(module: str, pip_name: str) -> ModuleType:
    """Import a host module, or say which pip package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this fdiv_kernels integration but could not be imported "
            f"({e}); install it with `pip install {pip_name}`"
        ) from e


class Patch:
    """The rebindings one ``apply_fk_to_*`` call made; ``undo()`` restores them (newest first).

    Also a context manager: ``with apply_fk_to_trl(): ...`` undoes on exit.
    """

    def __init__(self) -> None:
        self._done: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        """Rebind ``owner.name`` unless it already is ``value`` (so a second apply is a no-op)."""
        old = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(
            owner, name, _MISSING)
        if old is value or getattr(old, "__func__", _MISSING) is getattr(value, "__func__", None):
            return
        self._done.append((owner, name, old))
        setattr(owner, name, value)

    @property
    def targets(self) -> list[str]:
        """``module.name`` (or ``Class.name``) of each rebinding, in the order made."""
        return [f"{getattr(o, '__module__', '') + '.' if isinstance(o, type) else ''}"
                f"{getattr(o, '__qualname__', getattr(o, '__name__', o))}.{n}"
                for o, n, _ in self._done]

    def undo(self) -> None:
        for owner, name, old in reversed(self._done):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._done.clear()

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"Patch({self.targets})"
