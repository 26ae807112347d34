"""Dense vs purged: a structured run's purged checkpoint against its dense architecture, side by side.

For a run whose checkpoint is ``purged`` (e.g. ``recipes/fmnist_resnet18_l0_macs.yaml``; a dense
checkpoint is purged here with :func:`hf_sparse.structure.purge.purge_copy`), report: the max abs
difference of the outputs gated vs purged (recorded at export, fp32), parameters and MACs per
sample (training resolution and 224x224, measured by hooks) of the purged model and of the recipe's
dense-shape model, and CPU latency at batch 1 in PyTorch and ONNX Runtime (one thread, variants
interleaved, medians of per-round ratios; the dense model's weights are the recipe's
initialisation: latency depends on the shapes only).

    OMP_NUM_THREADS=1 python bench/bench_budget.py RUN_DIR [--recipe RUN_DIR/model/recipe.yaml] \\
        [--size 224] [--rounds 30] [--json out.json] [--no-timing]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hf_sparse.checkpoint.save_and_load import load_sparse
from hf_sparse.config.recipe import load_recipe
from hf_sparse.models.build import TimmClassifier
from hf_sparse.structure.budget import count_macs, count_params
from hf_sparse.structure.purge import purge_copy
from hf_sparse.training.run import prepare_run


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out


class _Plain(nn.Module):
    """The logits only (for ONNX export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _logits(self.model, x)


def paired(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median time per variant and median per-round ratio dense/other, variants in rotating order."""
    times = {k: [] for k in fns}
    ratios = []
    names = list(fns)
    for f in fns.values():
        f()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {}
        for k in order:
            t = time.perf_counter()
            fns[k]()
            got[k] = time.perf_counter() - t
            times[k].append(got[k])
        ratios.append(got["dense"] / got["purged"])
    return {"dense_ms": 1e3 * statistics.median(times["dense"]), "purged_ms": 1e3 * statistics.median(times["purged"]),
            "speedup": statistics.median(ratios)}


def ort_session(model: nn.Module, x: torch.Tensor):
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(_Plain(model).eval(), (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-timing", action="store_true", help="outputs, parameters and MACs only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    recipe = load_recipe(args.recipe or run / "model" / "recipe.yaml")
    dense = prepare_run(recipe, "unused-output-dir").model.eval()  # the dense shapes, as trained
    loaded = load_sparse(run / "model").eval()
    sparsity = json.loads((run / "model" / "sparsity.json").read_text())
    if sparsity.get("format") == "purged":
        small, diff = loaded, float(sparsity["purged"]["max_abs_diff"])
    else:
        small, info = purge_copy(loaded)
        diff = info["max_abs_diff"]
    if recipe.model.source == "timm":  # load_sparse gives the bare timm model; the recipe names its wrapper
        small = TimmClassifier(small, recipe.model.name).eval()
    model = dense
    chans = int(model.model.conv1.in_channels) if hasattr(model, "model") else 3
    train_size = recipe.data.image_size or 28
    result = {"run": str(run), "max_abs_diff_gated_vs_purged": diff,
              "params": count_params(small), "dense_params": count_params(model)}
    result["params_fraction"] = result["params"] / result["dense_params"]
    for size in (train_size, args.size):
        xi = torch.randn(1, chans, size, size)
        dense_macs, purged_macs = count_macs(model, {"pixel_values": xi}).total, count_macs(small, {"pixel_values": xi}).total
        result[f"macs_{size}"] = purged_macs
        result[f"dense_macs_{size}"] = dense_macs
        result[f"macs_fraction_{size}"] = purged_macs / dense_macs
    x1 = torch.randn(1, chans, args.size, args.size)
    if args.no_timing:
        print(json.dumps(result, indent=2))
        return
    with torch.no_grad():
        result["torch"] = paired({"dense": lambda: _logits(model, x1), "purged": lambda: _logits(small, x1)},
                                 args.rounds)
    sessions = {"dense": ort_session(model, x1), "purged": ort_session(small, x1)}
    feed = {"x": x1.numpy()}
    with torch.no_grad():
        result["onnx_max_abs_diff"] = float(abs(sessions["purged"].run(None, feed)[0] - _logits(small, x1).numpy()).max())
    result["onnxruntime"] = paired({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, args.rounds)
    result["threads"] = torch.get_num_threads()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
