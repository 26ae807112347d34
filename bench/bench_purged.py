"""Dense vs purged CPU latency, in PyTorch and in ONNX Runtime, side by side in one process.

For each model, the channel groups (``hf_sparse.structure.find_groups``) keep a uniform fraction
of their channels (0.75 / 0.5 / 0.25 by default; the largest L2 norms, on an untrained model:
latency depends on the shapes, not the values), the rest are zeroed and purged. Every purged
model's outputs are checked against the zeroed (gated) dense-shape model, and its ONNX export
against PyTorch. Timing: one intra-op thread, eval, no grad; in every round each variant runs
once, in a rotating order, on the same input; the reported speed-up is the median over rounds of
the per-round ratio dense time / purged time. Parameters and MACs (per sample, at that input) come
from ``hf_sparse.structure.budget``.

    OMP_NUM_THREADS=1 python bench/bench_purged.py [--models resnet18 ...] [--densities 0.75 0.5 0.25]
        [--sizes 28 224] [--batches 1 32] [--rounds 15] [--out runs/bench_purged]

Fashion-MNIST shapes by default: one input channel, 10 classes, training resolution 28x28.
Prints a Markdown table and writes it with the raw figures (``results.json``) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from hf_sparse.structure.budget import count_macs, count_params
from hf_sparse.structure.groups import find_groups
from hf_sparse.structure.purge import keep_by_magnitude, mask_channels, purge_model


def build(name: str, in_chans: int, classes: int, size: int) -> torch.nn.Module:
    import timm

    kwargs = {"img_size": size} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=classes, in_chans=in_chans, **kwargs).eval()


def variants(name: str, densities: list[float], in_chans: int, classes: int, train_size: int) -> dict:
    """{label: (gated dense-shape model, purged model)}; label "dense" maps to (model, model)."""
    torch.manual_seed(0)
    dense = build(name, in_chans, classes, train_size)
    example = torch.randn(1, in_chans, train_size, train_size)
    groups = find_groups(dense, example)
    out = {"dense": (dense, dense)}
    for d in densities:
        gated = copy.deepcopy(dense)
        keep = keep_by_magnitude(gated, groups, d)
        mask_channels(gated, groups, keep)
        small = copy.deepcopy(gated)
        purge_model(small, groups, keep)
        out[f"{d:g}"] = (gated, small.eval())
    return out, groups


def onnx_session(model: torch.nn.Module, x: torch.Tensor):
    import onnxruntime as ort

    buf = io.BytesIO()
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
    torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}, "y": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    names = list(fns)
    for f in fns.values():  # warm-up
        f()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(timed(fns[n]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--sizes", nargs="+", type=int, default=[28, 224], help="first = training resolution")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--out", default="runs/bench_purged")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, raw = [], []
    for name in args.models:
        models, groups = variants(name, args.densities, args.in_chans, args.classes, args.sizes[0])
        sizes = args.sizes[:1] if name.startswith("vit") else args.sizes  # a ViT has one input size
        for size in sizes:
            probe = torch.randn(2, args.in_chans, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                dense_macs = count_macs(models["dense"][1], probe[:1]).total
                dense_params = count_params(models["dense"][1])
                sessions, facts = {}, {}
                for label, (gated, small) in models.items():
                    torch_diff = float((gated(probe) - small(probe)).abs().max())
                    sess = onnx_session(small, probe)
                    onnx_diff = float(np.abs(sess.run(None, {"x": probe.numpy()})[0] - small(probe).numpy()).max())
                    sessions[label] = sess
                    facts[label] = {"params": count_params(small) / dense_params,
                                    "macs": count_macs(small, probe[:1]).total / dense_macs,
                                    "purged_vs_gated": torch_diff, "onnx_vs_torch": onnx_diff}
                for batch in args.batches:
                    x = torch.randn(batch, args.in_chans, size, size)
                    xn = x.numpy()
                    rounds = max(3, args.rounds if batch * size * size <= 32 * 28 * 28 * 4 else args.rounds // 3)
                    for runtime in ("pytorch", "onnxruntime"):
                        if runtime == "pytorch":
                            fns = {lb: (lambda m=small, x=x: m(x)) for lb, (_, small) in models.items()}
                        else:
                            fns = {lb: (lambda s=sessions[lb], xn=xn: s.run(None, {"x": xn})) for lb in models}
                        times = interleaved(fns, rounds)
                        for label in models:
                            if label == "dense":
                                continue
                            ratio = statistics.median(d / t for d, t in zip(times["dense"], times[label]))
                            row = {"model": name, "size": size, "batch": batch, "runtime": runtime,
                                   "density": float(label), "dense_ms": 1e3 * statistics.median(times["dense"]),
                                   "purged_ms": 1e3 * statistics.median(times[label]), "speedup": ratio,
                                   "rounds": rounds, **facts[label]}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
        raw.append({"model": name, "groups": len(groups), "channels": sum(g.channels for g in groups)})
    lines = ["| model | input | batch | runtime | group density | params | MACs | dense ms | purged ms | speed-up |"
             " max abs diff (purged vs gated / ONNX vs torch) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']}x{r['size']} | {r['batch']} | {r['runtime']} | {r['density']:g} | "
                     f"{r['params']:.3f} | {r['macs']:.3f} | {r['dense_ms']:.2f} | {r['purged_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['purged_vs_gated']:.1e} / {r['onnx_vs_torch']:.1e} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "models": raw, "args": vars(args)}, indent=2))
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
