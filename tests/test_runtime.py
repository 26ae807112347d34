"""The sparse runtime computes what the dense layers compute, and says why it keeps a layer dense."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from hf_sparse.runtime import SparseLinear, SparseRNN, to_sparse_runtime
from hf_sparse.runtime.formats import choose_format, to_sparse_weight

ATOL = 1e-5


@torch.no_grad()
def prune_(module: nn.Module, density: float, block: int = 1, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.startswith("weight"):
            rows, cols = p.shape
            if block == 1:
                keep = torch.rand(rows, cols, generator=gen) < density
            else:
                keep = (torch.rand(rows // block, cols // block, generator=gen) < density)
                keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
            p.mul_(keep)
    return module.eval()


def test_format_is_read_from_the_zeros():
    torch.manual_seed(0)
    blocky = prune_(nn.Linear(64, 96), 0.2, block=8).weight
    scattered = prune_(nn.Linear(64, 96), 0.1).weight
    assert choose_format(blocky).format == "bsr8x8"
    assert choose_format(scattered).format == "csr"
    assert choose_format(nn.Linear(64, 96).weight).format == "dense"
    sw = to_sparse_weight(blocky, 8)
    assert sw.stored == int((blocky != 0).sum())  # exact block mask: nothing but nonzeros stored


@pytest.mark.parametrize("block", [1, 8])
def test_linear_matches_dense(block, one_thread):
    torch.manual_seed(0)
    dense = prune_(nn.Linear(64, 48), 0.15, block)
    runtime = to_sparse_runtime(dense)
    assert isinstance(runtime, SparseLinear) and isinstance(dense, nn.Linear)  # a copy; the model is kept
    for x in (torch.randn(64), torch.randn(1, 64), torch.randn(5, 3, 64)):
        torch.testing.assert_close(runtime(x), dense(x), atol=ATOL, rtol=0)


def _hidden_states(cls, layers, directions, batch, hidden=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    h0 = torch.randn(layers * directions, batch, hidden, generator=gen)
    return (h0, torch.randn(layers * directions, batch, hidden, generator=gen)) if cls is nn.LSTM else h0


def _close(a, b):
    if isinstance(a, tuple):
        for u, v in zip(a, b):
            _close(u, v)
    elif isinstance(a, torch.nn.utils.rnn.PackedSequence):
        assert torch.equal(a.batch_sizes, b.batch_sizes) and torch.equal(a.sorted_indices, b.sorted_indices)
        torch.testing.assert_close(b.data, a.data, atol=ATOL, rtol=0)
    else:
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("layers,bidirectional,batch_first,block",
                         [(1, False, False, 1), (2, True, True, 8), (2, True, False, 1)])
def test_recurrent_matches_dense(cls, layers, bidirectional, batch_first, block, one_thread):
    torch.manual_seed(0)
    dense = prune_(cls(16, 32, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first), 0.2, block)
    runtime = to_sparse_runtime(dense)
    assert isinstance(runtime, SparseRNN)
    x = torch.randn(3, 9, 16) if batch_first else torch.randn(9, 3, 16)
    hx = _hidden_states(cls, layers, 2 if bidirectional else 1, 3)
    with torch.no_grad():
        _close(dense(x), runtime(x))
        _close(dense(x, hx), runtime(x, hx))
        lengths = torch.tensor([4, 9, 1])  # unsorted, with ties to none: both packings sort the same way
        packed = pack_padded_sequence(x if batch_first else x.transpose(0, 1), lengths, batch_first=True,
                                      enforce_sorted=False)
        _close(dense(packed, hx), runtime(packed, hx))
        single = x[0] if batch_first else x[:, 0]  # unbatched input
        _close(dense(single), runtime(single))


def test_model_conversion_and_fallback_reasons(caplog, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(prune_(nn.Linear(16, 64), 0.1), nn.ReLU(), nn.Linear(64, 64),
                          prune_(nn.Linear(64, 8), 0.1).double())
    with caplog.at_level(logging.INFO, logger="hf_sparse.runtime"):
        runtime = to_sparse_runtime(model)
    report = {e["layer"]: e for e in runtime.sparse_runtime_report}
    assert report["0"]["converted"] and isinstance(runtime[0], SparseLinear)
    assert not report["2"]["converted"] and "above the threshold" in report["2"]["reason"]
    assert not report["3"]["converted"] and "float64" in report["3"]["reason"]
    assert type(runtime[2]) is nn.Linear and type(model[0]) is nn.Linear
    assert "dense fallback 2 (Linear): density 1.000 above the threshold" in caplog.text
    x = torch.randn(4, 16)
    torch.testing.assert_close(runtime[:3](x), model[:3](x), atol=ATOL, rtol=0)


def test_runtime_layers_refuse_training():
    runtime = to_sparse_runtime(prune_(nn.Linear(8, 8), 0.1))
    runtime.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        runtime(torch.randn(2, 8))
