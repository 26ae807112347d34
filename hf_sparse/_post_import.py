"""Run a callback once a module is imported, whenever that happens (the post-import hook of PEP 369).

``import hf_sparse`` must stay cheap (no torch, no transformers), yet hf_sparse's models have to be
registered with transformers' Auto classes before ``pipeline(...)`` or ``from_pretrained`` looks
them up, in whichever order the user imports the two libraries. :func:`when_imported` calls back
at once for a module already imported, and otherwise right after the module's own code has run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module so the callbacks run after it."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            for callback in self.callbacks.pop(fullname, []):
                _call(callback, module)

        loader.exec_module = exec_module  # type: ignore[method-assign]  (this loader serves this module only)
        return spec


def _call(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as e:  # never break the user's import of another library
        warnings.warn(f"hf_sparse: setting up after `import {module.__name__}` failed: {e}", stacklevel=3)


_FINDER = _AfterImportFinder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` now if ``name`` is imported, else once its import has run."""
    module = sys.modules.get(name)
    if module is not None:
        _call(callback, module)
        return
    _FINDER.callbacks.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
