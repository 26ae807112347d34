"""Recurrent speech models, their feature extractor and the FSDD data (isolated and connected digits)."""

from __future__ import annotations

import io
import tarfile
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForAudioClassification, AutoModelForCTC

from hf_sparse.config.recipe import DataConfig, ModelConfig, load_recipe
from hf_sparse.data import DataBundle, DataError, load_data
from hf_sparse.data.feature_extraction import SpeechRNNFeatureExtractor
from hf_sparse.data.fsdd import load_fsdd, load_fsdd_digits, read_fsdd
from hf_sparse.data.speech import (
    SpeechCollator,
    ctc_argmax,
    ctc_greedy_decode,
    ctc_metrics,
    edit_distance,
    error_rates,
)
from hf_sparse.models import build_model
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC, SpeechRNNForSequenceClassification

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SPEECH_RECIPES = ["fsdd_gru_dense", "fsdd_gru_gradual", "fsdd_lstm_dense", "fsddctc_gru_dense", "fsddctc_gru_gradual"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls, cell="gru", conv=(16,), bidirectional=True, **kw):
    torch.manual_seed(0)
    cfg = SpeechRNNConfig(num_mel_bins=40, cell=cell, hidden_size=12, num_layers=2, bidirectional=bidirectional,
                          conv_channels=list(conv), dropout=0.0, num_labels=10, vocab_size=11, **kw)
    return cls(cfg).eval()


def features(seed=0, lengths=(3000, 1500, 800)):
    rng = np.random.default_rng(seed)
    fe = SpeechRNNFeatureExtractor()
    return fe, fe([rng.standard_normal(n).astype(np.float32) for n in lengths], return_tensors="pt")


