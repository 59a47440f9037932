"""What every host module shares: importing the host lazily, and rebinding names with an undo."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Iterator
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


def loaded_modules() -> Iterator[ModuleType]:
    """Every loaded module but fdiv_kernels' own (whose references to a host are deliberate)."""
    for name, mod in list(sys.modules.items()):
        if mod is not None and name != "fdiv_kernels" and not name.startswith("fdiv_kernels."):
            yield mod


class Patch:
    """The rebindings one ``apply_fk_to_*`` call made; ``undo()`` restores them (newest first).

    Also a context manager: ``with apply_fk_to_trl(): ...`` undoes on exit.
    """

    def __init__(self) -> None:
        self._done: list[tuple[Any, str, Any]] = []
        self._swept: list[tuple[Any, Any, set[str], set[tuple[int, str]]]] = []
        self._hooks: list[_AfterImport] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        """Rebind ``owner.name`` unless it already is ``value`` (so a second apply is a no-op)."""
        old = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(
            owner, name, _MISSING)
        if old is value or getattr(old, "__func__", _MISSING) is getattr(value, "__func__", None):
            return
        self._done.append((owner, name, old))
        setattr(owner, name, value)

    def set_everywhere(self, original: Any, value: Any) -> None:
        """Rebind every module-level name (any name) bound to ``original`` in every loaded module,
        the user's own scripts included (``from host import f`` before the patch).

        ``undo()`` then also restores the names bound to ``value`` in modules imported while the
        patch was active (they copied the patched name from the host's module), under the names
        the host's object had; names that held ``value`` before the patch (code importing the
        fdiv_kernels object itself) are left alone.
        """
        before = len(self._done)
        names, kept = set(), set()
        for mod in loaded_modules():
            for name, bound in list(mod.__dict__.items()):
                if bound is original:
                    names.add(name)
                    self.set(mod, name, value)
                elif bound is value:
                    kept.add((id(mod), name))
        if len(self._done) > before:
            self._swept.append((original, value, names, kept))

    def after_import(self, module: str, callback: Callable[[ModuleType], None]) -> None:
        """``callback(module)`` now if ``module`` is loaded, else when it is first imported (the
        host module is not imported for a swap the user may never reach); ``undo()`` drops the
        hook."""
        if module in sys.modules:
            callback(sys.modules[module])
            return
        hook = _AfterImport(module, callback)
        sys.meta_path.insert(0, hook)
        self._hooks.append(hook)

    @property
    def targets(self) -> list[str]:
        """``module.name`` (or ``Class.name``) of each rebinding, in the order made."""
        return [f"{getattr(o, '__module__', '') + '.' if isinstance(o, type) else ''}"
                f"{getattr(o, '__qualname__', getattr(o, '__name__', o))}.{n}"
                for o, n, _ in self._done]

    def undo(self) -> None:
        for hook in self._hooks:
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
        self._hooks.clear()
        for owner, name, old in reversed(self._done):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._done.clear()
        for mod in loaded_modules():
            for name, bound in list(mod.__dict__.items()):
                # A host may hold copies of one function in several modules (TRL's SDPO and SDFT
                # loss utilities), all swapped to one value: restore the copy from the nearest
                # package.
                found = [o for o, v, names, kept in self._swept
                         if bound is v and name in names and (id(mod), name) not in kept]
                if found:
                    setattr(mod, name, max(found, key=lambda o: _shared_prefix(
                        getattr(o, "__module__", "") or "", getattr(mod, "__name__", "") or "")))
        self._swept.clear()

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"Patch({self.targets})"


def _shared_prefix(a: str, b: str) -> int:
    """How many leading dotted parts two module names share."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: finds ``name`` through the other finders and runs ``callback`` on
    the module right after it has executed."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)              # one shot; also keeps the lookup below from us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RunAfter(spec.loader, self.callback)
        return spec


class _RunAfter(importlib.abc.Loader):
    """The host's loader, then the callback; everything else is the host loader's."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
