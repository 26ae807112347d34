"""ONNX checkpoints: the export equals PyTorch (padded speech batches too), runs under a bare ONNX
Runtime in a fresh process, refuses a wrong graph, loads with ``load_sparse(runtime="onnx")``, and
quantises to int8 with the pruned zeros kept."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hf_sparse.checkpoint.onnx_export import (
    ONNX_FILE,
    ONNX_INT8_FILE,
    OnnxModel,
    add_onnx,
    export_onnx,
    zeros_kept,
)
from hf_sparse.checkpoint.save_and_load import CheckpointError, load_sparse, save_sparse_checkpoint
from hf_sparse.cli.checkpoint import add_subcommands
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC, SpeechRNNForSequenceClassification
from tests.helpers import launch_env
from tests.test_export import X_MNIST, logits, magnitude_prune, make_report, sparse_lenet
from tests.test_structure_purge import MODELS as PURGE_MODELS
from tests.test_structure_purge import gated, report_of
from tests.test_structure_purge import logits as purge_logits


def speech_model(cls=SpeechRNNForSequenceClassification, cell: str = "gru", bidirectional: bool = False,
                 density: float = 0.3, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(SpeechRNNConfig(num_mel_bins=20, cell=cell, hidden_size=16, num_layers=2, bidirectional=bidirectional,
                                conv_channels=[8], num_labels=5, vocab_size=7)).eval()
    names = [n for n, p in model.named_parameters() if n.split(".")[-1].startswith("weight_")]
    magnitude_prune(model, names, density)
    return model, names


def padded_batch(lengths: list[int], mels: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), mels, generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return feats * mask[..., None], mask


@pytest.mark.parametrize("cls", [SpeechRNNForSequenceClassification, SpeechRNNForCTC])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_speech_onnx_gives_each_utterance_its_own_result_in_a_padded_batch(tmp_path, one_thread, cls, cell,
                                                                             bidirectional):
    model, _ = speech_model(cls, cell, bidirectional)
    info = export_onnx(model, tmp_path / ONNX_FILE)
    assert info["check"]["max_abs_diff"] <= 1e-4 and info["opset"] == 17
    onnx_model = OnnxModel(tmp_path)
    lengths = [83, 47, 12]  # other lengths than the export's batch: time is a dynamic axis
    feats, mask = padded_batch(lengths)
    out = onnx_model(input_features=feats.numpy(), attention_mask=mask.numpy())
    for i, n in enumerate(lengths):  # each utterance alone through PyTorch (the packed path)
        with torch.no_grad():
            alone = model(input_features=feats[i:i + 1, :n])
        if cls is SpeechRNNForCTC:
            frames = int(alone.output_lengths[0])
            assert int(out["output_lengths"][i]) == frames
            np.testing.assert_allclose(out["logits"][i, :frames], alone.logits[0].numpy(), atol=1e-4, rtol=0)
        else:
            np.testing.assert_allclose(out["logits"][i], alone.logits[0].numpy(), atol=1e-4, rtol=0)


def test_export_refuses_a_graph_that_differs_and_writes_nothing(tmp_path):
    model, _ = speech_model()
    with pytest.raises(CheckpointError, match="differ from PyTorch's .* no ONNX file written"):
        export_onnx(model, tmp_path / ONNX_FILE, atol=0.0)  # float GRU kernels never agree to the last bit
    assert not (tmp_path / ONNX_FILE).exists()


BARE_ORT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    folder = sys.argv[1]
    feeds = {k: np.asarray(v, dtype=np.int64 if k == "attention_mask" else np.float32)
             for k, v in json.loads(sys.stdin.read()).items()}
    session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)
    heavy = [m for m in ("torch", "transformers", "hf_sparse") if m in sys.modules]
    print(json.dumps({"outputs": [o.tolist() for o in out], "heavy": heavy,
                      "sparsity": json.load(open(folder + "/sparsity.json"))["onnx"]["file"]}))
""")


