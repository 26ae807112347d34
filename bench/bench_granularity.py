"""Every method at every granularity on Fashion-MNIST LeNet-300-100, checked on the saved weights.

Each row is ``hf-sparse train recipes/fmnist_lenet300_<method>.yaml`` with only the granularity
(and the density: 0.5 for 2:4, fixed by N/M; 0.25 otherwise) changed by ``--set``, and the output
layer kept dense (``include_head=false``: at channel granularity a head row is a whole class), run
as its own process with one intra-op thread. The check reads the saved ``model/model.safetensors`` back and
verifies the density of the targeted weights and the mask's shape rule (every 4x4 block all zero
or all kept; at most 2 of every 4 kept, and exactly 2 in every run; whole output units).

    OMP_NUM_THREADS=1 python bench/bench_granularity.py [--epochs 10] [--methods gmp dns ...]
        [--granularities unstructured block 2:4 channel] [--out runs/bench_granularity]

Prints a Markdown table and writes it with the raw figures (``results.json``) into ``--out``.
Runs whose ``results.json`` exists are not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"gmp": "fmnist_lenet300_gmp.yaml", "gradual": "fmnist_lenet300_gradual.yaml",
           "dns": "fmnist_lenet300_dns.yaml", "l0": "fmnist_lenet300_l0_constrained.yaml",
           "autoprune": "fmnist_lenet300_autoprune.yaml"}
SETTINGS = {"unstructured": ["sparsity.granularity=unstructured", "sparsity.target_density=0.25"],
            "block": ["sparsity.granularity=block", "sparsity.block_shape=[4,4]", "sparsity.target_density=0.25"],
            "2:4": ["sparsity.granularity=2:4", "sparsity.target_density=0.5"],
            "channel": ["sparsity.granularity=channel", "sparsity.target_density=0.25"]}


def train(method: str, granularity: str, epochs: int | None, out: Path, extra: list[str]) -> dict:
    run_dir = out / method / granularity.replace(":", "-")
    if not (run_dir / "results.json").exists():
        sets = [*SETTINGS[granularity], "sparsity.targets.include_head=false"]
        # per-layer ranking, as the table was measured (the LeNet recipes rank globally; N:M needs per layer)
        sets += ["sparsity.params.scope=layer"] if method in ("gmp", "gradual", "dns") else []
        sets += [f"training.num_train_epochs={epochs}"] if epochs else []
        sets += extra
        cmd = [sys.executable, "-m", "hf_sparse", "train", str(REPO / "recipes" / RECIPES[method]),
               "--output-dir", str(run_dir), "--set", *sets]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    results = json.loads((run_dir / "results.json").read_text())
    assert "classifier.weight" not in results["per_layer"], f"{run_dir}: the head was pruned"
    return {**check_saved(run_dir, results, granularity), "accuracy": results["eval"]["accuracy"],
            "train_s": results["train_runtime_s"]}


def check_saved(run_dir: Path, results: dict, granularity: str) -> dict:
    """Density and shape rule, recomputed from the saved weights of the targeted layers."""
    from hf_sparse.grids import Granularity, check_mask_rule
    from hf_sparse.grids.nm import nm_count

    extra = dict(s.split("=", 1) for s in SETTINGS[granularity])
    spec = Granularity.parse(extra["sparsity.granularity"], [4, 4] if "sparsity.block_shape" in extra else None)
    weights = load_file(run_dir / "model" / "model.safetensors")
    kept = total = 0
    problems = []
    for name in results["per_layer"]:
        w = weights[name]
        kept += int((w != 0).sum())
        total += w.numel()
        if problem := check_mask_rule(w, spec):
            problems.append(f"{name}: {problem}")
        if spec.kind == "n:m" and nm_count(w != 0, spec.m).unique().tolist() != [spec.n]:
            problems.append(f"{name}: not exactly {spec.n} of every {spec.m}")
    return {"target": float(extra["sparsity.target_density"]), "density": kept / total,
            "rule": "ok" if not problems else "; ".join(problems)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' num_train_epochs")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES))
    parser.add_argument("--granularities", nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_granularity")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every run, e.g. training.learning_rate=0.001")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for method in args.methods:
        for granularity in args.granularities:
            rows[f"{method}/{granularity}"] = r = train(method, granularity, args.epochs, args.out, args.set)
            print(f"{method:10s} {granularity:12s} density {r['density']:.4f} acc {r['accuracy']:.4f} {r['rule']}",
                  flush=True)
    lines = ["| method | granularity | target | achieved density | within 0.01 | mask rule | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        method, granularity = key.split("/")
        ok = "yes" if abs(r["density"] - r["target"]) <= 0.01 else "NO"
        lines.append(f"| {method} | {granularity} | {r['target']:.2f} | {r['density']:.4f} | {ok} | {r['rule']} | "
                     f"{r['accuracy']:.4f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
