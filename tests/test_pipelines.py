"""transformers pipelines on hf_sparse checkpoints, in a fresh process after ``import hf_sparse``:
``audio-classification`` and ``automatic-speech-recognition`` on WAV paths (no FFmpeg here) and on
arrays with their rate, ``image-classification`` on PIL images for hf_sparse's LeNet, a transformers
ViT and timm models (grey and RGB), from folders and from a (loopback) Hub repo."""

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


def ctc_checkpoint(folder, fe):
    """A small unidirectional CTC model over the digits, saved to ``folder`` with its processor."""
    from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint
    from hf_sparse.data.speech_processor import SpeechRNNProcessor, ctc_tokenizer
    from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC
    from tests.test_export import make_report

    vocab = ["<blank>", *"0123456789"]
    processor = SpeechRNNProcessor(feature_extractor=fe, tokenizer=ctc_tokenizer(vocab))
    torch.manual_seed(0)
    model = SpeechRNNForCTC(SpeechRNNConfig(hidden_size=32, num_layers=1, bidirectional=False, conv_channels=[16],
                                            vocab_size=len(vocab), id2label=dict(enumerate(vocab)))).eval()
    saved = save_sparse_checkpoint(model, folder, report=make_report(model, ["speech_rnn.rnn.weight_hh_l0"]),
                                   processor=processor, measure_speed=False)
    return model, processor, saved


