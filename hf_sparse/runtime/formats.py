"""A weight's sparse storage for the runtime kernels, and the choice between CSR, BSR and dense.

The choice reads only the zeros of the weight: for each block size that divides the matrix, the
stored entries BSR would hold (every entry of every block with a nonzero) are counted, and the
cost per stored entry of each kernel relative to a dense entry, measured on one thread (see
docs/runtime.md), turns entries into time. The cheapest of CSR, BSR b x b and the dense product wins; a weight whose
sparse estimate is not at least ``MIN_GAIN`` cheaper than dense stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: BSR block sizes tried (a 32x32-block mask is also a 16x16 one, at the same cost).
BLOCK_SIZES = (16, 8, 4)
#: Time per stored entry of each kernel relative to torch's dense product per entry, measured at
#: batch 1 on one thread in float32 on a 3072x1024 matrix at density 0.1 (1: CSR; b: BSR b x b).
RELATIVE_COST = {1: 3.0, 4: 1.2, 8: 1.0, 16: 1.0}
#: A sparse layer must be estimated at least this much faster than dense to be used.
MIN_GAIN = 1.2


@dataclass
class SparseWeight:
    """A 2-D weight as ``indptr``/``indices``/``data`` for :func:`hf_sparse.runtime.kernels.spmm`."""

    shape: tuple[int, int]
    block: int  # 1: CSR; b > 1: BSR with b x b blocks
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def format(self) -> str:
        return "csr" if self.block == 1 else f"bsr{self.block}x{self.block}"

    @property
    def stored(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes one product reads for the weight (values, column indices and row pointers)."""
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)


@dataclass
class FormatChoice:
    """What the runtime will do with one weight, and why."""

    format: str  # "csr", "bsrBxB" or "dense"
    block: int
    density: float
    estimated_speedup: float
    reason: str


def _block_nonzero(mask: np.ndarray, b: int) -> np.ndarray:
    rows, cols = mask.shape
    return mask.reshape(rows // b, b, cols // b, b).any(axis=(1, 3))


def choose_format(weight: torch.Tensor, max_density: float = 0.5) -> FormatChoice:
    """Pick CSR, BSR (block size from the zeros' structure) or dense for a 2-D float32 weight."""
    mask = (weight != 0).cpu().numpy()
    rows, cols = mask.shape
    nnz = int(mask.sum())
    density = nnz / max(mask.size, 1)
    dense_cost = float(mask.size)
    if density > max_density:
        return FormatChoice("dense", 0, density, 1.0, f"density {density:.3f} above the threshold {max_density:g}")
    costs = {1: nnz * RELATIVE_COST[1]}
    for b in BLOCK_SIZES:
        if rows % b == 0 and cols % b == 0:
            costs[b] = int(_block_nonzero(mask, b).sum()) * b * b * RELATIVE_COST[b]
    block = min(costs, key=lambda k: (costs[k], -k))
    gain = dense_cost / max(costs[block], 1e-9)
    name = "csr" if block == 1 else f"bsr{block}x{block}"
    if gain < MIN_GAIN:
        return FormatChoice("dense", 0, density, gain,
                            f"density {density:.3f}: best sparse kernel ({name}) estimated {gain:.2f}x dense, "
                            f"below the {MIN_GAIN:g}x worth switching for")
    return FormatChoice(name, block, density, gain, f"density {density:.3f}, {name} estimated {gain:.2f}x dense")


def to_sparse_weight(weight: torch.Tensor, block: int) -> SparseWeight:
    """Store a 2-D weight in CSR (``block == 1``) or BSR ``block x block`` (blocks transposed)."""
    w = weight.detach().to(torch.float32).cpu().numpy()
    rows, cols = w.shape
    b = block
    blocks = w.reshape(rows // b, b, cols // b, b).transpose(0, 2, 1, 3)  # [block row, block col, r, k]
    keep = np.abs(blocks).reshape(rows // b, cols // b, b * b).max(axis=2) != 0
    counts = keep.sum(axis=1)
    indptr = np.zeros(rows // b + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    block_row, block_col = np.nonzero(keep)
    # 16-bit column indices whenever they fit: less memory traffic per stored entry (measured faster)
    indices = block_col.astype(np.uint16 if cols // b <= np.iinfo(np.uint16).max else np.uint32)
    data = np.ascontiguousarray(blocks[block_row, block_col].transpose(0, 2, 1)).reshape(-1)  # each block as [k, r]
    return SparseWeight((rows, cols), b, indptr, indices, data.astype(np.float32))
