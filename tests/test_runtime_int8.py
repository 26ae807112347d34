"""int8 sparse runtime: weights really stored as int8, outputs within int8 rounding of float32.

The tolerance is relative to the output's scale: symmetric int8 with one scale per stored block
(per row for CSR) rounds each weight by at most half a step, max|block| / 254, so an output moves
by far less than 1% of the largest output (measured 0.1-0.3% here); the kernels compute exactly
on the dequantised weights (within float32 rounding, checked against ``SparseWeight.to_dense``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("numba")

from hf_sparse.runtime import SparseLinear, SparseRNN, kernels, to_sparse_runtime  # noqa: E402
from hf_sparse.runtime.formats import to_sparse_weight  # noqa: E402

#: int8 outputs vs float32 outputs, as a fraction of the largest float32 output.
INT8_RTOL = 0.01


@torch.no_grad()
def _prune(module: nn.Module, density: float, block: int, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.startswith("weight"):
            rows, cols = p.shape
            keep = torch.rand(rows // block, cols // block, generator=gen) < density
            p.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))
    return module.eval()


def _assert_int8_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out, ref = out.detach(), ref.detach()
    err = float((out - ref).abs().max())
    assert err <= INT8_RTOL * float(ref.abs().max()), f"int8 off by {err:.3g} of max {float(ref.abs().max()):.3g}"
    assert err > 0  # really quantised, not a float32 path


def _int8_weights(sparse_weights) -> None:
    for w in sparse_weights:
        assert w.data.dtype == np.int8 and w.data.itemsize == 1 and w.scale.dtype == np.float32
        assert w.data.nbytes == w.data.size  # one byte per stored value
        per = w.shape[0] if w.block == 1 else w.data.size // (w.block * w.block)  # a scale per row / block
        assert w.scale.shape == (per,)
        assert w.nbytes == w.data.size + w.indices.nbytes + w.indptr.nbytes + 4 * per


@pytest.mark.parametrize("block", [1, 4, 8, 16])
@pytest.mark.parametrize("batch", [1, 3, 8, 13, 70])
def test_int8_kernel_computes_with_the_dequantised_weight(block, batch):
    rng = np.random.default_rng(block * 10 + batch)
    rows, cols = (48 if block > 1 else 37), 64
    keep = rng.random((rows // block, cols // block)) < 0.3
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.kron(keep, np.ones((block, block), np.float32))
    for scale_per in ("block", "row"):
        sw = to_sparse_weight(torch.from_numpy(w), block, "int8", scale_per)
        x = rng.standard_normal((cols, batch)).astype(np.float32)
        y = np.empty((batch, rows), np.float32)
        kernels.spmm(block, sw.indptr, sw.indices, sw.data, x, y, True, sw.scale)
        np.testing.assert_allclose(y, (sw.to_dense() @ x).T, atol=1e-5, rtol=0)
        assert np.abs(sw.to_dense() - w).max() <= np.abs(w).max() / 254 + 1e-6  # half an int8 step at most


@pytest.mark.parametrize("block", [1, 16])
def test_int8_linear(block, one_thread):
    torch.manual_seed(0)
    dense = _prune(nn.Linear(64, 96), 0.2, block)
    runtime = to_sparse_runtime(dense, calibrate=False, dtype="int8")
    assert isinstance(runtime, SparseLinear) and runtime.product.format.endswith("/int8")
    assert runtime.sparse_runtime_report[0]["dtype"] == "int8"
    _int8_weights([runtime.product.sparse])
    for x in (torch.randn(64), torch.randn(5, 64)):
        _assert_int8_close(runtime(x), dense(x))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("block,density,bidirectional", [(1, 0.15, False), (16, 0.3, True)])
def test_int8_recurrent(cls, block, density, bidirectional, one_thread):
    torch.manual_seed(0)
    dense = _prune(cls(32, 64, num_layers=2, bidirectional=bidirectional, batch_first=True), density, block)
    runtime = to_sparse_runtime(dense, calibrate=False, dtype="int8")
    assert isinstance(runtime, SparseRNN)
    _int8_weights([rec for _, rec, _, _ in runtime.cells] + [p.sparse for p, _, _, _ in runtime.cells])
    for batch in (1, 4):
        x = torch.randn(batch, 12, 32)
        out, hidden = runtime(x)
        ref, ref_hidden = dense(x)
        _assert_int8_close(out, ref)
        for h, r in zip(hidden if cls is nn.LSTM else (hidden,), ref_hidden if cls is nn.LSTM else (ref_hidden,)):
            _assert_int8_close(h, r)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        to_sparse_runtime(nn.Linear(8, 8), dtype="int4")


def test_load_sparse_passes_dtype_through(tmp_path, one_thread):
    """``load_sparse(path, runtime="sparse", dtype="int8")`` converts with int8 weights (decisions
    given, so nothing is timed)."""
    from hf_sparse import load_sparse, save_sparse_checkpoint
    from tests.test_runtime import LENET_LAYERS, _lenet300_at

    model, report = _lenet300_at(0.1)
    out = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    decisions = {name.rpartition(".")[0]: {"converted": True, "formats": {"weight": "csr"}} for name in LENET_LAYERS}
    runtime = load_sparse(out, runtime="sparse", dtype="int8", decisions=decisions)
    layers = [m for m in runtime.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == len(LENET_LAYERS)
    _int8_weights([m.product.sparse for m in layers])
    assert {e["dtype"] for e in runtime.sparse_runtime_report} == {"int8"}
    images = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        _assert_int8_close(runtime(pixel_values=images).logits, model(pixel_values=images).logits)