def bare_run(folder, feeds: dict[str, torch.Tensor]) -> dict:
    env = {k: v for k, v in launch_env().items() if k != "PYTHONPATH"}  # hf_sparse is not importable there
    done = subprocess.run([sys.executable, "-c", BARE_ORT, str(folder)], input=json.dumps(
        {k: v.tolist() for k, v in feeds.items()}), capture_output=True, text=True, env=env, timeout=120,
        cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_onnx_checkpoint_runs_under_bare_onnxruntime_in_a_fresh_process(tmp_path):
    model, report = sparse_lenet()
    out = save_sparse_checkpoint(model, tmp_path / "onnx", report=report, format="onnx")
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["format"] == "dense" and sparsity["onnx"]["inputs"] == ["pixel_values"]
    assert {"README.md", "config.json", "sparsity.json", ONNX_FILE} <= {p.name for p in out.iterdir()}
    latency = sparsity["onnx"]["latency"]
    assert latency["pytorch_ms"] > 0 and latency["onnxruntime_ms"] > 0
    assert "ONNX Runtime" in (out / "README.md").read_text() and f"{latency['onnxruntime_ms']:.3f} ms" in \
        (out / "README.md").read_text()
    result = bare_run(out, {"pixel_values": X_MNIST})
    assert result["heavy"] == [] and result["sparsity"] == ONNX_FILE
    np.testing.assert_allclose(np.array(result["outputs"][0]), logits(model, X_MNIST).numpy(), atol=1e-4, rtol=0)


def test_speech_checkpoint_under_bare_onnxruntime_and_load_sparse(tmp_path):
    model, names = speech_model(SpeechRNNForCTC, "lstm", bidirectional=True)
    report = {**make_report(model, names), "granularity": "unstructured"}
    for entry in report["per_layer"].values():
        entry["layer_type"] = "LSTM"
    out = save_sparse_checkpoint(model, tmp_path / "ctc", report=report, format="onnx")
    feats, mask = padded_batch([50, 31])
    result = bare_run(out, {"input_features": feats, "attention_mask": mask})
    with torch.no_grad():
        ref = model(input_features=feats, attention_mask=mask)
    np.testing.assert_allclose(np.array(result["outputs"][0]), ref.logits.numpy(), atol=1e-4, rtol=0)
    assert result["outputs"][1] == ref.output_lengths.tolist()
    loaded = load_sparse(out, runtime="onnx")  # torch in, torch out, keyword inputs like the model's
    got = loaded(input_features=feats, attention_mask=mask)
    assert isinstance(got.logits, torch.Tensor)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0)
    assert loaded.config.model_type == "hf_sparse_speech_rnn"
    torch.testing.assert_close(load_sparse(out)(input_features=feats, attention_mask=mask).logits, ref.logits)
    data = bytearray((out / ONNX_FILE).read_bytes())
    data[-1] ^= 1
    (out / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_sparse(out, runtime="onnx")


@pytest.mark.parametrize("name", ["resnet10t", "hf_vit"])
def test_structured_run_exports_the_purged_model(tmp_path, name):
    model, _ = gated(PURGE_MODELS[name]())
    out = save_sparse_checkpoint(model, tmp_path / name, report=report_of(model), format="onnx", measure_speed=False)
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["format"] == "purged" and sparsity["purged"]["params"]["purged"] < sparsity["purged"]["params"]["dense"]
    x = torch.randn(3, 1, 32, 32)
    got = load_sparse(out, runtime="onnx")(pixel_values=x)
    with torch.no_grad():
        want = purge_logits(model, {"pixel_values": x} if hasattr(model, "config") else x)
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
    if name == "resnet10t":  # timm CNNs take any image size
        x = torch.randn(2, 1, 40, 40)
        with torch.no_grad():
            want = purge_logits(model, x)
        torch.testing.assert_close(load_sparse(out, runtime="onnx")(pixel_values=x).logits, want, atol=1e-4, rtol=0)


def test_int8_keeps_zeros_and_reports_accuracy(tmp_path, fmnist_small):
    model, report = sparse_lenet(density=0.1)
    out = save_sparse_checkpoint(model, tmp_path / "ckpt", report=report, format="dense")
    info = add_onnx(out, quantize="int8", data=fmnist_small)
    q = info["int8"]
    assert q["mode"] == "dynamic" and (out / ONNX_INT8_FILE).is_file()
    assert q["zeros"]["float_zeros"] > 0.8 * sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert q["zeros"] == zeros_kept(out / ONNX_FILE, out / ONNX_INT8_FILE)
    assert q["zeros"]["int8_zeros_at_those"] == q["zeros"]["float_zeros"]
    # the fp32 accuracy is PyTorch's own on the same 256 images
    batch = fmnist_small.collator([fmnist_small.eval[i] for i in range(len(fmnist_small.eval))])
    want = float((logits(model, batch["pixel_values"]).argmax(-1) == batch["labels"]).float().mean())
    assert q["eval_fp32"]["accuracy"] == pytest.approx(want, abs=1e-9)
    assert abs(q["eval_int8"]["accuracy"] - q["eval_fp32"]["accuracy"]) <= 0.05
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["onnx"]["int8"]["eval_int8"] == q["eval_int8"]
    assert "int8" in (out / "README.md").read_text()
    got = load_sparse(out, runtime="onnx")(pixel_values=X_MNIST.numpy())
    np.testing.assert_allclose(got.logits, logits(model, X_MNIST).numpy(), atol=1e-4, rtol=0)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_export_format_onnx(tmp_path, capsys):
    model, report = sparse_lenet()
    src = save_sparse_checkpoint(model, tmp_path / "run" / "model", report=report)
    assert _cli(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert "onnx" in capsys.readouterr().out
    got = load_sparse(tmp_path / "onnx", runtime="onnx")(pixel_values=X_MNIST)
    torch.testing.assert_close(got.logits, logits(load_sparse(src), X_MNIST), atol=1e-4, rtol=0)
    assert _cli(["export", str(src), "--format", "dense", "--quantize", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # int8 without the recipe's data: a located one-line error, nothing half-written
    assert _cli(["export", str(src), "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "y")]) == 2
    assert "recipe" in capsys.readouterr().err
