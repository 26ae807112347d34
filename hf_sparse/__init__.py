"""hf_sparse: train sparse neural networks inside the Hugging Face stack.

The public names are imported on first use, so ``import hf_sparse`` (and ``hf-sparse --help``)
does not pay for torch, transformers and timm. hf_sparse's own models register with the
transformers Auto classes when ``hf_sparse.models`` is imported: by every hf_sparse call that
builds or loads a model, and as soon as the user has imported both libraries, in either order (a
post-import hook on ``transformers`` and on ``transformers.pipelines``), so ``pipeline(...)`` and
the Auto classes find them.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from ._post_import import when_imported

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Recipe": ".config.recipe",
    "RecipeError": ".config.recipe",
    "SparseTrainer": ".training.trainer",
    "Sparsifier": ".training.sparsifier",
    "SparsityConfig": ".config.recipe",
    "load_recipe": ".config.recipe",
    "load_sparse": ".checkpoint.save_and_load",
    "push_to_hub": ".checkpoint.hub",
    "save_sparse_checkpoint": ".checkpoint.save_and_load",
    "stream": ".checkpoint.streaming",
    "to_sparse_runtime": ".runtime.convert",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .checkpoint.hub import push_to_hub  # noqa: F401
    from .checkpoint.save_and_load import load_sparse, save_sparse_checkpoint  # noqa: F401
    from .checkpoint.streaming import stream  # noqa: F401
    from .config.recipe import Recipe, RecipeError, SparsityConfig, load_recipe  # noqa: F401
    from .runtime.convert import to_sparse_runtime  # noqa: F401
    from .training.sparsifier import Sparsifier  # noqa: F401
    from .training.trainer import SparseTrainer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        if "transformers" in sys.modules:  # that import brought transformers in: register the models now
            _register_models()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_models(_transformers: Any = None) -> None:
    """Import ``hf_sparse.models`` (registration), unless one of hf_sparse's own modules is half-imported:
    it brought transformers in, would be re-entered, and imports the models itself where it needs them."""
    if not any(getattr(getattr(m, "__spec__", None), "_initializing", False)
               for name, m in list(sys.modules.items()) if name.startswith(__name__ + ".")):
        importlib.import_module(".models", __name__)


# now if transformers is loaded already (registering then costs little), else right after its import
when_imported("transformers", _register_models)
when_imported("transformers.pipelines", _register_models)