# -- feature extractor ------------------------------------------------------------------------
def test_feature_extractor_frames_mask_and_normalisation():
    fe, batch = features()
    x, mask = batch["input_features"], batch["attention_mask"]
    assert x.shape == (3, 1 + 3000 // 80, 40) and x.dtype == torch.float32
    assert mask.sum(-1).tolist() == [1 + n // 80 for n in (3000, 1500, 800)]
    assert torch.all(x[1, 19:] == 0)  # padding frames hold padding_value
    valid = x[1, : 1 + 1500 // 80]
    assert torch.allclose(valid.mean(0), torch.zeros(40), atol=1e-5)  # per-utterance CMVN
    with pytest.raises(ValueError, match="16000 Hz"):
        fe(np.zeros(800, np.float32), sampling_rate=16000)
    unbatched = fe(np.zeros(800, np.float32) + 0.1)["input_features"]
    assert np.asarray(unbatched).shape == (1, 11, 40)


def test_feature_extractor_round_trip_with_global_stats(tmp_path):
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (900, 1700)]
    fe = SpeechRNNFeatureExtractor(feature_size=24, normalize="global", hop_length=40).fit_global_stats(waves)
    feats = fe(waves, return_tensors="pt")["input_features"]
    assert len(fe.mean) == 24 and abs(float(feats[0, :23].mean())) < 1.0
    fe.save_pretrained(tmp_path)
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)  # registered: no trust_remote_code
    assert type(loaded) is SpeechRNNFeatureExtractor
    assert loaded.mean == fe.mean and loaded.hop_length == 40 and loaded.feature_size == 24
    assert torch.equal(loaded(waves, return_tensors="pt")["input_features"], feats)


# -- models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("conv", [(), (16,)])
def test_outputs_do_not_depend_on_padding(cell, conv):
    """An utterance gets the same output alone as inside a padded batch (packing + masked pooling)."""
    _, batch = features()
    n = int(batch["attention_mask"][2].sum())
    alone = {k: v[2:3, :n] for k, v in batch.items()}
    clf = tiny(SpeechRNNForSequenceClassification, cell, conv)
    ctc = tiny(SpeechRNNForCTC, cell, conv)
    with torch.no_grad():
        torch.testing.assert_close(clf(**batch).logits[2], clf(**alone).logits[0], rtol=0, atol=1e-5)
        out, single = ctc(**batch), ctc(**alone)
    length = int(single.output_lengths[0])
    assert int(out.output_lengths[2]) == length == (n if not conv else (n - 1) // 2 + 1)
    torch.testing.assert_close(out.logits[2, :length], single.logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_round_trip_through_auto_classes(tmp_path, cell):
    fe, batch = features()
    for cls, auto in ((SpeechRNNForSequenceClassification, AutoModelForAudioClassification),
                      (SpeechRNNForCTC, AutoModelForCTC)):
        model = tiny(cls, cell)
        folder = tmp_path / cls.__name__
        model.save_pretrained(folder)
        fe.save_pretrained(folder)
        assert AutoConfig.from_pretrained(folder).model_type == "hf_sparse_speech_rnn"
        loaded = auto.from_pretrained(folder).eval()
        assert type(loaded) is cls and isinstance(loaded.speech_rnn.rnn, torch.nn.GRU if cell == "gru" else torch.nn.LSTM)
        loaded_fe = AutoFeatureExtractor.from_pretrained(folder)
        inputs = loaded_fe([np.asarray(w) for w in _waves()], return_tensors="pt")
        with torch.no_grad():
            # weights are bit-identical; only the mmapped (differently aligned) loaded tensors may
            # take a different SIMD path, hence a float32-rounding tolerance
            for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
                assert torch.equal(a, b), k
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)


def _waves():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(np.float32) for n in (3000, 1500, 800)]


def test_ctc_loss_uses_blank_zero_and_true_lengths():
    model = tiny(SpeechRNNForCTC)
    _, batch = features()
    labels = torch.tensor([[1, 2, 3], [4, 4, -100], [10, -100, -100]])
    out = model(**batch, labels=labels)
    logp = out.logits.log_softmax(-1).transpose(0, 1)
    expected = torch.nn.functional.ctc_loss(logp, torch.tensor([1, 2, 3, 4, 4, 10]), out.output_lengths,
                                            torch.tensor([3, 2, 1]), blank=0)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.speech_rnn.rnn.weight_hh_l0_reverse.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vocab_size"):
        model(**batch, labels=torch.tensor([[11], [1], [1]]))


def test_config_rejects_unknown_cell_and_pooling():
    with pytest.raises(ValueError, match="cell"):
        SpeechRNNConfig(cell="rnn")
    with pytest.raises(ValueError, match="pooling"):
        SpeechRNNConfig(pooling="attention")
    model = tiny(SpeechRNNForSequenceClassification, pooling="max")
    _, batch = features()
    assert model(**batch).logits.shape == (3, 10)


# -- CTC decoding and error rates -------------------------------------------------------------
def test_greedy_decoding_collapses_repeats_then_drops_blanks():
    ids = np.array([[1, 1, 0, 1, 2, 2, 0, 0, 3],
                    [0, 5, 5, 5, 0, 5, -100, -100, -100]])
    assert ctc_greedy_decode(ids) == [[1, 1, 2, 3], [5, 5]]
    assert ctc_greedy_decode(ids, lengths=[4, 9]) == [[1, 1], [5, 5]]
    logits = np.eye(4)[[[0, 2, 2, 0, 3]]] * 5.0  # one-hot logits -> ids 0 2 2 0 3
    assert ctc_greedy_decode(logits) == [[2, 3]]


def test_edit_distance_and_cer_by_hand():
    assert edit_distance("12345", "12345") == 0
    assert edit_distance("123", "1234") == 1  # deletion
    assert edit_distance("1234", "124") == 1  # insertion
    assert edit_distance("kitten", "sitting") == 3
    rates = error_rates(["12", "345", "6"], ["123", "345", "78"])
    # edits: 1 (deleted 3) + 0 + 2 (sub 6->7, deleted 8); reference chars 3 + 3 + 2 = 8
    assert rates["cer"] == pytest.approx(3 / 8)
    assert rates["digit_error_rate"] == pytest.approx(2 / 3)


def test_ctc_metrics_from_logits_with_lengths_and_from_argmax_ids():
    # utterance 0 says 1 2 within its 4 frames; its padding frames would add a spurious 3
    logits = torch.tensor(np.eye(11)[[[1, 0, 2, 2, 3, 3], [5, 5, 0, 5, 0, 0]]] * 4.0, dtype=torch.float32)
    lengths = torch.tensor([4, 6])
    labels = np.array([[1, 2, -100], [5, 5, 6]])
    from_logits = ctc_metrics(SimpleNamespace(predictions=(logits.numpy(), lengths.numpy()), label_ids=labels))
    ids = ctc_argmax((logits, lengths), torch.as_tensor(labels))
    assert ids[0, 4:].tolist() == [-100, -100]
    from_ids = ctc_metrics(SimpleNamespace(predictions=ids.numpy(), label_ids=labels))
    assert from_logits == from_ids == {"cer": pytest.approx(1 / 5), "digit_error_rate": pytest.approx(0.5)}


def test_collator_pads_features_and_ctc_labels():
    fe = SpeechRNNFeatureExtractor(feature_size=8)
    rows = [{"input_features": np.ones((5, 8), np.float32), "labels": [3, 4, 5], "speaker": "x"},
            {"input_features": np.ones((2, 8), np.float32), "labels": [7], "speaker": "y"}]
    batch = SpeechCollator(fe)(rows)
    assert batch["input_features"].shape == (2, 5, 8) and batch["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0]
    assert batch["labels"].tolist() == [[3, 4, 5], [7, -100, -100]]
    rows = [{"input_features": np.ones((3, 8), np.float32), "labels": np.int64(2)}] * 2
    assert SpeechCollator(fe)(rows)["labels"].tolist() == [2, 2]


# -- FSDD data --------------------------------------------------------------------------------
def test_official_and_speaker_splits_match_provenance():
    official = load_fsdd(split="official")
    assert (len(official["train"]), len(official["test"])) == (2700, 300)
    assert set(official["test"]["take"]) == set(range(5)) and min(official["train"]["take"]) == 5
    assert np.bincount(official["test"]["labels"]).tolist() == [30] * 10
    speaker = load_fsdd(split="speaker", holdout_speaker="jackson")
    assert (len(speaker["train"]), len(speaker["test"])) == (2500, 500)
    assert set(speaker["test"]["speaker"]) == {"jackson"} and "jackson" not in set(speaker["train"]["speaker"])
    recs, audio, rate = read_fsdd()
    assert rate == 8000 and len(recs) == 3000
    first = official["test"].with_format("numpy")[0]
    assert first["file"] == "recordings/0_george_0.wav" and len(first["audio"]) == 2384  # metadata.csv
    assert first["audio"].dtype == np.float32 and np.abs(first["audio"]).max() == pytest.approx(10354 / 32768)


def test_connected_digits_are_deterministic_and_disjoint():
    a = load_fsdd_digits(num_train=40, num_test=20, seed=3)
    b = load_fsdd_digits(num_train=40, num_test=20, seed=3)
    c = load_fsdd_digits(num_train=40, num_test=20, seed=4)
    assert a["train"]["text"] == b["train"]["text"] and a["test"]["files"] == b["test"]["files"]
    assert np.array_equal(a["train"].with_format("numpy")[7]["audio"], b["train"].with_format("numpy")[7]["audio"])
    assert a["train"]["text"] != c["train"]["text"]
    train_files = {f for fs in a["train"]["files"] for f in fs}
    test_files = {f for fs in a["test"]["files"] for f in fs}
    assert train_files and test_files and not train_files & test_files
    assert all(int(Path(f).stem.split("_")[2]) < 5 for f in test_files)  # official split: takes 0-4 test

    recs, audio, _ = read_fsdd()
    for row in a["train"].with_format("numpy"):
        files, text = list(row["files"]), str(row["text"])
        assert 2 <= len(text) <= 5 and row["labels"].tolist() == [int(d) + 1 for d in text]
        assert len({Path(f).stem.split("_")[1] for f in files}) == 1 == len({row["speaker"]})  # one speaker
        assert [Path(f).stem.split("_")[0] for f in files] == list(text)
        silence = len(row["audio"]) - sum(len(audio[f]) for f in files)
        assert 400 * (len(files) - 1) <= silence <= 1200 * (len(files) - 1)  # 50-150 ms at 8 kHz
    held = load_fsdd_digits(split="speaker", holdout_speaker="theo", num_train=10, num_test=10)
    assert set(held["test"]["speaker"]) == {"theo"} and "theo" not in set(held["train"]["speaker"])


def test_sources_build_bundles_and_the_model_factory_sizes_the_model():
    clf = load_data(DataConfig(name="fsdd", max_train_samples=32, max_eval_samples=8))
    ctc = load_data(DataConfig(name="fsdd_digits", options={"num_train": 16, "num_test": 8,
                                                            "features": {"feature_size": 32}}))
    assert isinstance(clf, DataBundle) and clf.task == "audio-classification" and clf.num_labels == 10
    assert (len(clf.train), len(clf.eval)) == (32, 8)
    assert ctc.task == "ctc" and ctc.label_names[0] == "<blank>" and ctc.num_labels == 11
    assert ctc.info["feature_extractor"].feature_size == 32 and ctc.info["preprocess_logits_for_metrics"]
    for bundle, cls in ((clf, SpeechRNNForSequenceClassification), (ctc, SpeechRNNForCTC)):
        model = build_model(ModelConfig(source="hf_sparse", name="speech_rnn", config={"hidden_size": 8}), bundle)
        assert type(model) is cls
        batch = bundle.collator([bundle.train[i] for i in range(4)])
        out = model(**batch)
        assert torch.isfinite(out.loss)
    assert model.config.num_mel_bins == 32 and model.config.vocab_size == 11 and model.config.id2label[1] == "0"


def test_bad_options_and_folders_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="allowed: holdout_speaker"):
        load_data(DataConfig(name="fsdd", options={"holdout": "theo"}))
    with pytest.raises(DataError, match="speakers: george"):
        load_data(DataConfig(name="fsdd", split="speaker", options={"holdout_speaker": "nobody"}))
    with pytest.raises(DataError, match="official, speaker"):
        load_data(DataConfig(name="fsdd", split="random"))
    with pytest.raises(DataError, match="features"):
        load_data(DataConfig(name="fsdd_digits", options={"features": {"normalize": "maybe"}}))
    with pytest.raises(DataError, match="no .tar.gz"):
        load_data(DataConfig(name="fsdd", path=str(tmp_path)))


def test_user_folder_with_the_same_layout(tmp_path):
    """A tar.gz of ``{digit}_{speaker}_{take}.wav`` files; labels from the names when there is no metadata.csv."""
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "mine.tar.gz", "w:gz") as tf:
        for digit in range(10):
            for take in range(7):
                buf = io.BytesIO()
                with wave.open(buf, "wb") as w:
                    w.setnchannels(1)
                    w.setsampwidth(2)
                    w.setframerate(8000)
                    w.writeframes((rng.standard_normal(600 + 40 * digit) * 3000).astype("<i2").tobytes())
                info = tarfile.TarInfo(f"recordings/{digit}_ann_{take}.wav")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    bundle = load_data(DataConfig(name="fsdd", path=str(tmp_path)))
    assert (len(bundle.train), len(bundle.eval)) == (20, 50)
    assert bundle.card_name == str(tmp_path)
    digits = load_data(DataConfig(name="fsdd_digits", path=str(tmp_path), options={"num_train": 5, "num_test": 5}))
    assert set(digits.train["speaker"]) == {"ann"}


