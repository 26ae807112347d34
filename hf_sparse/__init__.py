"""hf_sparse: train sparse neural networks inside the Hugging Face stack."""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers hf_sparse's models with the Auto classes)
from .checkpoint.hub import push_to_hub  # noqa: E402
from .checkpoint.save_and_load import load_sparse, save_sparse_checkpoint  # noqa: E402
from .training.recipe import Recipe, RecipeError, SparsityConfig, load_recipe  # noqa: E402
from .training.sparsifier import Sparsifier  # noqa: E402
from .training.trainer import SparseTrainer  # noqa: E402

__all__ = [
    "Recipe",
    "RecipeError",
    "SparseTrainer",
    "Sparsifier",
    "SparsityConfig",
    "__version__",
    "load_recipe",
    "load_sparse",
    "push_to_hub",
    "save_sparse_checkpoint",
]
