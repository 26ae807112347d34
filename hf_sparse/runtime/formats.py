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
#: (Measured before the row-slab and the vector block-row kernels, which are 2-3x faster, so
#: conservative for BSR now: a layer near the break-even stays dense untimed; the calibration times
#: every candidate anyway.)
RELATIVE_COST = {1: 3.0, 4: 1.2, 8: 1.0, 16: 1.0}
#: A sparse layer must be estimated at least this much faster than dense to be used.
MIN_GAIN = 1.2


#: Value types the runtime stores a sparse weight in.
DTYPES = ("float32", "int8")
#: int8 scale granularities: one fp32 scale per stored block, or one per row of blocks (CSR: always per row).
SCALE_GRANULARITIES = ("block", "row")


@dataclass
class SparseWeight:
    """A 2-D weight as ``indptr``/``indices``/``data`` for :func:`hf_sparse.runtime.kernels.spmm`.

    int8 weights (``data.dtype == int8``) carry ``scale`` (float32): one per stored block for BSR (a
    block's value is ``data * scale[p]``), one per row for CSR; :func:`kernels.spmm` and :func:`kernels.rnn_direction` run them.
    """

    shape: tuple[int, int]
    block: int  # 1: CSR; b > 1: BSR with b x b blocks
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def dtype(self) -> str:
        return "int8" if self.data.dtype == np.int8 else "float32"

    @property
    def format(self) -> str:
        return "csr" if self.block == 1 else f"bsr{self.block}x{self.block}"

    @property
    def stored(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes one product reads for the weight (values, column indices and row pointers)."""
        scale = 0 if self.scale is None else self.scale.nbytes
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes + scale)

    def to_dense(self) -> np.ndarray:
        """The matrix as float32 (int8 values times their scales): what the kernels compute with."""
        rows, cols = self.shape
        b = self.block
        out = np.zeros((rows, cols), np.float32)
        for i in range(rows // b):
            p0, p1 = int(self.indptr[i]), int(self.indptr[i + 1])
            vals = self.data[p0 * b * b:p1 * b * b].astype(np.float32).reshape(p1 - p0, b, b)  # [q, k, r]
            if self.scale is not None:
                vals = vals * (self.scale[i] if b == 1 else self.scale[p0:p1][:, None, None])
            for q in range(p1 - p0):
                c = int(self.indices[p0 + q]) * b
                out[i * b:(i + 1) * b, c:c + b] = vals[q].T
        return out


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


def _int8(values: np.ndarray, peak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``values`` given each value's group peak ``|v|``: scale = peak / 127."""
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int8), scale


def to_sparse_weight(weight: torch.Tensor, block: int, dtype: str = "float32",
                     scale_per: str = "block") -> SparseWeight:
    """Store a 2-D weight in CSR (``block == 1``) or BSR ``block x block`` (each block stored transposed,
    column by column, so that a block column is one vector of the kernels).

    ``dtype="int8"`` stores the values as symmetric int8 with a float32 scale per stored block
    (``scale_per="block"``) or per row of blocks (``"row"``, expanded to one scale per block so one
    kernel serves both); CSR rows always get one scale each.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown runtime dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if scale_per not in SCALE_GRANULARITIES:
        raise ValueError(f"unknown int8 scale granularity {scale_per!r} (one of {', '.join(SCALE_GRANULARITIES)})")
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
    stored = blocks[block_row, block_col]  # [stored block, r, k]
    scale = None
    if dtype == "int8":
        peak = np.abs(stored).max(axis=(1, 2)) if stored.size else np.zeros(0, np.float32)
        if b == 1:  # CSR: one scale per row (every row, a row with no entry keeps scale 1)
            peak = np.zeros(rows, np.float32)
            np.maximum.at(peak, block_row, np.abs(stored[:, 0, 0]))
            stored, scale = _int8(stored, peak[block_row][:, None, None])[0], _int8(peak, peak)[1]
        else:
            if scale_per == "row":  # the peak of the block's whole row of blocks
                row_peak = np.zeros(rows // b, np.float32)
                np.maximum.at(row_peak, block_row, peak)
                peak = row_peak[block_row]
            stored, scale = _int8(stored, peak[:, None, None])
            scale = scale.reshape(-1)
    # each block transposed (column k's b values contiguous: one vector per block column, see kernels)
    data = stored.transpose(0, 2, 1).reshape(-1)
    data = np.ascontiguousarray(data, dtype=np.float32 if scale is None else np.int8)
    return SparseWeight((rows, cols), b, indptr, indices, data,
                        None if scale is None else np.ascontiguousarray(scale, dtype=np.float32))
