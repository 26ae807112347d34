"""Speech data from the user's own audio: audio folders, Hub audio datasets, CTC on any transcript,
augmentation and bad data. Real files (written with soundfile or the stdlib ``wave`` module), real
``datasets`` datasets, the real CLI."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import wave
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoProcessor

from hf_sparse.cli import main
from hf_sparse.config.recipe import AugmentConfig, DataConfig, load_recipe
from hf_sparse.data import DataError, load_data
from hf_sparse.data.audio_folder import feature_extractor_for, holdout_split
from hf_sparse.data.audio_io import decode_audio, write_audio
from hf_sparse.data.feature_extraction import SpeechRNNFeatureExtractor
from hf_sparse.data.fsdd import _decode_wav, load_fsdd, load_fsdd_digits, read_fsdd
from hf_sparse.data.speech import augment_settings, featurize, spec_augment, text_error_rates
from hf_sparse.data.speech_processor import (
    SpeechRNNProcessor,
    build_vocab,
    ctc_tokenizer,
    normalize_transcript,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RECIPE = """
model:
  source: hf_sparse
  name: speech_rnn
  config: {{cell: gru, hidden_size: 16, num_layers: 1, bidirectional: true, conv_channels: [8], dropout: 0.0}}
data:
  name: audio_folder
  path: {path}
training:
  max_steps: 4
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 8
  learning_rate: 0.01
  seed: 0
  disable_tqdm: true
  dataloader_num_workers: 0
"""


def tone(freq: float, rate: int, seconds: float = 0.3, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28)) + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def write_wave(path: Path, audio: np.ndarray, rate: int) -> None:
    """16-bit PCM with the stdlib wave module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes())


def tone_folder(root: Path, rate: int, channels: int = 1, ext: str = ".wav", splits=("train", "test"),
                per_class: int = 6, use_wave: bool = False) -> Path:
    for s, split in enumerate(splits):
        for label, freq in (("high", 1500.0), ("low", 300.0)):
            for i in range(per_class):
                audio = tone(freq, rate, channels=channels, seed=100 * s + i)
                path = root / split / label / f"{label}_{i}{ext}"
                if use_wave:
                    write_wave(path, audio, rate)
                else:
                    write_audio(path, audio, rate)
    return root


def recipe_file(tmp_path: Path, path: Path, extra: str = "") -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(TINY_RECIPE.format(path=path) + extra)
    return p