@pytest.mark.slow
def test_asr_pipeline_on_a_ctc_checkpoint_with_its_processor(tmp_path):
    from hf_sparse.data.feature_extraction import SpeechRNNFeatureExtractor

    fe = SpeechRNNFeatureExtractor(normalize="none")
    model, processor, folder = ctc_checkpoint(tmp_path / "ctc", fe)
    rng = np.random.default_rng(0)
    audio = np.stack([rng.standard_normal(8000).astype(np.float32) * 0.1 for _ in range(3)])
    np.save(tmp_path / "audio.npy", audio)
    with torch.no_grad():
        want = processor.batch_decode(model(**fe(list(audio), return_tensors="pt")).logits.argmax(-1))
    done = subprocess.run([sys.executable, "-c", ASR, str(folder), str(tmp_path / "audio.npy")], capture_output=True,
                          text=True, timeout=300, env=launch_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want and any(want)


ALL_PIPELINES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import hf_sparse  # first: the models register once transformers is imported, in either order
    from PIL import Image
    from transformers import pipeline
    jobs, out = json.loads(open(sys.argv[1]).read()), []
    for task, model, inputs in jobs:
        run = pipeline(task, model=model)
        for x in inputs:
            if task == "image-classification":
                got = run(Image.open(x), top_k=3)
            elif task == "automatic-speech-recognition":
                got = run(x)["text"]
            else:
                got = run(x if isinstance(x, str) else {"raw": np.array(x["raw"], dtype=np.float32),
                                                         "sampling_rate": x["rate"]}, top_k=3)
            out.append(got)
    print(json.dumps(out))
""")


def _image_checkpoints(root, hub) -> tuple[list, list]:
    """LeNet (grey), a ViT fed replicated grey images, timm grey and timm RGB resized: their folders,
    the PIL images to classify (as files), and the top-3 each model gives on the collator's inputs."""
    import timm
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageClassification

    from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint
    from hf_sparse.data.idx import ImageCollator
    from hf_sparse.data.resize import ResizingCollator
    from hf_sparse.models.lenet import LeNetConfig, LeNetForImageClassification
    from tests.test_export import make_report

    labels = [f"class{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    pixels = [(rng.random((28, 28)) * 255).astype(np.uint8) for _ in range(2)]
    files = []
    for i, a in enumerate(pixels):
        files.append(str(root / f"image{i}.png"))
        Image.fromarray(a).convert("RGB").save(files[-1])  # as a user's photo would come: RGB
    grey = ImageCollator(0.286, 0.353, (1, 28, 28))
    torch.manual_seed(0)
    timm_grey = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    timm_rgb = timm.create_model("resnet18", num_classes=10, in_chans=3).eval()
    for m in (timm_grey, timm_rgb):
        m.pretrained_cfg = {**m.pretrained_cfg, "label_names": labels}
    cases = {
        "lenet": (LeNetForImageClassification(LeNetConfig(variant="5", num_labels=10, id2label=dict(enumerate(labels)))),
                  grey, "conv1.weight", 1e-5),
        "vit": (AutoModelForImageClassification.from_config(AutoConfig.for_model(
            "vit", image_size=28, patch_size=7, num_channels=3, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, num_labels=10, id2label=dict(enumerate(labels)))),
            ResizingCollator(grey, None, 3), "vit.layers.0.mlp.fc2.weight", 1e-5),
        "timm_grey": (timm_grey, grey, "layer1.0.conv1.weight", 1e-5),
        # resized: PIL's antialiased bilinear against torch's, a few thousandths apart
        "timm_rgb_32": (timm_rgb, ResizingCollator(grey, 32, 3), "layer1.0.conv1.weight", 2e-2),
    }
    jobs, want = [], []
    for name, (model, collator, target, atol) in cases.items():
        model.eval()
        folder = save_sparse_checkpoint(model, root / name, report=make_report(model, [target]),
                                        processor=collator.image_processor(), measure_speed=False)
        source = str(folder)
        if name == "lenet":  # one of them through the Hub
            push_to_hub(folder, "carol/lenet-pipeline", token=HUB_TOKEN, endpoint=hub.url)
            source = "carol/lenet-pipeline"
        batch = collator([{"pixel_values": a.reshape(-1), "labels": 0} for a in pixels])["pixel_values"]
        with torch.no_grad():
            logits = model(batch)
        probs = torch.softmax(getattr(logits, "logits", logits), -1).topk(3)
        jobs.append(("image-classification", source, files))
        want += [([labels[int(j)] for j in idx], p.tolist(), atol) for p, idx in zip(probs.values, probs.indices)]
    return jobs, want


def test_every_pipeline_in_a_fresh_process_from_files_and_the_hub(speech_checkpoint, hub, tmp_path):  # noqa: F811
    """WAV paths and arrays for the speech pipelines, PIL images for the image ones; hf_sparse
    imported before transformers; one checkpoint pulled from the loopback Hub."""
    from hf_sparse.data.audio_io import load_audio

    folder, model, fe, wavs = speech_checkpoint
    audio = [load_audio(str(w), 8000) for w in wavs[:2]]
    jobs = [("audio-classification", str(folder),
             [str(wavs[0]), {"raw": audio[1].tolist(), "rate": 8000}])]
    want = [(expected(model, fe, a), None) for a in audio]

    ctc, processor, ctc_folder = ctc_checkpoint(tmp_path / "ctc", fe)
    jobs.append(("automatic-speech-recognition", str(ctc_folder), [str(w) for w in wavs[:2]]))
    with torch.no_grad():
        texts = processor.batch_decode(ctc(**fe(audio, return_tensors="pt")).logits.argmax(-1))

    image_jobs, image_want = _image_checkpoints(tmp_path, hub)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs + image_jobs))
    env = {**launch_env(), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN,
           "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}  # (no ffmpeg on this PATH)
    done = subprocess.run([sys.executable, "-c", ALL_PIPELINES, str(tmp_path / "jobs.json")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    audio_got, asr_got, image_got = got[:2], got[2:4], got[4:]
    for rows, (ref, _) in zip(audio_got, want):
        assert [r["label"] for r in rows] == [label for label, _ in ref]
        np.testing.assert_allclose([r["score"] for r in rows], [p for _, p in ref], atol=1e-5)
    assert asr_got == texts
    assert len(image_got) == len(image_want) == 8
    for rows, (names, scores, atol) in zip(image_got, image_want):
        np.testing.assert_allclose([r["score"] for r in rows], scores, atol=atol)
        if atol < 1e-3:
            assert [r["label"] for r in rows] == names


def test_audio_pipelines_read_files_without_ffmpeg_only_while_it_is_missing(monkeypatch, tmp_path):
    """The fallback reader decodes with soundfile when no ffmpeg is on the PATH, defers to
    transformers' own reader when one is, and a file libsndfile cannot read is a ValueError."""
    import transformers.pipelines.audio_classification as audio_classification

    import hf_sparse.models  # noqa: F401  (installs the reader)
    from hf_sparse.data.audio_io import write_audio

    read = audio_classification.ffmpeg_read
    assert getattr(read, "hf_sparse_fallback", False)
    tone = (0.5 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    wav = write_audio(tmp_path / "tone.wav", tone, 16000)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing called ffmpeg here
    got = read(wav.read_bytes(), 8000)
    assert got.dtype == np.float32 and len(got) == 8000
    with pytest.raises(ValueError, match="FFmpeg is not installed"):
        read(b"not audio at all", 8000)
    fake = tmp_path / "ffmpeg"  # an ffmpeg on the PATH: transformers' reader runs it
    fake.write_text("#!/bin/sh\nprintf 'abcd'\n")
    fake.chmod(0o755)
    assert read(wav.read_bytes(), 8000).tolist() == np.frombuffer(b"abcd", np.float32).tolist()


def test_a_sparse_runtime_model_runs_in_a_pipeline_with_its_processor(speech_checkpoint):  # noqa: F811
    """``load_sparse(..., runtime="sparse")`` gives a model ``pipeline(model=...)`` takes, with the
    checkpoint's feature extractor; its scores are the dense model's."""
    from transformers import AutoFeatureExtractor, pipeline

    from hf_sparse import load_sparse
    from hf_sparse.data.audio_io import load_audio

    folder, model, fe, wavs = speech_checkpoint
    # (this small GRU is faster dense: convert it by decision, not by timing)
    sparse = load_sparse(folder, runtime="sparse", decisions={"speech_rnn.rnn": {"converted": True, "formats": {
        "weight_ih_l0": "dense", "weight_hh_l0": "csr"}}})
    assert type(sparse.speech_rnn.rnn) is not type(model.speech_rnn.rnn)  # the recurrent layer was swapped
    run = pipeline("audio-classification", model=sparse, feature_extractor=AutoFeatureExtractor.from_pretrained(folder))
    audio = load_audio(str(wavs[3]), 8000)
    rows = run({"raw": audio, "sampling_rate": 8000}, top_k=3)
    ref = expected(model, fe, audio)
    assert [r["label"] for r in rows] == [label for label, _ in ref]
    np.testing.assert_allclose([r["score"] for r in rows], [p for _, p in ref], atol=1e-5)
