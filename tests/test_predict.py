"""``hf-sparse predict``: the model's own predictions per file (dense, sparse, ONNX, streaming), timing
columns, and located exit-2 errors for unreadable inputs."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint
from hf_sparse.cli import main
from hf_sparse.data import BUNDLED_DATA
from hf_sparse.data.audio_io import load_audio
from hf_sparse.data.feature_extraction import SpeechRNNFeatureExtractor
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForSequenceClassification
from tests.test_export import make_report


def fsdd_wavs(folder: Path, takes: range = range(5), every: int = 1) -> list[Path]:
    """FSDD recordings of the official test split (takes 0-4), extracted from the bundled archive."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(BUNDLED_DATA / "fsdd" / "fsdd_recordings.tar.gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".wav")
                          and int(Path(m.name).stem.split("_")[-1]) in takes), key=lambda m: m.name)[::every]
        for m in members:
            (folder / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return sorted(folder.glob("*.wav"))


@pytest.fixture(scope="module")
def speech_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    wavs = fsdd_wavs(root / "wavs", every=25)  # 12 files
    fe = SpeechRNNFeatureExtractor(normalize="global").fit_global_stats([load_audio(str(w), 8000) for w in wavs])
    torch.manual_seed(0)
    model = SpeechRNNForSequenceClassification(SpeechRNNConfig(
        hidden_size=32, num_layers=1, bidirectional=False, conv_channels=[16], dropout=0.0,
        id2label={i: str(i) for i in range(10)})).eval()
    with torch.no_grad():
        model.speech_rnn.rnn.weight_hh_l0.mul_(torch.rand(96, 32) < 0.3)
    names = ["speech_rnn.rnn.weight_hh_l0"]
    folder = save_sparse_checkpoint(model, root / "ckpt", report=make_report(model, names), processor=fe,
                                    format="onnx", measure_speed=False)
    return folder, model, fe, wavs


def run_predict(capsys, *argv: str) -> tuple[int, list[list[str]], str]:
    status = main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines() if line and not line.startswith("#")]
    return status, rows, captured.out + captured.err


def test_predict_prints_the_models_own_predictions(speech_checkpoint, capsys):
    folder, model, fe, wavs = speech_checkpoint
    status, rows, text = run_predict(capsys, folder, wavs[0].parent, "--timing")
    assert status == 0 and [Path(r[0]) for r in rows] == wavs
    for row, wav in zip(rows, wavs):
        with torch.no_grad():
            probs = torch.softmax(model(**fe(load_audio(str(wav), 8000), return_tensors="pt")).logits[0], -1)
        assert row[1] == str(int(probs.argmax())) and float(row[2]) == pytest.approx(float(probs.max()), abs=1e-4)
        assert row[3].endswith(" ms") and row[4].startswith("RTF ")
    assert "inputs, " in text and "real-time factor" in text


@pytest.mark.parametrize("extra", [["--runtime", "onnx"], ["--runtime", "sparse"], ["--stream"],
                                   ["--stream", "--chunk-ms", "37"]])
def test_runtimes_and_streaming_agree_with_dense(speech_checkpoint, capsys, extra):
    folder, _, _, wavs = speech_checkpoint
    _, dense, _ = run_predict(capsys, folder, *wavs[:6])
    status, rows, _ = run_predict(capsys, folder, *wavs[:6], *extra)
    assert status == 0 and [r[1] for r in rows] == [r[1] for r in dense]
    np.testing.assert_allclose([float(r[2]) for r in rows], [float(r[2]) for r in dense], atol=1e-4)


def test_unreadable_inputs_exit_2_with_the_file_named(speech_checkpoint, capsys, tmp_path):
    folder, _, _, wavs = speech_checkpoint
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    status, rows, text = run_predict(capsys, folder, wavs[0], bad)
    assert status == 2 and len(rows) == 1  # the good file was answered before the bad one
    assert "hf-sparse predict: error: " in text and "broken.wav" in text and "Traceback" not in text
    status, _, text = run_predict(capsys, folder, tmp_path / "missing.wav")
    assert status == 2 and "missing.wav: no such file or folder" in text
    status, _, text = run_predict(capsys, tmp_path, wavs[0])
    assert status == 2 and "holds no model" in text


@pytest.mark.slow
def test_predict_on_the_fsdd_test_wavs_matches_the_runs_accuracy(tmp_path, capsys):
    """A short real run (global normalisation, streaming-ready); its 300 test WAVs through predict give
    the accuracy the run reported."""
    run = tmp_path / "run"
    assert main(["train", "recipes/fsdd_gru_stream_block.yaml", "--output-dir", str(run), "--set",
                 "training.max_steps=120", "model.config.hidden_size=64", "sparsity.params.freq=5"]) == 0
    capsys.readouterr()
    wavs = fsdd_wavs(tmp_path / "wavs")
    assert len(wavs) == 300
    for extra in ([], ["--stream"]):
        status, rows, _ = run_predict(capsys, run, tmp_path / "wavs", *extra)
        assert status == 0 and len(rows) == 300
        accuracy = np.mean([r[1] == Path(r[0]).name.split("_")[0] for r in rows])
        assert accuracy == pytest.approx(json.loads((run / "results.json").read_text())["eval"]["accuracy"], abs=1e-9)
