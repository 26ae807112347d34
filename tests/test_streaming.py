"""Streaming speech: chunks of any size give the offline forward's outputs (real FSDD utterances),
for GRU and LSTM, CTC and classification, dense and on the sparse runtime; what cannot stream is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_sparse
from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint
from hf_sparse.checkpoint.streaming import stream
from hf_sparse.data.feature_extraction import SpeechRNNFeatureExtractor
from hf_sparse.data.fsdd import load_fsdd
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC, SpeechRNNForSequenceClassification
from hf_sparse.runtime.convert import to_sparse_runtime
from hf_sparse.runtime.layers import SparseRNN
from hf_sparse.runtime.streaming import StreamingError
from tests.test_export import make_report


@pytest.fixture(scope="module")
def fsdd():
    """Ten official-split test utterances (every 30th) and a global-statistics extractor fitted on 100 training ones."""
    dd = load_fsdd()
    fe = SpeechRNNFeatureExtractor(normalize="global").fit_global_stats(
        [np.asarray(a, np.float32) for a in dd["train"].select(range(0, 2700, 27))["audio"]])
    return [np.asarray(a, np.float32) for a in dd["test"].select(range(0, 300, 30))["audio"]], fe


def sparse_model(cls, cell: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    labels = ["<blank>", *"0123456789"] if cls is SpeechRNNForCTC else [str(d) for d in range(10)]
    model = cls(SpeechRNNConfig(cell=cell, hidden_size=64, num_layers=2, bidirectional=False, conv_channels=[32, 32],
                                vocab_size=11, id2label=dict(enumerate(labels)))).eval()
    with torch.no_grad():  # 16x16 blocks at density ~0.2, as a block-sparse run leaves the recurrent weights
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("weight_"):
                keep = torch.rand(p.shape[0] // 16, p.shape[1] // 16) < 0.2
                p.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    return model


def run_stream(s, audio: np.ndarray, chunk: int) -> list:
    s.reset()
    updates = [s.feed(audio[i:i + chunk]) for i in range(0, len(audio), chunk)]
    return updates + [s.finish()]


@pytest.mark.parametrize("cls", [SpeechRNNForCTC, SpeechRNNForSequenceClassification])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("runtime", ["dense", "sparse"])
def test_stream_equals_offline_forward(fsdd, one_thread, cls, cell, runtime):
    utterances, fe = fsdd
    model = sparse_model(cls, cell)
    if runtime == "sparse":  # every candidate converted (untimed: a 64-unit layer may not be faster)
        s = stream(to_sparse_runtime(model, calibrate=False), fe)
        assert isinstance(s.rnn, SparseRNN)
    else:
        s = stream(model, fe)
    for audio in utterances:
        with torch.no_grad():
            ref = model(**fe(audio, return_tensors="pt"))
        for ms in (10, 37, 100):
            updates = run_stream(s, audio, fe.sampling_rate * ms // 1000)
            if cls is SpeechRNNForCTC:
                frames = np.concatenate([u.frame_logits for u in updates if u.frame_logits is not None])
                assert frames.shape == ref.logits[0].shape
                np.testing.assert_allclose(frames, ref.logits[0].numpy(), atol=1e-5, rtol=0)
                ids = ref.logits[0].argmax(-1).tolist()
                want = [i for j, i in enumerate(ids) if i != 0 and (j == 0 or ids[j - 1] != i)]
                assert updates[-1].text == "".join(model.config.id2label[i] for i in want)  # digits: no spaces
            else:
                np.testing.assert_allclose(updates[-1].logits, ref.logits[0].numpy(), atol=1e-5, rtol=0)
                np.testing.assert_allclose(updates[-1].posterior.sum(), 1.0, atol=1e-6)


def test_stream_from_a_checkpoint_folder(tmp_path, fsdd):
    utterances, fe = fsdd
    model = sparse_model(SpeechRNNForSequenceClassification, "gru")
    names = [n for n, _ in model.named_parameters() if n.split(".")[-1].startswith("weight_")]
    save_sparse_checkpoint(model, tmp_path, report=make_report(model, names), processor=fe, measure_speed=False)
    s = hf_sparse.stream(tmp_path)
    with torch.no_grad():
        ref = model(**fe(utterances[0], return_tensors="pt")).logits[0].numpy()
    np.testing.assert_allclose(run_stream(s, utterances[0], 296)[-1].logits, ref, atol=1e-5, rtol=0)
    with pytest.raises(StreamingError, match="finished"):
        s.feed(utterances[0][:80])


def test_what_cannot_stream_is_refused(fsdd):
    _, fe = fsdd
    bidirectional = SpeechRNNForCTC(SpeechRNNConfig(hidden_size=16, bidirectional=True))
    with pytest.raises(StreamingError, match="bidirectional"):
        stream(bidirectional, fe)
    with pytest.raises(StreamingError, match="normalize='utterance'.*global"):
        stream(sparse_model(SpeechRNNForCTC, "gru"), SpeechRNNFeatureExtractor(normalize="utterance"))
    with pytest.raises(StreamingError, match="speech RNN"):
        stream(torch.nn.Linear(2, 2), fe)
