"""Every sparsity method on the recurrent weights of GRU/LSTM speech models, under SparseTrainer.

Parametrised over the method registry, so a method added later is covered without editing this
file. ``nn.GRU``/``nn.LSTM`` keep their weights in flat buffers; the engine writes ``param.data`` in
place, and these tests check that what the forward pass uses, what is reported and what is saved
all agree - for both directions of a bidirectional stack.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForAudioClassification, AutoModelForCTC, TrainerCallback

from hf_sparse import SparseTrainer
from hf_sparse.config.recipe import DataConfig
from hf_sparse.data import load_data
from hf_sparse.methods import METHODS
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC, SpeechRNNForSequenceClassification
from tests.helpers import fast_sparsity, tiny_args

STEPS = 20  # tests.helpers.FAST_SPARSITY prunes within 20 steps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fsdd_small():
    return load_data(DataConfig(name="fsdd", max_train_samples=96, max_eval_samples=16))


@pytest.fixture(scope="module")
def digits_small():
    return load_data(DataConfig(name="fsdd_digits", options={"num_train": 64, "num_test": 16, "max_digits": 3}))


def speech_model(cls, cell: str, bidirectional: bool, vocab_size: int = 11):
    torch.manual_seed(0)
    cfg = SpeechRNNConfig(cell=cell, hidden_size=16, num_layers=2, bidirectional=bidirectional,
                          conv_channels=[8], dropout=0.0, num_labels=10, vocab_size=vocab_size)
    return cls(cfg)


def recurrent_sparsity(method: str, cell: str) -> dict:
    cfg = copy.deepcopy(fast_sparsity(method))
    cfg.setdefault("target_density", 0.3)
    cfg["targets"] = {"layer_types": [cell.upper()]}
    return cfg


def masked_copy(model, trainer: SparseTrainer):
    """The model with every target multiplied by its hard mask."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for t, m in zip(trainer.sparsifier.targets, trainer.sparsifier.method.hard_masks()):
            params[t.name].mul_(m.to(params[t.name].dtype))
    return clone


class ForwardUsesHardMasks(TrainerCallback):
    """After every optimizer step: the model computes exactly what its hard-masked copy computes."""

    def __init__(self, trainer: SparseTrainer, probe: dict):
        self.trainer, self.probe, self.densities = trainer, probe, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = self.trainer.model
        with torch.no_grad():
            assert torch.equal(model(**self.probe).logits, masked_copy(model, self.trainer)(**self.probe).logits)
        self.densities.append(self.trainer.sparsifier.density())


def train(model, data, sparsity: dict, output_dir) -> tuple[SparseTrainer, ForwardUsesHardMasks]:
    trainer = SparseTrainer(model=model, args=tiny_args(output_dir, max_steps=STEPS, per_device_train_batch_size=16),
                            train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                            compute_metrics=data.compute_metrics, sparsity=sparsity,
                            preprocess_logits_for_metrics=data.info.get("preprocess_logits_for_metrics"))
    probe = data.collator([data.eval[i] for i in range(4)])
    check = ForwardUsesHardMasks(trainer, probe)
    trainer.add_callback(check)
    trainer.train()
    return trainer, check


def expected_targets(cell_module: torch.nn.RNNBase, prefix: str) -> set[str]:
    suffixes = ["", "_reverse"] if cell_module.bidirectional else [""]
    return {f"{prefix}.weight_{kind}_l{layer}{s}" for kind in ("ih", "hh") for layer in range(cell_module.num_layers)
            for s in suffixes}


def check_sparse_model(trainer: SparseTrainer, check: ForwardUsesHardMasks, auto, tmp_path):
    model, sp = trainer.model.eval(), trainer.sparsifier
    rnn = model.speech_rnn.rnn
    # every recurrent matrix of every layer and direction is a target, and nothing else
    assert {t.name for t in sp.targets} == expected_targets(rnn, "speech_rnn.rnn")
    masks = sp.method.hard_masks()
    # after training (finalize): masked weights are exactly zero, in the module's own parameters
    for t, m in zip(sp.targets, masks):
        assert t.module is rnn
        assert torch.all(getattr(rnn, t.attr)[~m] == 0), t.name
    assert sp.density() < 1.0 and len(check.densities) == STEPS
    if rnn.bidirectional:
        reverse = [m for t, m in zip(sp.targets, masks) if t.name.endswith("_reverse")]
        assert sum(int((~m).sum()) for m in reverse) > 0  # the reverse direction is pruned too
    probe = check.probe
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, masked_copy(model, trainer)(**probe).logits)
        expected = model(**probe).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = auto.from_pretrained(tmp_path / "saved").eval()
    loaded_rnn = loaded.speech_rnn.rnn
    for t, m in zip(sp.targets, masks):
        assert torch.equal(getattr(loaded_rnn, t.attr), getattr(rnn, t.attr))
        assert torch.all(getattr(loaded_rnn, t.attr)[~m] == 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_recurrent_classifier(method, cell, bidirectional, fsdd_small, tmp_path):
    model = speech_model(SpeechRNNForSequenceClassification, cell, bidirectional)
    trainer, check = train(model, fsdd_small, recurrent_sparsity(method, cell), tmp_path)
    check_sparse_model(trainer, check, AutoModelForAudioClassification, tmp_path)
    assert "eval_accuracy" in trainer.evaluate()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_bidirectional_gru_ctc(method, digits_small, tmp_path):
    model = speech_model(SpeechRNNForCTC, "gru", True, vocab_size=digits_small.num_labels)
    trainer, check = train(model, digits_small, recurrent_sparsity(method, "gru"), tmp_path)
    check_sparse_model(trainer, check, AutoModelForCTC, tmp_path)
    assert {"eval_cer", "eval_digit_error_rate"} <= set(trainer.evaluate())
