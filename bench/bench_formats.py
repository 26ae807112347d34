"""Checkpoint size per storage format, and CPU latency of a purged vs a gated (zeros) model.

Sizes: LeNet-300-100 magnitude-pruned by hand (every Linear weight, per layer) at several
densities, saved as ``dense``, ``bitmask`` and (for reference) gzip of the dense file; each
bitmask checkpoint is loaded back and checked bit-exact.

Latency: LeNet-300-100 with a fraction of the hidden units removed structurally (zero rows),
once gated (full shapes, zeros) and once purged (smaller layers). Timing drifts on these machines,
so the variants are interleaved step by step in rotating order on the same batch, and the report
gives the median of the per-step ratios purged/gated.

    .venv/bin/python bench/bench_formats.py [--steps 400] [--remove 0.7] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sparse.checkpoint.formats.bitmask import BITMASK_WEIGHTS  # noqa: E402
from hf_sparse.checkpoint.save_and_load import load_sparse, save_sparse_checkpoint
from hf_sparse.models.lenet import LeNetConfig, LeNetForImageClassification  # noqa: E402

TARGETS = ["fc1.weight", "fc2.weight", "classifier.weight"]


def report_for(model: torch.nn.Module, method: str, target: float | None) -> dict:
    per_layer = {}
    for name in TARGETS:
        w = model.get_parameter(name)
        nz = int(torch.count_nonzero(w))
        per_layer[name] = {"density": nz / w.numel(), "nonzero": nz, "numel": w.numel(), "shape": list(w.shape),
                           "layer_type": "Linear"}
    nonzero = sum(v["nonzero"] for v in per_layer.values())
    return {"method": method, "target_density": target, "achieved_density": nonzero / sum(
        v["numel"] for v in per_layer.values()), "model_density": None, "per_layer": per_layer}


@torch.no_grad()
def magnitude_pruned(density: float, seed: int = 0) -> LeNetForImageClassification:
    torch.manual_seed(seed)
    model = LeNetForImageClassification(LeNetConfig(variant="300-100")).eval()
    for name in TARGETS:
        w = model.get_parameter(name)
        k = max(1, round(density * w.numel()))
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[w.abs().flatten().topk(k).indices] = True
        w.mul_(keep.view_as(w))
    return model


@torch.no_grad()
def structurally_pruned(remove: float, seed: int = 0) -> LeNetForImageClassification:
    torch.manual_seed(seed)
    model = LeNetForImageClassification(LeNetConfig(variant="300-100")).eval()
    g = torch.Generator().manual_seed(seed)
    for layer in (model.fc1, model.fc2):
        rows = torch.randperm(layer.out_features, generator=g)[: round(remove * layer.out_features)]
        layer.weight[rows] = 0
    return model


def sizes(densities: list[float], work: Path) -> list[dict]:
    rows = []
    for d in densities:
        model = magnitude_pruned(d)
        report = report_for(model, "magnitude", d)
        dense = save_sparse_checkpoint(model, work / f"dense-{d}", report=report) / "model.safetensors"
        bitmask = save_sparse_checkpoint(model, work / f"bitmask-{d}", report=report, format="bitmask")
        loaded = load_sparse(bitmask).state_dict()
        exact = all(torch.equal(t, loaded[k]) for k, t in model.state_dict().items())
        dense_bytes = dense.stat().st_size
        rows.append({"density": d, "achieved": report["achieved_density"], "dense": dense_bytes,
                     "bitmask": (bitmask / BITMASK_WEIGHTS).stat().st_size,
                     "gzip_dense": len(gzip.compress(dense.read_bytes(), compresslevel=6)), "bit_exact": exact})
    return rows


def latency(remove: float, steps: int, batch_sizes: list[int], work: Path) -> tuple[dict, list[dict]]:
    gated = structurally_pruned(remove)
    report = report_for(gated, "structured", None)
    dense_dir = save_sparse_checkpoint(gated, work / "gated", report=report)
    purged_dir = save_sparse_checkpoint(gated, work / "purged", report=report, format="purged")
    purged = load_sparse(purged_dir)
    info = {"hidden_sizes": purged.config.hidden_sizes,
            "dense_bytes": (dense_dir / "model.safetensors").stat().st_size,
            "purged_bytes": (purged_dir / "model.safetensors").stat().st_size}
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 1, 28, 28, generator=torch.Generator().manual_seed(bs))
        variants = {"gated": gated, "purged": purged}
        with torch.inference_mode():
            diff = (gated(x).logits - purged(x).logits).abs().max().item()
            for m in variants.values():  # warm-up
                for _ in range(20):
                    m(x)
            times: dict[str, list[float]] = {k: [] for k in variants}
            order = list(variants)
            for step in range(steps):
                for name in order[step % 2:] + order[:step % 2]:  # rotate who goes first
                    t0 = time.perf_counter()
                    variants[name](x)
                    times[name].append(time.perf_counter() - t0)
        ratios = [p / g for p, g in zip(times["purged"], times["gated"])]
        rows.append({"batch": bs, "gated_us": statistics.median(times["gated"]) * 1e6,
                     "purged_us": statistics.median(times["purged"]) * 1e6,
                     "median_ratio": statistics.median(ratios), "max_abs_diff": diff})
    return info, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    p.add_argument("--remove", type=float, default=0.7, help="fraction of hidden units removed for the latency test")
    p.add_argument("--steps", type=int, default=400, help="timed steps per variant (interleaved)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        size_rows = sizes(args.densities, Path(tmp))
        info, lat_rows = latency(args.remove, args.steps, args.batch_sizes, Path(tmp))

    print(f"## Checkpoint size, LeNet-300-100 (266,610 parameters), weights file only, torch {torch.__version__}\n")
    print("| target density | achieved | dense (bytes) | bitmask (bytes) | bitmask / dense | gzip(dense) / dense "
          "| bitmask bit-exact |")
    print("|---|---|---|---|---|---|---|")
    for r in size_rows:
        print(f"| {r['density']:g} | {r['achieved']:.4f} | {r['dense']:,} | {r['bitmask']:,} | "
              f"{r['bitmask'] / r['dense']:.3f} | {r['gzip_dense'] / r['dense']:.3f} | {r['bit_exact']} |")
    print(f"\n## Purged vs gated, LeNet-300-100 with {args.remove:.0%} of the hidden units removed "
          f"(purged hidden sizes {info['hidden_sizes']}), CPU, {args.threads} thread(s), {args.steps} interleaved steps\n")
    print(f"weights file: gated (dense, zeros) {info['dense_bytes']:,} bytes, purged {info['purged_bytes']:,} bytes "
          f"({info['purged_bytes'] / info['dense_bytes']:.3f}x)\n")
    print("| batch | gated median (us) | purged median (us) | median per-step ratio purged/gated | max abs diff |")
    print("|---|---|---|---|---|")
    for r in lat_rows:
        print(f"| {r['batch']} | {r['gated_us']:.1f} | {r['purged_us']:.1f} | {r['median_ratio']:.3f} | "
              f"{r['max_abs_diff']:.2e} |")


if __name__ == "__main__":
    main()
