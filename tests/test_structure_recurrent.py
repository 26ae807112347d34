"""GRU/LSTM hidden units as channel groups: discovery, the zero-unit invariant and exact purges.

Models are hf_sparse's speech classifier and CTC model (bidirectional, two layers) on real FSDD
batches with padding; purged outputs must equal the gated model's within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForAudioClassification, AutoModelForCTC

from hf_sparse.config.recipe import DataConfig
from hf_sparse.data import load_data
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC, SpeechRNNForSequenceClassification
from hf_sparse.structure.recurrent import (
    equal_counts,
    purge_recurrent,
    purge_speech_rnn,
    recurrent_groups,
    removable_units,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RNN = "speech_rnn.rnn"


@pytest.fixture(scope="module")
def fsdd_batch():
    data = load_data(DataConfig(name="fsdd", max_train_samples=32, max_eval_samples=8))
    return data, data.collator([data.eval[i] for i in range(6)])


@pytest.fixture(scope="module")
def digits_batch():
    data = load_data(DataConfig(name="fsdd_digits", options={"num_train": 32, "num_test": 8, "max_digits": 3}))
    return data, data.collator([data.eval[i] for i in range(6)])


def speech_model(cls, cell: str, hidden: int = 8, layers: int = 2, bidirectional: bool = True):
    torch.manual_seed(0)
    cfg = SpeechRNNConfig(cell=cell, hidden_size=hidden, num_layers=layers, bidirectional=bidirectional,
                          conv_channels=[8], dropout=0.0, num_labels=10, vocab_size=11)
    return cls(cfg).eval()


@torch.no_grad()
def mask_units(model: nn.Module, removed: dict[str, list[int]]) -> None:
    """Zero every "out" slice (rows in all gate blocks, biases) of the listed units: the gated model."""
    params = dict(model.named_parameters())
    for g in recurrent_groups(model):
        for s in g.slices:
            if s.role == "out" and removed.get(g.name):
                params[s.tensor].index_fill_(s.dim, s.index[removed[g.name]].flatten(), 0.0)


# -- discovery -------------------------------------------------------------------------------------


def test_groups_of_a_bidirectional_gru_classifier():
    model = speech_model(SpeechRNNForSequenceClassification, "gru", hidden=4)
    groups = {g.name: g for g in recurrent_groups(model)}
    assert sorted(groups) == [f"{RNN}.l0", f"{RNN}.l0_reverse", f"{RNN}.l1", f"{RNN}.l1_reverse"]
    g = groups[f"{RNN}.l0_reverse"]
    assert g.channels == 4
    by = {(s.tensor, s.role): s for s in g.slices}
    # unit 1's rows in the 3 gate blocks (r, z, n) of a hidden-4 GRU: 1, 5, 9
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        s = by[(f"{RNN}.{kind}_l0_reverse", "out")]
        assert s.dim == 0 and s.index[1].tolist() == [1, 5, 9] and s.index.shape == (4, 3)
    assert by[(f"{RNN}.weight_hh_l0_reverse", "in")].index[1].tolist() == [1]
    # the next layer reads the reverse direction's unit 1 at column 4 + 1, in both its directions
    for s in ("", "_reverse"):
        col = by[(f"{RNN}.weight_ih_l1{s}", "in")]
        assert col.dim == 1 and col.index[1].tolist() == [5]
    assert not any(s.tensor.startswith("classifier") for s in g.slices)
    last = {(s.tensor, s.role): s for s in groups[f"{RNN}.l1_reverse"].slices}
    assert last[("classifier.weight", "in")].index[:, 0].tolist() == [4, 5, 6, 7]
    assert sum(s.role == "out" for s in groups[f"{RNN}.l1"].slices) == 4


def test_groups_of_an_lstm_ctc_model_and_a_headless_encoder():
    model = speech_model(SpeechRNNForCTC, "lstm", hidden=4, layers=1, bidirectional=False)
    (g,) = recurrent_groups(model)
    by = {(s.tensor, s.role): s for s in g.slices}
    assert by[(f"{RNN}.weight_ih_l0", "out")].index[2].tolist() == [2, 6, 10, 14]  # i, f, g, o
    assert by[("lm_head.weight", "in")].index[2].tolist() == [2]
    # the encoder alone: its last layer is the output, so that layer's width stays
    encoder = speech_model(SpeechRNNForSequenceClassification, "lstm", hidden=4).speech_rnn
    assert [g.name for g in recurrent_groups(encoder)] == ["rnn.l0", "rnn.l0_reverse"]
    assert recurrent_groups(model, exclude=[RNN]) == []


# -- the invariant that makes purging exact ----------------------------------------------------------


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_a_masked_unit_stays_exactly_zero(cls):
    torch.manual_seed(0)
    hidden, gates = 6, 3 if cls is nn.GRU else 4
    rnn = cls(5, hidden, num_layers=1, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for sfx, unit in (("", 2), ("_reverse", 4)):
            rows = [g * hidden + unit for g in range(gates)]
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{kind}_l0{sfx}")[rows] = 0.0
        out, state = rnn(torch.randn(3, 40, 5) * 3)  # h0 = 0 (and c0 = 0)
    assert torch.all(out[..., 2] == 0) and torch.all(out[..., hidden + 4] == 0)
    h = state[0] if cls is nn.LSTM else state
    assert h[0, :, 2].eq(0).all() and h[1, :, 4].eq(0).all()
    assert out[..., [0, 1, 3, 4, 5]].abs().min() > 0  # the other units are alive
    if cls is nn.LSTM:
        assert state[1][0, :, 2].eq(0).all()  # the cell state too


# -- purging ---------------------------------------------------------------------------------------

#: different kept counts per layer and direction: layer 0 keeps 5 / 3, layer 1 keeps 6 / 4 of 8
REMOVED = {f"{RNN}.l0": [0, 3, 7], f"{RNN}.l0_reverse": [1, 2, 4, 6, 7], f"{RNN}.l1": [2, 5],
           f"{RNN}.l1_reverse": [0, 1, 3, 6]}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("task", ["classification", "ctc"])
def test_purge_gives_equal_outputs_and_a_plain_from_pretrained_model(cell, task, fsdd_batch, digits_batch,
                                                                     tmp_path):
    cls, auto, (_, batch) = ((SpeechRNNForSequenceClassification, AutoModelForAudioClassification, fsdd_batch)
                             if task == "classification" else (SpeechRNNForCTC, AutoModelForCTC, digits_batch))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    assert int(batch["attention_mask"].sum(-1).min()) < batch["attention_mask"].shape[1]  # padding is exercised
    model = speech_model(cls, cell)
    mask_units(model, REMOVED)
    with torch.no_grad():
        gated = model(**batch).logits
    small, kept = purge_speech_rnn(model)
    rnn = small.speech_rnn.rnn
    gates = 3 if cell == "gru" else 4
    # one hidden size for the module: the largest kept count (6), the others padded with zero units
    assert rnn.hidden_size == small.config.hidden_size == 6 and model.config.hidden_size == 8
    assert rnn.weight_ih_l1.shape == (gates * 6, 12) and rnn.weight_hh_l0_reverse.shape == (gates * 6, 6)
    head = small.classifier if task == "classification" else small.lm_head
    assert head.weight.shape[1] == head.in_features == 12
    assert kept[f"{RNN}.weight_ih_l1"] == [0, 1, 3, 4, 6, 7]
    assert kept[f"{RNN}.weight_ih_l0_reverse"] == [0, 1, 2, 3, 4, 5]  # kept 0, 3, 5 + padding 1, 2, 4
    with torch.no_grad():
        torch.testing.assert_close(small(**batch).logits, gated, rtol=0, atol=1e-5)
    # padding units carry no weight in or out
    pad = [1, 2, 4]  # positions of the padding units among layer 0 reverse's six
    assert rnn.weight_hh_l0_reverse[:, pad].eq(0).all() and rnn.weight_ih_l1[:, [6 + p for p in pad]].eq(0).all()
    small.save_pretrained(tmp_path / "small")
    loaded = auto.from_pretrained(tmp_path / "small").eval()
    assert loaded.speech_rnn.rnn.hidden_size == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, gated, rtol=0, atol=1e-5)


def test_units_nothing_reads_are_removable_and_a_live_unit_is_refused(fsdd_batch):
    _, batch = fsdd_batch
    batch = {k: v for k, v in batch.items() if k != "labels"}
    model = speech_model(SpeechRNNForSequenceClassification, "gru", layers=1)
    with torch.no_grad():  # unit 3 forward: nobody reads it (its weight_hh column and classifier column)
        model.speech_rnn.rnn.weight_hh_l0[:, 3] = 0
        model.classifier.weight[:, 3] = 0
        gated = model(**batch).logits
    groups = recurrent_groups(model)
    keep = removable_units(model, groups)
    assert keep[f"{RNN}.l0"].tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert keep[f"{RNN}.l0_reverse"].tolist() == list(range(8))
    small, _ = purge_speech_rnn(model)
    assert small.speech_rnn.rnn.hidden_size == 8  # the reverse direction keeps 8: unit 3 forward is padding
    with torch.no_grad():
        torch.testing.assert_close(small(**batch).logits, gated, rtol=0, atol=1e-5)
    # a structure that removes a unit whose rows are not zero would change the outputs
    structure = {f"{RNN}.weight_ih_l0": [0, 1, 2, 3], f"{RNN}.weight_hh_l0": [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="not zero"):
        purge_speech_rnn(model, structure)
    # padding must be zero units, checked
    with pytest.raises(ValueError, match="padding units \\[6, 7\\]"):
        purge_recurrent(model, groups, {f"{RNN}.l0": torch.arange(6)})


def test_equal_counts_pads_with_the_lowest_free_units_and_keeps_unmentioned_layers_whole():
    model = speech_model(SpeechRNNForSequenceClassification, "gru")
    groups = recurrent_groups(model)
    keep = equal_counts(groups, {f"{RNN}.l0": torch.tensor([7, 5]), f"{RNN}.l1": torch.tensor([6]),
                                 f"{RNN}.l0_reverse": torch.tensor([1, 2]), f"{RNN}.l1_reverse": torch.tensor([4, 0, 2])})
    assert {k: v.tolist() for k, v in keep.items()} == {
        f"{RNN}.l0": [0, 5, 7], f"{RNN}.l1": [0, 1, 6], f"{RNN}.l0_reverse": [0, 1, 2], f"{RNN}.l1_reverse": [0, 2, 4]}
    keep = equal_counts(groups, {f"{RNN}.l0": torch.tensor([7, 5])})
    assert keep[f"{RNN}.l1_reverse"].tolist() == keep[f"{RNN}.l0"].tolist() == list(range(8))


# -- a real run: unit-level L0 gates, a few steps, then the purged checkpoint -----------------------

# 0.3, not 0.5: the hard mask spends the whole budget when the gates freeze, and at 0.5 it may open
# every unit of one layer, which leaves nothing to purge under the equal-count rule
L0_UNITS = {"method": "l0", "target_density": 0.3, "granularity": "unit", "targets": {"layer_types": ["GRU"]},
            "params": {"count": "gates", "gate_lr": 0.5, "dual_lr": 2.0, "freeze_fraction": 0.8}}


def test_l0_unit_gates_train_then_purge_to_a_smaller_gru_with_equal_outputs(tmp_path):
    from hf_sparse import SparseTrainer, load_sparse
    from tests.helpers import tiny_args

    data = load_data(DataConfig(name="fsdd", max_train_samples=96, max_eval_samples=16))
    model = speech_model(SpeechRNNForSequenceClassification, "gru", hidden=16)
    trainer = SparseTrainer(model=model, args=tiny_args(tmp_path, max_steps=20, per_device_train_batch_size=16),
                            train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                            compute_metrics=data.compute_metrics, sparsity=L0_UNITS)
    trainer.train()
    folder = trainer.save_sparse_model(tmp_path / "model", format="purged")  # finalizes the gates first
    gated = trainer.model.eval()
    structure = trainer.sparsifier.method.structure()
    kept = {k: len(v) for k, v in structure.items()}
    assert min(kept.values()) < 16  # gates closed during the run
    loaded = load_sparse(folder)
    rnn = loaded.speech_rnn.rnn
    assert rnn.hidden_size == max(kept.values()) < 16
    assert loaded.classifier.in_features == 2 * rnn.hidden_size
    batch = data.collator([data.eval[i] for i in range(8)])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, gated(**batch).logits, rtol=0, atol=1e-5)
