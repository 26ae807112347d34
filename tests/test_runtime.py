"""The sparse runtime computes what the dense layers compute, and says why it keeps a layer dense."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from hf_sparse.runtime import SparseLinear, SparseRNN, to_sparse_runtime
from hf_sparse.runtime.convert import MIN_MEASURED_GAIN
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
    dense = prune_(nn.Linear(64, 48), 0.15, block).train()
    runtime = to_sparse_runtime(dense, calibrate=False)  # small: timing would keep it dense
    assert isinstance(runtime, SparseLinear) and not runtime.training
    assert dense.training  # a copy was converted (and put in eval mode); the model is left as it was
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
    runtime = to_sparse_runtime(dense, calibrate=False)
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
        # equal lengths (the runtime reads the packed data in place): one utterance, and three whose
        # packing permutes them
        one = pack_padded_sequence(single.unsqueeze(0 if batch_first else 1), torch.tensor([9]),
                                   batch_first=batch_first, enforce_sorted=False)
        _close(dense(one), runtime(one))
        xt = x.transpose(0, 1) if batch_first else x  # (T, B, F)
        order = torch.tensor([2, 0, 1])
        permuted = PackedSequence(xt.index_select(1, order).reshape(-1, 16), torch.full((9,), 3, dtype=torch.long),
                                  order, torch.argsort(order))
        _close(dense(permuted, hx), runtime(permuted, hx))


def test_model_conversion_and_fallback_reasons(caplog, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(prune_(nn.Linear(16, 64), 0.1), nn.ReLU(), nn.Linear(64, 64),
                          prune_(nn.Linear(64, 8), 0.1).double())
    with caplog.at_level(logging.INFO, logger="hf_sparse.runtime"):
        runtime = to_sparse_runtime(model, calibrate=False)
    report = {e["layer"]: e for e in runtime.sparse_runtime_report}
    assert report["0"]["converted"] and isinstance(runtime[0], SparseLinear)
    assert not report["2"]["converted"] and "above the threshold" in report["2"]["reason"]
    assert not report["3"]["converted"] and "float64" in report["3"]["reason"]
    assert type(runtime[2]) is nn.Linear and type(model[0]) is nn.Linear
    assert "dense fallback 2 (Linear): density 1.000 above the threshold" in caplog.text
    x = torch.randn(4, 16)
    torch.testing.assert_close(runtime[:3](x), model[:3](x), atol=ATOL, rtol=0)


def test_runtime_layers_refuse_training():
    runtime = to_sparse_runtime(prune_(nn.Linear(8, 8), 0.1), calibrate=False)
    runtime.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        runtime(torch.randn(2, 8))


# -- decisions: each layer timed whole, at every requested batch size; reproducible without timing -----------


class SpeechLike(nn.Module):
    """A block-sparse GRU (timed over its whole loop) and a small sparse Linear head."""

    def __init__(self):
        super().__init__()
        self.rnn = prune_(nn.GRU(64, 128, batch_first=True), 0.1, block=16)
        self.head = prune_(nn.Linear(128, 10), 0.2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_decisions_time_each_layer_whole_at_every_batch_size(caplog, one_thread):
    model = SpeechLike().eval()
    with caplog.at_level(logging.INFO, logger="hf_sparse.runtime"):
        runtime = to_sparse_runtime(model, batch_sizes=(1, 8))
    report = {e["layer"]: e for e in runtime.sparse_runtime_report}
    for name, module in (("rnn", SparseRNN), ("head", SparseLinear)):
        entry = report[name]
        assert set(entry["measured"]) == {"1", "8"}  # one figure per batch size asked for
        assert entry["converted"] == (min(entry["measured"].values()) >= MIN_MEASURED_GAIN)
        assert isinstance(getattr(runtime, name), module) == entry["converted"]
        assert f"whole layer measured {entry['measured']['1']:.2f}x at batch 1, " in entry["reason"]
    assert "whole layer measured" in caplog.text
    x = torch.randn(3, 20, 64)
    torch.testing.assert_close(runtime(x), model(x), atol=ATOL, rtol=0)


def test_decisions_reproduce_a_conversion_without_timing(tmp_path, one_thread):
    """Decisions (a mapping or a JSON file) convert exactly the named layers in the recorded formats,
    whatever timing would say (a 10x10 layer is always slower than dense when timed)."""
    model = SpeechLike().eval()
    decisions = {"rnn": {"converted": True, "formats": {"weight_ih_l0": "bsr16x16", "weight_hh_l0": "bsr16x16"}},
                 "head": {"converted": False, "formats": {"weight": "dense"}}}
    (tmp_path / "decisions.json").write_text(json.dumps(decisions))
    for given in (decisions, tmp_path / "decisions.json"):
        runtime = to_sparse_runtime(model, decisions=given)
        assert isinstance(runtime.rnn, SparseRNN) and type(runtime.head) is nn.Linear
        assert "ih/hh formats: bsr16x16/bsr16x16" in repr(runtime.rnn)
        assert runtime.sparse_runtime_decisions == decisions
        assert "measured" not in {k for e in runtime.sparse_runtime_report for k in e}  # nothing was timed
    tiny = to_sparse_runtime(prune_(nn.Linear(10, 10), 0.1), decisions={"": {"converted": True,
                                                                           "formats": {"weight": "csr"}}})
    assert isinstance(tiny, SparseLinear)
    recorded = to_sparse_runtime(model, batch_sizes=(1,))  # a timed conversion's own record reproduces it
    again = to_sparse_runtime(model, decisions=recorded.sparse_runtime_decisions)
    assert [type(m) for m in again.children()] == [type(m) for m in recorded.children()]
    with pytest.raises(ValueError, match="boolean 'converted'"):
        to_sparse_runtime(model, decisions={"rnn": {"formats": {}}})


# -- checkpoints: load_sparse(runtime="sparse") and the speed in the card ---------------------------------

LENET_LAYERS = ["fc1.weight", "fc2.weight", "classifier.weight"]


@torch.no_grad()
def _lenet300_at(density: float):
    """LeNet-300-100 with each Linear weight magnitude-pruned to ``density``, and its sparsity report."""
    from hf_sparse.models.lenet import LeNetConfig, LeNetForImageClassification

    torch.manual_seed(0)
    model = LeNetForImageClassification(LeNetConfig(variant="300-100")).eval()
    per_layer = {}
    for name in LENET_LAYERS:
        w = model.get_parameter(name)
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[w.abs().flatten().topk(round(density * w.numel())).indices] = True
        w.mul_(keep.view_as(w))
        per_layer[name] = {"density": density, "nonzero": int(keep.sum()), "numel": w.numel(),
                           "shape": list(w.shape), "layer_type": "Linear"}
    report = {"method": "gmp", "target_density": density, "achieved_density": density, "per_layer": per_layer}
    return model, report


@pytest.mark.parametrize("layer_gain", [2.0, 0.5])
def test_lenet300_checkpoint_states_its_speed_in_the_card(tmp_path, monkeypatch, one_thread, layer_gain):
    """Whether a layer converts depends on its timed gain; that figure is fixed here so each branch
    of the card is checked (the end-to-end figure of a converted model is still really measured)."""
    from hf_sparse import save_sparse_checkpoint
    from hf_sparse.runtime import convert

    monkeypatch.setattr(convert, "_measured_gain", lambda dense_fn, sparse_fn: layer_gain)
    model, report = _lenet300_at(0.1)
    out = save_sparse_checkpoint(model, tmp_path / "ck", report=report, measure_speed=True)
    speed = json.loads((out / "sparsity.json").read_text())["runtime_speed"]
    card = (out / "README.md").read_text()
    assert "## Speed" in card
    if layer_gain > 1:  # every layer's kernel beat dense: the whole model is timed
        assert speed["measured"] is True and speed["converted_layers"] == ["fc1", "fc2", "classifier"]
        assert speed["input_shapes"] == {"pixel_values": [1, 1, 28, 28]} and speed["threads"] == 1
        assert f"**{speed['speedup']:.2f}×**" in card and speed["formats"] == ["csr"]
        assert "`fc1` 2.00×" in card
    else:  # no layer converts: each layer's own batch-1 figure is stated instead
        assert speed["measured"] is False and "fc1: " in speed["reason"]
        assert "Not measured with the sparse runtime" in card and "whole layer measured 0.50x at batch 1" in card


def test_lenet300_checkpoint_runs_sparse(tmp_path, fmnist_full, one_thread):
    from hf_sparse import load_sparse, save_sparse_checkpoint

    model, report = _lenet300_at(0.1)
    out = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    images = fmnist_full.collator([fmnist_full.eval[i] for i in range(2000)])["pixel_values"]
    dense = load_sparse(out)
    forced = to_sparse_runtime(dense, calibrate=False)  # every layer on the CSR kernel
    assert all(isinstance(getattr(forced, n.split(".")[0]), SparseLinear) for n in LENET_LAYERS)
    with torch.no_grad():
        want = dense(pixel_values=images).logits
        for runtime in (forced, load_sparse(out, runtime="sparse")):
            got = runtime(pixel_values=images).logits
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_speed_is_not_measured_unless_asked_or_not_worthwhile(tmp_path):
    from hf_sparse import load_sparse, save_sparse_checkpoint
    from hf_sparse.checkpoint.save_and_load import CheckpointError

    model, report = _lenet300_at(0.1)
    off = save_sparse_checkpoint(model, tmp_path / "off", report=report)  # off by default
    assert json.loads((off / "sparsity.json").read_text())["runtime_speed"] is None
    assert "## Speed" not in (off / "README.md").read_text()
    dense_model, dense_report = _lenet300_at(1.0)
    kept = save_sparse_checkpoint(dense_model, tmp_path / "dense", report=dense_report, measure_speed=True)
    speed = json.loads((kept / "sparsity.json").read_text())["runtime_speed"]
    assert speed["measured"] is False and "above the threshold" in speed["reason"]
    assert "Not measured with the sparse runtime" in (kept / "README.md").read_text()
    with pytest.raises(CheckpointError, match="unknown runtime 'fast'"):
        load_sparse(off, runtime="fast")
