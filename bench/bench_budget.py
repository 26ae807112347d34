"""Dense vs purged: a channel-gated run's checkpoint purged by its channel groups, side by side.

For a run trained with ``granularity: channel`` (e.g. ``recipes/fmnist_resnet18_l0_macs.yaml``),
rebuild the channel groups of its gated layers, remove every channel whose producing tensors are all
zero (rows of the gated conv, its BatchNorm entries) together with the next layer's input columns,
and report: the max abs difference of the outputs (gated vs purged, fp32), parameters and MACs per
sample (training resolution and 224x224, measured by hooks on the purged model), and CPU latency at
batch 1 in PyTorch and ONNX Runtime (one thread, variants interleaved, medians of per-round ratios).

    OMP_NUM_THREADS=1 python bench/bench_budget.py RUN_DIR [--recipe RUN_DIR/model/recipe.yaml] \\
        [--size 224] [--rounds 30] [--json out.json] [--no-timing]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hf_sparse.checkpoint.save_and_load import load_sparse
from hf_sparse.methods.granularity import build_grids
from hf_sparse.methods.targets import TargetSpec, resolve_targets
from hf_sparse.models.build import TimmClassifier
from hf_sparse.structure.budget import count_macs, count_params, groups_from_channel_grids
from hf_sparse.training.recipe import load_recipe


def kept_channels(model: nn.Module, group) -> torch.Tensor:
    """Channels with any nonzero entry in a producing ("out") parameter."""
    params = dict(model.named_parameters())
    alive = torch.zeros(group.channels, dtype=torch.bool)
    for s in group.slices:
        if s.role == "out" and s.tensor in params:
            t = params[s.tensor].detach().movedim(s.dim, 0)
            per = t[s.index.reshape(-1)].reshape(group.channels, -1)
            alive |= (per != 0).any(1)
    return alive.nonzero().flatten()


@torch.no_grad()
def purge(model: nn.Module, groups, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A copy with the removed channels sliced out of every tensor of their groups (Conv/BN/Linear)."""
    small = copy.deepcopy(model)
    tensors = {**dict(small.named_parameters()), **dict(small.named_buffers())}
    modules = dict(small.named_modules())
    for g in groups:
        for s in g.slices:
            rows = s.index[keep[g.name]].reshape(-1)
            t = tensors[s.tensor]
            t.data = t.data.index_select(s.dim, rows).contiguous()
            m = modules[s.module]
            n = t.shape[s.dim]
            if isinstance(m, nn.modules.conv._ConvNd):
                if s.dim == 0:
                    m.out_channels = n
                else:
                    m.in_channels = n
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.num_features = n
            elif isinstance(m, nn.Linear):
                if s.dim == 0:
                    m.out_features = n
                else:
                    m.in_features = n
    return small


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
    model = load_sparse(run / "model").eval()
    if recipe.model.source == "timm":  # load_sparse gives the bare timm model; the recipe names its wrapper
        model = TimmClassifier(model, recipe.model.name).eval()
    targets = resolve_targets(model, TargetSpec(**recipe.sparsity.targets.model_dump()))
    grids = build_grids(targets, recipe.sparsity.granularity_spec(), model)
    groups = groups_from_channel_grids(model, grids)
    keep = {g.name: kept_channels(model, g) for g in groups}
    small = purge(model, groups, keep).eval()
    chans = int(model.model.conv1.in_channels) if hasattr(model, "model") else 3
    train_size = recipe.data.image_size or 28
    x = torch.randn(8, chans, train_size, train_size)
    with torch.no_grad():
        diff = float((_logits(model, x) - _logits(small, x)).abs().max())
    result = {"run": str(run), "kept": {k: int(v.numel()) for k, v in keep.items()},
              "channels": {g.name: g.channels for g in groups}, "max_abs_diff": diff,
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
