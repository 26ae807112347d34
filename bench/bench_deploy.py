"""Deployment speed: streaming speech on one core (dense vs the sparse runtime) and ONNX Runtime fp32 vs int8.

    OMP_NUM_THREADS=1 python bench/bench_deploy.py [--seconds 2] [--skip-onnx] [--out bench_deploy.json]

Streaming: a unidirectional GRU speech model fed 10 ms chunks (80 samples at 8 kHz: one frame each)
through ``hf_sparse.stream``: dense PyTorch vs ``to_sparse_runtime`` (which keeps a layer dense when
it measures no gain). Each chunk goes to both streams in rotating order and the per-chunk ratio's
median is reported (the CPU's speed drifts); the real-time factor is the summed compute over the
audio's duration. Models: the ASR-sized 2-layer GRU with 1024 units and the FSDD recipe's model
(Conv1d 64 + one GRU of 512 units), each with its GRU weights at density 0.1 in 16x16 blocks.

ONNX: a timm resnet18 with about half of every channel group removed (purged: about a quarter of the
MACs), exported with ``hf_sparse.checkpoint.onnx_export`` and quantised static int8 (QDQ, calibrated
on random 224x224 batches: latency only, the weights are untrained), batch-1 latency at 224x224 on one
thread, PyTorch vs ONNX Runtime fp32 vs int8, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sparse.data.feature_extraction import SpeechRNNFeatureExtractor  # noqa: E402
from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC  # noqa: E402
from hf_sparse.runtime.convert import to_sparse_runtime  # noqa: E402
from hf_sparse.runtime.streaming import stream  # noqa: E402


def block_sparse_(model: torch.nn.Module, density: float = 0.1, block: int = 16, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("weight_"):
                rows, cols = -(-p.shape[0] // block), -(-p.shape[1] // block)
                keep = torch.rand(rows, cols, generator=g) < density
                p.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[: p.shape[0], : p.shape[1]])


def streaming(config: SpeechRNNConfig, seconds: float) -> dict:
    torch.manual_seed(0)
    model = SpeechRNNForCTC(config).eval()
    block_sparse_(model)
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(8000 * seconds)) * 0.1).astype(np.float32)
    fe = SpeechRNNFeatureExtractor(feature_size=config.num_mel_bins, normalize="global").fit_global_stats([audio])
    sparse_model = to_sparse_runtime(model)
    streams = {"dense": stream(model, fe), "sparse": stream(sparse_model, fe)}
    chunk = 80  # 10 ms
    totals = {k: 0.0 for k in streams}
    ratios = []
    for i, start in enumerate(range(0, len(audio), chunk)):
        piece = audio[start:start + chunk]
        order = list(streams) if i % 2 == 0 else list(reversed(streams))
        took = {}
        for name in order:
            t0 = time.perf_counter()
            streams[name].feed(piece)
            took[name] = time.perf_counter() - t0
        if i >= 5:  # warm-up chunks left out
            for name in streams:
                totals[name] += took[name]
            ratios.append(took["dense"] / took["sparse"])
    timed = (len(audio) // chunk - 5) * chunk / 8000
    converted = [r["layer"] for r in getattr(sparse_model, "sparse_runtime_report", []) if r.get("converted")]
    return {"hidden": config.hidden_size, "layers": config.num_layers, "conv": config.conv_channels,
            "chunk_ms": 10, "audio_s": timed, "dense_rtf": totals["dense"] / timed,
            "sparse_rtf": totals["sparse"] / timed, "median_speedup": statistics.median(ratios),
            "dense_ms_per_chunk": 1e3 * totals["dense"] / len(ratios),
            "sparse_ms_per_chunk": 1e3 * totals["sparse"] / len(ratios), "converted": converted}


def onnx_resnet18() -> dict:
    import timm

    from hf_sparse.checkpoint.onnx_export import export_onnx, onnx_latency, quantize_int8
    from hf_sparse.structure.groups import find_groups
    from hf_sparse.structure.purge import keep_by_magnitude, mask_channels, purge_copy

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    groups = find_groups(model, torch.randn(1, 3, 224, 224))
    mask_channels(model, groups, keep_by_magnitude(model, groups, 0.5))
    small, extra = purge_copy(model, None)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        info = export_onnx(small, fp32)
        g = torch.Generator().manual_seed(1)
        calibration = [{"pixel_values": torch.randn(8, 3, 224, 224, generator=g).numpy()} for _ in range(4)]
        q = quantize_int8(fp32, int8, calibration=calibration)
        latency = onnx_latency(small, {"onnxruntime": fp32, "onnxruntime_int8": int8})
    return {"model": "timm resnet18, half of each channel group purged", "macs_fraction": extra["macs"]["fraction"],
            "params_fraction": extra["params"]["fraction"], "onnx_check": info["check"]["max_abs_diff"],
            "int8_mode": q["mode"], **latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="audio streamed per model")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"torch": torch.__version__, "threads": 1, "streaming": [
        streaming(SpeechRNNConfig(num_mel_bins=40, hidden_size=1024, num_layers=2, bidirectional=False,
                                  conv_channels=[], vocab_size=29), args.seconds),
        streaming(SpeechRNNConfig(num_mel_bins=40, hidden_size=512, num_layers=1, bidirectional=False,
                                  conv_channels=[64], vocab_size=11), args.seconds),
    ]}
    print("| model | dense RTF | sparse RTF | median speed-up per chunk | dense ms/chunk | sparse ms/chunk |")
    print("|---|---|---|---|---|---|")
    for r in results["streaming"]:
        name = f"GRU {r['layers']}x{r['hidden']}" + (f", Conv1d {r['conv']}" if r["conv"] else "")
        print(f"| {name} | {r['dense_rtf']:.4f} | {r['sparse_rtf']:.4f} | {r['median_speedup']:.2f}x | "
              f"{r['dense_ms_per_chunk']:.3f} | {r['sparse_ms_per_chunk']:.3f} |")
    if not args.skip_onnx:
        r = onnx_resnet18()
        results["onnx"] = r
        print(f"\npurged resnet18 (MACs {r['macs_fraction']:.3f} of dense), batch 1, 224x224, one thread: PyTorch "
              f"{r['pytorch_ms']:.2f} ms, ONNX Runtime fp32 {r['onnxruntime_ms']:.2f} ms, int8 ({r['int8_mode']}) "
              f"{r['onnxruntime_int8_ms']:.2f} ms: int8 {r['onnxruntime_ms'] / r['onnxruntime_int8_ms']:.2f}x fp32")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