# -- recipes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPEECH_RECIPES)
def test_speech_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.model.name == "speech_rnn" and recipe.data.name.startswith("fsdd")
    if name.endswith("gradual"):
        low = load_recipe(RECIPES / f"{name}.yaml", ["sparsity.target_density=0.05"])
        assert recipe.sparsity.method == "gradual" and low.sparsity.target_density == 0.05



# -- the targets (long: opt in with -m slow) --------------------------------------------
TARGETS = {  # recipe, --set overrides, metric, bound
    "gru_dense": ("fsdd_gru_dense", [], "accuracy", 0.95),
    "gru_gradual_0.10": ("fsdd_gru_gradual", ["sparsity.target_density=0.1"], "accuracy", 0.94),
    "lstm_dense": ("fsdd_lstm_dense", [], "accuracy", 0.95),
    "ctc_dense": ("fsddctc_gru_dense", [], "cer", 0.10),
    "ctc_gradual_0.10": ("fsddctc_gru_gradual", ["sparsity.target_density=0.1"], "cer", 0.10),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TARGETS))
def test_recipe_reaches_its_target(case, tmp_path):
    """The figures of docs/speech.md: each run takes 3-5 minutes on 2 CPU cores."""
    import json

    from hf_sparse.cli import main

    recipe, overrides, metric, bound = TARGETS[case]
    sets = [x for o in [*overrides, "training.disable_tqdm=true"] for x in ("--set", o)]
    assert main(["train", str(RECIPES / f"{recipe}.yaml"), "--output-dir", str(tmp_path), *sets]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    value = results["eval"][metric]
    assert value >= bound if metric == "accuracy" else value <= bound
    if results["target_density"] is not None:
        assert abs(results["achieved_density"] - results["target_density"]) <= 0.01
    # the exported checkpoint (model + feature extractor) loads with plain transformers
    auto = AutoModelForCTC if metric == "cer" else AutoModelForAudioClassification
    model = auto.from_pretrained(tmp_path / "model").eval()
    fe = AutoFeatureExtractor.from_pretrained(tmp_path / "model")
    assert type(fe) is SpeechRNNFeatureExtractor and model.config.num_mel_bins == fe.feature_size