def run_card_example(ckpt: Path, wav: Path, capsys) -> str:
    """Run the model card's raw-audio example on ``wav`` and return what it prints."""
    card = (ckpt / "README.md").read_text()
    code = card.split("### From raw audio", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    capsys.readouterr()
    exec(code.replace("<repo_id>", str(ckpt)).replace('"clip.wav"', repr(str(wav)))
         .replace('"speech.wav"', repr(str(wav))), {})
    return capsys.readouterr().out.strip()


def train(recipe: Path, out: Path, *sets: str) -> dict:
    args = ["train", str(recipe), "--output-dir", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


# -- reading audio ---------------------------------------------------------------------------------
def test_decoder_matches_the_wave_module_and_mixes_stereo(tmp_path):
    x = tone(440, 8000)
    write_wave(tmp_path / "a.wav", x, 8000)
    y, rate = decode_audio(tmp_path / "a.wav")
    reference, ref_rate = _decode_wav((tmp_path / "a.wav").read_bytes(), "a.wav")  # the stdlib wave path of fsdd
    assert rate == ref_rate == 8000 and np.array_equal(y, reference)
    stereo = tone(440, 44100, channels=2)
    write_audio(tmp_path / "s.flac", stereo, 44100)
    mono, rate = decode_audio(tmp_path / "s.flac")
    assert rate == 44100 and mono.ndim == 1 and np.allclose(mono, stereo.mean(1), atol=1e-4)


def test_fsdd_as_audio_folder_gives_identical_features(tmp_path):
    """8 kHz files at an 8 kHz extractor: the same features as data.name fsdd, label by label."""
    recs, audio, rate = read_fsdd()
    chosen = [r for r in recs if r.speaker == "jackson" and r.take in (0, 1, 7, 8)]
    for r in chosen:
        split = "test" if r.take < 5 else "train"
        write_audio(tmp_path / split / WORDS[r.digit] / Path(r.file).name, audio[r.file], rate)
    bundle = load_data(DataConfig(name="audio_folder", path=str(tmp_path)))
    assert bundle.task == "audio-classification" and bundle.info["sampling_rate"] == 8000
    assert bundle.label_names == sorted(WORDS) and len(bundle.train) == 20 and len(bundle.eval) == 20
    fe = bundle.info["feature_extractor"]
    assert (fe.n_fft, fe.win_length, fe.hop_length) == (256, 200, 80)
    reference = featurize(load_fsdd()["test"], SpeechRNNFeatureExtractor(sampling_rate=8000))
    ref = {Path(f).name: (np.asarray(x), int(y)) for f, x, y in
           zip(reference["file"], reference["input_features"], reference["labels"])}
    files = bundle.eval.with_format(None)._data.column("input_features").to_pylist()
    for i, f in enumerate(files):
        row = bundle.eval[i]
        feats, digit = ref[Path(f).name]
        assert np.array_equal(np.asarray(row["input_features"]), feats)
        assert bundle.label_names[row["labels"]] == WORDS[digit]


@pytest.mark.parametrize("rate,channels,ext,expected", [(16000, 1, ".flac", 16000), (44100, 2, ".wav", 16000),
                                                        (8000, 1, ".wav", 8000)])
def test_any_rate_and_stereo_train_through_one_recipe(tmp_path, capsys, rate, channels, ext, expected):
    folder = tone_folder(tmp_path / "data", rate, channels, ext, use_wave=rate == 8000)
    results = train(recipe_file(tmp_path, folder), tmp_path / "run")
    assert results["train_steps"] == 4 and np.isfinite(results["eval"]["loss"]) and "accuracy" in results["eval"]
    # the card's raw-audio example runs as written on a file of the folder (any rate, stereo included)
    assert run_card_example(tmp_path / "run" / "model", folder / "test" / "low" / f"low_0{ext}", capsys) in ("low", "high")
    fe = AutoFeatureExtractor.from_pretrained(tmp_path / "run" / "model")
    assert fe.sampling_rate == expected and fe.hop_length == expected // 100
    # 0.3 s clips resampled to the extractor's rate: 1 + samples // hop frames
    bundle = load_data(DataConfig(name="audio_folder", path=str(folder)))
    assert np.asarray(bundle.eval[0]["input_features"]).shape == (1 + int(0.3 * expected) // (expected // 100), 40)


def test_train_only_folder_gets_a_seeded_stratified_eval_split(tmp_path, caplog):
    folder = tone_folder(tmp_path, 8000, splits=("train",), per_class=10)
    with caplog.at_level(logging.WARNING):
        a = load_data(DataConfig(name="audio_folder", path=str(folder), eval_fraction=0.2, seed=3))
    assert "holding out 4 of 20 training files" in caplog.text and "stratified" in caplog.text
    b = load_data(DataConfig(name="audio_folder", path=str(folder), eval_fraction=0.2, seed=3))
    assert sorted(a.eval.with_format(None)["labels"]) == [0, 0, 1, 1] and len(a.train) == 16
    assert a.eval.with_format(None)["input_features"] == b.eval.with_format(None)["input_features"]
    train, held = holdout_split(10, ["x"] * 7 + ["y"] * 3, 0.1, 0)
    assert len(held) == 2 and sorted(set(range(10)) - set(held)) == train  # one of each class at least


# -- CTC on any transcript -------------------------------------------------------------------------
def test_transcript_normalisation_vocab_and_tokenizer_decoding():
    assert normalize_transcript("  Well-known, ISN'T it?\tÉté! ") == "well known isn't it été"
    vocab = build_vocab(["ab ba", "cab"])
    assert vocab == ["<pad>", "<unk>", "|", "a", "b", "c"]
    tok = ctc_tokenizer(vocab)
    assert tok("ab ba").input_ids == [3, 4, 2, 4, 3] and tok.pad_token_id == 0 and len(tok) == len(vocab)
    # CTC collapsing: repeats merge, blanks (0) go, the delimiter becomes a space
    assert tok.batch_decode([[0, 3, 3, 0, 4, 2, 2, 4, 0, 4, 3]]) == ["ab bba"]
    assert text_error_rates(["ab bba"], ["ab ba"]) == {"cer": 0.2, "wer": 0.5}


def ctc_folder(root: Path, num_train: int = 24, num_test: int = 8, unknown_char: bool = False) -> Path:
    _, _, rate = read_fsdd()
    dd = load_fsdd_digits(num_train=num_train, num_test=num_test, seed=0)
    for split, ds in dd.items():
        rows = []
        for i, ex in enumerate(ds.with_format("numpy")):
            write_audio(root / split / f"{i}.wav", ex["audio"], rate)
            text = " ".join(WORDS[int(d)] for d in str(ex["text"]))
            rows.append({"file_name": f"{i}.wav", "transcription": text.title() + "."})
        if unknown_char and split == "test":
            rows[0]["transcription"] = "zéro one"
        with open(root / split / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "transcription"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def test_ctc_folder_trains_reports_cer_wer_and_decodes_raw_audio(tmp_path, caplog, capsys):
    folder = ctc_folder(tmp_path / "data", unknown_char=True)
    with caplog.at_level(logging.WARNING):
        results = train(recipe_file(tmp_path, folder), tmp_path / "run")
    assert "'é' (1 transcript(s), e.g. test/0.wav)" in caplog.text
    assert {"cer", "wer"} <= set(results["eval"]) and results["train_steps"] == 4
    ckpt = tmp_path / "run" / "model"
    processor = AutoProcessor.from_pretrained(ckpt)
    assert isinstance(processor, SpeechRNNProcessor) and processor.feature_extractor.sampling_rate == 8000
    vocab = processor.tokenizer.convert_ids_to_tokens(list(range(len(processor.tokenizer))))
    assert vocab[:3] == ["<pad>", "<unk>", "|"] and set(vocab[3:]) == set("efghinorstuvwxz")
    assert AutoFeatureExtractor.from_pretrained(ckpt).sampling_rate == 8000
    model = AutoModelForCTC.from_pretrained(ckpt).eval()
    assert model.config.vocab_size == len(vocab)
    audio, rate = decode_audio(folder / "test" / "1.wav")
    inputs = processor(audio, sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    text = processor.batch_decode(logits.argmax(-1))
    assert isinstance(text[0], str) and set(text[0]) <= set("efghinorstuvwxz '")
    assert run_card_example(ckpt, folder / "test" / "1.wav", capsys) == text[0]


def test_fsdd_digits_keeps_its_digit_vocabulary():
    bundle = load_data(DataConfig(name="fsdd_digits", options={"num_train": 4, "num_test": 4}))
    assert bundle.label_names == ["<blank>", *map(str, range(10))]
    tokenizer = bundle.info["processor"].tokenizer
    assert len(tokenizer) == 11 and tokenizer.batch_decode([[0, 4, 4, 0, 2, 5, 0]]) == ["314"]


# -- Hub audio datasets ------------------------------------------------------------------------------
def audio_dict(root: Path, kind: str, splits: dict[str, int]) -> datasets.DatasetDict:
    """A Speech Commands-like (ClassLabel) or LibriSpeech-like (text) dataset, audio bytes embedded."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in splits.items():
        rows = {"audio": [], "label" if kind == "classes" else "text": [], "speaker_id": []}
        for i in range(n):
            label = i % 2
            path = write_audio(root / "src" / split / f"{i}.wav", tone((300.0, 1500.0)[label], 16000, seed=i), 16000)
            rows["audio"].append({"bytes": path.read_bytes(), "path": f"{split}/{i}.wav"})
            if kind == "classes":
                rows["label"].append(label)
            else:
                rows["text"].append(["LOW TONE", "HIGH TONE"][label] if i else "HIGH, TONE!")
            rows["speaker_id"].append(str(rng.integers(5)))
        ds = datasets.Dataset.from_dict(rows)  # bytes/path structs, cast (not encoded: that needs torchcodec)
        ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
        if kind == "classes":
            ds = ds.cast_column("label", datasets.ClassLabel(names=["yes", "no"]))
        out[split] = ds
    return datasets.DatasetDict(out)


@pytest.mark.parametrize("kind", ["classes", "text"])
def test_hub_audio_dataset_end_to_end(tmp_path, kind):
    saved = tmp_path / "hub_copy"
    audio_dict(tmp_path, kind, {"train": 12, "validation": 6}).save_to_disk(str(saved))
    recipe = recipe_file(tmp_path, "unused")
    results = train(recipe, tmp_path / "run", "data.name=fashion_mnist", "data.path=null", f"data.hub_id={saved}")
    bundle = load_data(DataConfig(hub_id=str(saved)))
    assert bundle.task == ("audio-classification" if kind == "classes" else "ctc")
    assert bundle.info["sampling_rate"] == 16000 and len(bundle.train) == 12 and len(bundle.eval) == 6
    if kind == "classes":
        assert bundle.label_names == ["yes", "no"] and "accuracy" in results["eval"]
        assert bundle.eval.with_format(None)["labels"] == [0, 1] * 3
    else:
        assert {"cer", "wer"} <= set(results["eval"])
        assert bundle.label_names == ["<pad>", "<unk>", "|", *sorted(set("lowtonehigh"))]
        ids = [bundle.label_names.index(c) for c in ["h", "i", "i", "<pad>", "i", "|", "t"]]
        assert AutoProcessor.from_pretrained(tmp_path / "run" / "model").batch_decode([ids]) == ["hii t"]


def test_hub_audio_from_a_local_parquet_repo_and_column_choice(tmp_path):
    """datasets.load_dataset on a folder laid out like a Hub repo (split-named parquet files)."""
    dd = audio_dict(tmp_path, "classes", {"train": 8, "test": 4})
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    bundle = load_data(DataConfig(hub_id=str(repo)))
    assert bundle.task == "audio-classification" and len(bundle.eval) == 4
    with pytest.raises(DataError, match="no split 'dev'"):
        load_data(DataConfig(hub_id=str(repo), eval_split="dev"))
    with pytest.raises(DataError, match="no column 'words'"):
        load_data(DataConfig(hub_id=str(repo), text_column="words"))


# -- recipes for the field's standard sets, on tiny local stand-ins -----------------------------------
STAND_INS = {
    "speech_commands_gru_gradual": ("classes", {"train": 8, "validation": 4, "test": 4}),
    "speech_commands_gru_gradual_block": ("classes", {"train": 8, "validation": 4, "test": 4}),
    "librispeech_gru_ctc_gradual": ("text", {"train.100": 8, "validation": 4}),
}


@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_hub_recipes_validate_and_run_on_stand_ins(tmp_path, name, size):
    """Everything of the recipe but the Hub id (and, by default, the GRU width: the full-size
    LibriSpeech model takes about a minute for three steps here)."""
    kind, splits = STAND_INS[name]
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.data.hub_id in ("google/speech_commands", "openslr/librispeech_asr")
    assert recipe.data.config_name in ("v0.02", "clean")
    assert (recipe.data.augment is not None) == name.startswith("librispeech")
    saved = tmp_path / "stand_in"
    audio_dict(tmp_path, kind, splits).save_to_disk(str(saved))
    results = train(REPO / "recipes" / f"{name}.yaml", tmp_path / "run", f"data.hub_id={saved}",
                    "training.max_steps=3", "training.per_device_train_batch_size=4", "training.eval_strategy=no",
                    "training.dataloader_num_workers=0", "training.disable_tqdm=true", "sparsity.params.freq=1",
                    *(["model.config.hidden_size=32"] if size == "small" else []))
    assert results["train_steps"] == 3 and results["method"] == "gradual"


def test_folder_ctc_recipe_validates(tmp_path):
    folder = ctc_folder(tmp_path / "data", num_train=6, num_test=2)
    assert main(["validate", str(REPO / "recipes" / "audio_folder_ctc_gru.yaml"), "--set", f"data.path={folder}"]) == 0


# -- augmentation ---------------------------------------------------------------------------------
def test_augmentation_is_off_by_default_and_seeded():
    assert augment_settings(None) is None and augment_settings(AugmentConfig()) is None
    feats = np.ones((50, 40), np.float32)
    a = spec_augment(feats, np.random.default_rng(0), 2, 10, 2, 8)
    b = spec_augment(feats, np.random.default_rng(0), 2, 10, 2, 8)
    assert np.array_equal(a, b) and 0 < (a == 0).mean() < 1
    assert (a == 0).all(1).sum() <= 20 and (a == 0).all(0).sum() <= 16  # two masks of at most 10 frames / 8 bins


def test_augmentation_applies_to_the_training_split_only(tmp_path):
    folder = tone_folder(tmp_path, 16000, per_class=2)
    aug = AugmentConfig(time_masks=2, time_mask_width=5, freq_masks=1, freq_mask_width=5, speed=[0.9, 1.1],
                        noise_snr_db=[20, 30])
    plain = load_data(DataConfig(name="audio_folder", path=str(folder)))
    bundle = load_data(DataConfig(name="audio_folder", path=str(folder), augment=aug))
    files = bundle.train.with_format(None)["input_features"]
    same = plain.train.with_format(None)["input_features"]
    assert files == same
    x = np.asarray(bundle.train[0]["input_features"])
    torch.manual_seed(123)  # the draws depend on (data.seed, epoch, clip) only, not on global generators
    y = np.asarray(bundle.train[0]["input_features"])
    assert np.array_equal(x, y) and not np.array_equal(x, np.asarray(plain.train[0]["input_features"])[: len(x)])
    callback = bundle.info["callbacks"][0]
    callback.on_epoch_begin(None, type("State", (), {"epoch": 1.0})(), None)
    assert not np.array_equal(np.asarray(bundle.train[0]["input_features"]), x)  # a new epoch draws afresh
    assert np.array_equal(np.asarray(bundle.eval[0]["input_features"]), np.asarray(plain.eval[0]["input_features"]))
    fsdd = load_data(DataConfig(name="fsdd", max_train_samples=8, augment=AugmentConfig(time_masks=1, time_mask_width=3)))
    assert np.asarray(fsdd.train[0]["input_features"]).shape[1] == 40
    with pytest.raises(DataError, match="waveform"):
        load_data(DataConfig(name="fsdd", augment=AugmentConfig(speed=[1.1])))


# -- bad data -------------------------------------------------------------------------------------
def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    folder = tone_folder(tmp_path, 8000, per_class=3)
    (folder / "train" / "low" / "broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    write_wave(folder / "train" / "low" / "empty.wav", np.zeros(0, np.float32), 8000)
    write_wave(folder / "train" / "high" / "long.wav", tone(1500, 8000, seconds=3.0), 8000)
    write_wave(folder / "train" / "high" / "silence.wav", np.zeros(2400, np.float32), 8000)
    with caplog.at_level(logging.WARNING):
        bundle = load_data(DataConfig(name="audio_folder", path=str(folder), max_duration_s=1.0))
        rows = [bundle.train[i] for i in range(len(bundle.train))]
    assert len(bundle.train) == 7  # 3 + 3 good, the silent file kept; broken, empty and long skipped
    assert "skipped 1 file(s) that cannot be read: train/low/broken.wav" in caplog.text
    assert "skipped 1 file(s) with no audio samples: train/low/empty.wav" in caplog.text
    assert "longer than max_duration_s=1: train/high/long.wav (3.0 s)" in caplog.text
    assert "silence.wav is silence" in caplog.text
    assert all(np.isfinite(np.asarray(r["input_features"])).all() for r in rows)


def test_structural_problems_are_located_recipe_errors(tmp_path, capsys):
    folder = tone_folder(tmp_path / "data", 8000, per_class=2)
    (folder / "train" / "maybe").mkdir()
    recipe = recipe_file(tmp_path, folder)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path" in err[0] and "train/maybe: the label folder 'maybe' holds no audio" in err[0]
    (folder / "train" / "maybe").rmdir()
    write_wave(folder / "test" / "other" / "x.wav", tone(800, 8000), 8000)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "test/other/x.wav has label 'other', which no training file has" in err and "Traceback" not in err
    with pytest.raises(DataError, match="needs data.path"):
        load_data(DataConfig(name="audio_folder"))
    with pytest.raises(DataError, match="metadata.csv"):
        load_data(DataConfig(name="audio_folder", path=str(folder), task="ctc"))


def test_global_normalisation_is_fitted_on_the_training_files(tmp_path):
    folder = tone_folder(tmp_path, 16000, per_class=3)
    bundle = load_data(DataConfig(name="audio_folder", path=str(folder), options={"features": {"normalize": "global"}}))
    fe = bundle.info["feature_extractor"]
    files = bundle.train.with_format(None)["input_features"]
    reference = SpeechRNNFeatureExtractor(sampling_rate=16000, n_fft=512, win_length=400, hop_length=160,
                                          normalize="global").fit_global_stats([decode_audio(f)[0] for f in files])
    assert np.allclose(fe.mean, reference.mean) and np.allclose(fe.std, reference.std)


def test_feature_extractor_windows_follow_the_rate():
    fe = feature_extractor_for({}, 16000)
    assert (fe.sampling_rate, fe.n_fft, fe.win_length, fe.hop_length) == (16000, 512, 400, 160)
    fe = feature_extractor_for({"sampling_rate": 8000, "hop_length": 40}, 16000)
    assert (fe.sampling_rate, fe.n_fft, fe.hop_length) == (8000, 256, 40)
    with pytest.raises(DataError, match="win_length"):
        feature_extractor_for({"win_length": 1000, "n_fft": 256}, 8000)


def test_augmented_run_is_reproducible_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    folder = tone_folder(tmp_path / "data", 8000, per_class=6)
    augment = ("\n  augment: {time_masks: 2, time_mask_width: 5, freq_masks: 1, freq_mask_width: 6, "
               "speed: [0.9, 1.1], noise_snr_db: [10, 30]}\n")
    text = TINY_RECIPE.format(path=folder).replace("  path: " + str(folder) + "\n", "  path: " + str(folder) + augment)
    recipe = tmp_path / "aug.yaml"
    recipe.write_text(text.replace("max_steps: 4", "max_steps: 8\n  save_strategy: steps\n  save_steps: 4"))
    train(recipe, tmp_path / "a")
    train(recipe, tmp_path / "b")
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "c" / "checkpoint-4")
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "c"), "--resume",
                 str(tmp_path / "c" / "checkpoint-4")]) == 0
    weights = {k: load_file(tmp_path / k / "model" / "model.safetensors") for k in "abc"}
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][name]) and torch.equal(tensor, weights["c"][name]), name


def test_metadata_problems_name_the_csv_line_and_the_key(tmp_path):
    folder = tmp_path / "data"
    write_audio(folder / "a.wav", tone(300, 8000), 8000)
    meta = folder / "metadata.csv"
    meta.write_text("file_name,label,transcription\na.wav,yes,hello\nb.wav,no,bye\n")
    with pytest.raises(DataError, match=r"metadata.csv:3: file_name 'b.wav' is not a file") as err:
        load_data(DataConfig(name="audio_folder", path=str(folder), task="ctc"))
    write_audio(folder / "b.wav", tone(1500, 8000), 8000)
    with pytest.raises(DataError, match="set data.task") as err:
        load_data(DataConfig(name="audio_folder", path=str(folder)))
    assert err.value.key == "task"
    meta.write_text("name,label\na.wav,yes\n")
    with pytest.raises(DataError, match="needs a header with a file_name column"):
        load_data(DataConfig(name="audio_folder", path=str(folder)))
    write_audio(folder / "c.wav", tone(300, 8000, seed=1), 8000)
    write_audio(folder / "d.wav", tone(1500, 8000, seed=1), 8000)
    meta.write_text("file_name,label,transcription\na.wav,yes,hello\nb.wav,no,bye\nc.wav,yes,hi\nd.wav,no,ciao\n")
    bundle = load_data(DataConfig(name="audio_folder", path=str(folder), task="audio-classification",
                                  eval_fraction=0.1))
    assert bundle.label_names == ["no", "yes"] and len(bundle.train) == len(bundle.eval) == 2  # one of each class


# -- the targets (long: opt in with -m slow) -------------------------------------------------
@pytest.mark.slow
def test_fsdd_as_folders_trains_like_fsdd(tmp_path):
    """docs/speech.md, "Results: FSDD as your own data": 3-6 minutes per run on 2 CPU cores."""
    import importlib.util

    from hf_sparse import load_sparse

    spec = importlib.util.spec_from_file_location("make_folders", REPO / "bench" / "make_fsdd_audio_folder.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    make.write_classes(tmp_path / "classes")
    results = train(REPO / "recipes" / "fsdd_gru_dense.yaml", tmp_path / "run", "data.name=audio_folder",
                    f"data.path={tmp_path / 'classes'}", "training.disable_tqdm=true")
    assert results["eval"]["accuracy"] >= 0.9667  # data.name fsdd: 97.67% with this recipe, within 1 point
    ckpt = tmp_path / "run" / "model"
    bundle = load_data(DataConfig(name="audio_folder", path=str(tmp_path / "classes")))
    batch = bundle.collator([bundle.eval[i] for i in range(32)])
    batch.pop("labels")
    with torch.no_grad():
        dense = load_sparse(ckpt).eval()(**batch).logits
        sparse = load_sparse(ckpt, runtime="sparse").eval()(**batch).logits
    assert torch.allclose(dense, sparse, atol=1e-5)
