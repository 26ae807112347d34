"""Sparse inference runtime: run a pruned model's Linear/GRU/LSTM layers on CSR/BSR kernels (CPU)."""

from .convert import to_sparse_runtime
from .layers import SparseLinear, SparseRNN

__all__ = ["SparseLinear", "SparseRNN", "to_sparse_runtime"]
