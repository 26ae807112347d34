"""hf_sparse: train sparse neural networks inside the Hugging Face stack."""

__version__ = "0.1.0"

from .engine import Sparsifier  # noqa: E402
from .recipe import Recipe, RecipeError, SparsityConfig, load_recipe  # noqa: E402
from .trainer import SparseTrainer  # noqa: E402

from . import models  # noqa: E402,F401  (registers hf_sparse's models with the Auto classes)

__all__ = ["Recipe", "RecipeError", "SparseTrainer", "Sparsifier", "SparsityConfig", "__version__", "load_recipe"]
