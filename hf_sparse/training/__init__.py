"""The training half: recipes, the Sparsifier that drives a method, SparseTrainer and the run."""
