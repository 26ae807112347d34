"""transformers pipelines on hf_sparse speech checkpoints, in a fresh process after ``import hf_sparse``:
``audio-classification`` on raw arrays (with their rate), from a folder and from a (loopback) Hub repo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hf_sparse.checkpoint.hub import push_to_hub
from tests.conftest import HUB_TOKEN
from tests.helpers import launch_env
from tests.test_predict import fsdd_wavs, speech_checkpoint  # noqa: F401  (the fixture)

PIPELINE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from transformers import pipeline
    import hf_sparse  # with transformers imported, this registers hf_sparse's models with the Auto classes
    model, audio = sys.argv[1], np.load(sys.argv[2])
    classify = pipeline("audio-classification", model=model, top_k=3)
    print(json.dumps([classify({"raw": a, "sampling_rate": 8000}) for a in audio]))
""")


def run_pipeline(model: str, audio: list[np.ndarray], tmp_path, env: dict | None = None) -> list:
    arrays = tmp_path / "audio.npy"
    np.save(arrays, np.array(audio, dtype=object), allow_pickle=True)
    done = subprocess.run([sys.executable, "-c", PIPELINE.replace("np.load(sys.argv[2])",
                                                                   "np.load(sys.argv[2], allow_pickle=True)"),
                           model, str(arrays)], capture_output=True, text=True, timeout=300,
                          env={**launch_env(), "HF_HUB_OFFLINE": "0", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def expected(model, fe, audio: np.ndarray) -> list[tuple[str, float]]:
    with torch.no_grad():
        probs = torch.softmax(model(**fe(audio, return_tensors="pt")).logits[0], -1)
    top = probs.topk(3)
    return [(model.config.id2label[int(i)], float(p)) for p, i in zip(top.values, top.indices)]


@pytest.mark.slow
def test_audio_classification_pipeline_from_a_folder_and_the_hub(speech_checkpoint, hub, tmp_path):  # noqa: F811
    folder, model, fe, wavs = speech_checkpoint
    from hf_sparse.data.audio_io import load_audio

    audio = [load_audio(str(w), 8000) for w in wavs[:3]]
    want = [expected(model, fe, a) for a in audio]
    push_to_hub(folder, "carol/fsdd-gru-stream", token=HUB_TOKEN, endpoint=hub.url)
    for source, env in ((str(folder), None),
                        ("carol/fsdd-gru-stream", {"HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN,
                                                   "HF_HOME": str(tmp_path / "hf_home")})):
        got = run_pipeline(source, audio, tmp_path, env)
        for rows, ref in zip(got, want):  # sorted by score, best first
            rows = rows[:3]
            assert [r["label"] for r in rows] == [label for label, _ in ref]
            np.testing.assert_allclose([r["score"] for r in rows], [p for _, p in ref], atol=1e-5)


ASR = textwrap.dedent("""
    import json, sys
    import numpy as np
    from transformers import pipeline
    import hf_sparse  # noqa: F401
    asr = pipeline("automatic-speech-recognition", model=sys.argv[1])
    audio = np.load(sys.argv[2])
    print(json.dumps([asr({"raw": a, "sampling_rate": 8000})["text"] for a in audio]))
""")


@pytest.mark.slow
def test_asr_pipeline_on_a_ctc_checkpoint_with_its_processor(tmp_path):
    from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint
    from hf_sparse.models.feature_extraction import SpeechRNNFeatureExtractor
    from hf_sparse.models.speech_processor import SpeechRNNProcessor, ctc_tokenizer
    from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC
    from tests.test_export import make_report

    vocab = ["<blank>", *"0123456789"]
    fe = SpeechRNNFeatureExtractor(normalize="none")
    processor = SpeechRNNProcessor(feature_extractor=fe, tokenizer=ctc_tokenizer(vocab))
    torch.manual_seed(0)
    model = SpeechRNNForCTC(SpeechRNNConfig(hidden_size=32, num_layers=1, bidirectional=False, conv_channels=[16],
                                            vocab_size=len(vocab), id2label=dict(enumerate(vocab)))).eval()
    folder = save_sparse_checkpoint(model, tmp_path / "ctc", report=make_report(model, ["speech_rnn.rnn.weight_hh_l0"]),
                                    processor=processor, measure_speed=False)
    rng = np.random.default_rng(0)
    audio = np.stack([rng.standard_normal(8000).astype(np.float32) * 0.1 for _ in range(3)])
    np.save(tmp_path / "audio.npy", audio)
    with torch.no_grad():
        want = processor.batch_decode(model(**fe(list(audio), return_tensors="pt")).logits.argmax(-1))
    done = subprocess.run([sys.executable, "-c", ASR, str(folder), str(tmp_path / "audio.npy")], capture_output=True,
                          text=True, timeout=300, env=launch_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want and any(want)
