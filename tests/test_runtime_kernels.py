"""The runtime's sparse products match numpy for every block size, batch path and output layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from hf_sparse.runtime import kernels  # noqa: E402
from hf_sparse.runtime.formats import to_sparse_weight  # noqa: E402


@pytest.mark.parametrize("block", [1, 4, 8, 16])
@pytest.mark.parametrize("batch", [1, 3, 8, 13, 33, 70])  # BSR groups of 8/4/1, CSR runs of 4/2/1 vectors
def test_spmm_matches_numpy_in_both_layouts(block, batch):
    rng = np.random.default_rng(block * 100 + batch)
    rows, cols = 48 if block > 1 else 37, 64  # 37 rows: CSR's last group of rows is partial
    keep = rng.random((rows // block, cols // block)) < 0.3
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.kron(keep, np.ones((block, block), np.float32))
    sw = to_sparse_weight(torch.from_numpy(w), block)
    x = rng.standard_normal((cols, batch)).astype(np.float32)
    expected = w @ x
    y = np.full((rows, batch), np.nan, np.float32)
    kernels.spmm(block, sw.indptr, sw.indices, sw.data, x, y)
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=0)
    yt = np.full((batch, rows), np.nan, np.float32)
    kernels.spmm(block, sw.indptr, sw.indices, sw.data, x, yt, True)
    np.testing.assert_allclose(yt, expected.T, atol=1e-5, rtol=0)
