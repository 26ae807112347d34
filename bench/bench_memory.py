"""Memory of each sparsity method: its state per targeted weight, and peak training memory.

For each (method, granularity) a fresh process builds a timm ``resnet50`` (10 classes, random
init), attaches the method through :class:`hf_sparse.Sparsifier` (every Conv/Linear weight but
the head; target density 0.25, masks/gates active from the first step) and trains a few AdamW
steps on fixed random 64x64 images, batch 8, one intra-op thread. It reports:

* **method state, bytes per targeted weight**: every tensor the method object holds after the
  last step (masks, multiplier factors, real-weight copies, gate logits and their gradients,
  scores, group sizes, per-step buffers), found by walking the method's attributes, plus the
  optimizer state of the tensors the method adds (Adam's two moments of gate logits / auxiliary
  masks). Storages are counted once (a view of a mask costs nothing), the model's own
  parameters, gradients and their optimizer state are not counted (dense training has them too).
  Divided by the number of targeted weights (the weights the method's grids score).
* **peak RSS**: the process's resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``)
  at the end of the steps - what the OS had to give the process, including the allocator's
  slack. Every variant runs the same imports, model build and steps, so the difference to the
  dense run is the method's cost at its worst moment (transients of a mask update included).

    OMP_NUM_THREADS=1 python bench/bench_memory.py [--steps 4] [--methods gmp dns ...]
        [--granularities unstructured channel block] [--out runs/bench_memory] [--distill]

``--distill`` adds the same runs distilled from a frozen copy of the starting model (teacher
``self``, kl): their peak RSS against their undistilled twin is the teacher's cost (its weights,
plus its activations for one forward without gradients).

Prints a Markdown table and writes it with the raw figures (``results.json``) into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # method -> (sparsity.params that make it act from step 0 of a short run, target stated by the project)
    "gmp": ({"start_step": 0, "end_step": 2, "frequency": 1}, 1.5),
    "gradual": ({"start_step": 0, "ramp_step": 1, "end_step": 2, "frequency": 1}, 1.5),
    "dns": ({"start_step": 0, "end_step": 2}, 5.5),
    "l0": ({"control": "constrained"}, 13.0),
    # l0 drawing the sample again after backward instead of keeping it through the step (keep_sample)
    "l0_recompute": ({"control": "constrained", "keep_sample": False}, 13.0),
    "autoprune": ({"start_fraction": 0.0, "end_fraction": 0.5, "freeze_fraction": 0.9}, None),
}
GRANULARITIES = {"unstructured": {}, "channel": {"granularity": "channel"},
                 "block": {"granularity": "block", "block_shape": [4, 4]}}
DENSITY = 0.25


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def method_state(method: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor storage ``method`` holds (by top-level attribute), and of the optimizer
    state of the tensors it adds; the model's parameters, gradients and buffers excluded."""
    own = set()
    for p in model.parameters():
        own.add(_storage(p)[0])
        if p.grad is not None:
            own.add(_storage(p.grad)[0])
    own |= {_storage(b)[0] for b in model.buffers()}
    seen_objs: set[int] = set()
    counted: dict[int, int] = {}
    by_attr: dict[str, int] = {}

    def add(t: torch.Tensor, label: str) -> None:
        if t.device.type == "meta":
            return
        ptr, nbytes = _storage(t)
        if ptr in own or ptr in counted or nbytes == 0:
            return
        counted[ptr] = nbytes
        by_attr[label] = by_attr.get(label, 0) + nbytes

    def walk(obj: Any, label: str) -> None:
        if isinstance(obj, nn.Module) or id(obj) in seen_objs:
            return
        seen_objs.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj, label)
            if obj.grad is not None:
                add(obj.grad, f"{label} (grad)")
            return
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v, label)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, label)
        elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("hf_sparse"):
            for k, v in vars(obj).items():
                walk(v, label or k)

    for k, v in vars(method).items():
        walk(v, k)
    model_params = {id(p) for p in model.parameters()}
    for p, state in optimizer.state.items():
        if id(p) not in model_params:
            for v in state.values():
                if torch.is_tensor(v):
                    add(v, "optimizer state of the method's tensors")
    return by_attr


def run_one(method: str, granularity: str, steps: int) -> dict[str, Any]:
    """One variant in this process (``method`` 'dense' trains without a sparsifier; a ``+distill``
    suffix distils from a frozen copy of the starting model)."""
    import timm

    from hf_sparse import Sparsifier, SparsityConfig
    from hf_sparse.config.recipe import DistillationConfig
    from hf_sparse.models.build import TimmClassifier
    from hf_sparse.training.distill import Distiller

    name, distilled = method, method.endswith("+distill")
    method = method.removesuffix("+distill")
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=10)
    model.train()
    distiller = Distiller(TimmClassifier(model, "resnet50"), DistillationConfig()) if distilled else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 64, 64, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sp = None
    if method != "dense":
        params, _ = METHODS[method]
        cfg = SparsityConfig(method=method.split("_")[0], target_density=DENSITY, params=params, **GRANULARITIES[granularity])
        sp = Sparsifier(model, cfg, seed=0)
        sp.setup(steps)
        for group in sp.param_groups(1e-3):
            opt.add_param_group(group)
    rss_ready = peak_rss_bytes()
    for i in range(steps):
        if sp:
            sp.before_forward(i)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if distiller is not None:
            loss = distiller.combine(loss, {"logits": logits}, {"pixel_values": x}, model)
        loss.backward()
        if sp:
            sp.after_backward(i)
        opt.step()
        if sp:
            sp.after_step(i, opt)
        opt.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"method": name, "granularity": granularity, "steps": steps,
                           "peak_rss": peak_rss_bytes(), "peak_rss_before_steps": rss_ready,
                           "params": sum(p.numel() for p in model.parameters())}
    if sp:
        weights = sum(g.numel for g in sp.method.grids)
        state = method_state(sp.method, model, opt)
        out.update(targeted_weights=weights, state=state, state_bytes=sum(state.values()),
                   bytes_per_weight=sum(state.values()) / weights, density=sp.density())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=list(GRANULARITIES))
    ap.add_argument("--out", type=Path, default=REPO / "runs/bench_memory")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "GRANULARITY"), help=argparse.SUPPRESS)
    ap.add_argument("--distill", action="store_true", help="also each run distilled from a frozen copy of its start")
    args = ap.parse_args()
    if args.one:
        torch.set_num_threads(1)
        print(json.dumps(run_one(*args.one, args.steps)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    variants = [("dense", "-")] + [(m, g) for m in args.methods for g in args.granularities]
    if args.distill:
        variants += [(f"{m}+distill", g) for m, g in variants]
    for method, gran in variants:
        proc = subprocess.run([sys.executable, __file__, "--one", method, gran, "--steps", str(args.steps)],
                              check=True, env=env, capture_output=True, text=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method} {gran}: {rows[-1].get('bytes_per_weight', 0):.3f} B/weight, "
              f"peak RSS {rows[-1]['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    dense = rows[0]["peak_rss"]
    lines = [f"timm resnet50, 64x64, batch 8, {args.steps} AdamW steps, target density {DENSITY}, 1 thread; "
             f"dense peak RSS {dense / 2**20:.0f} MiB",
             "| method | granularity | state B / targeted weight | target | met | peak RSS MiB | vs dense MiB | "
             "state by attribute (B / weight) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        if r["method"] == "dense+distill":
            lines.append(f"| dense+distill | - | - | - | - | {r['peak_rss'] / 2**20:.0f} | "
                         f"{(r['peak_rss'] - dense) / 2**20:+.0f} | teacher: a frozen copy of the model |")
            continue
        target = METHODS[r["method"].removesuffix("+distill")][1]
        if r["method"].startswith("l0") and r["granularity"] != "unstructured":
            target = None  # the project's L0 figure is for unstructured gates
        met = "-" if target is None else ("yes" if r["bytes_per_weight"] <= target else "no")
        parts = ", ".join(f"{k} {v / r['targeted_weights']:.3g}" for k, v in
                          sorted(r["state"].items(), key=lambda kv: -kv[1]) if v / r["targeted_weights"] >= 0.001)
        lines.append(f"| {r['method']} | {r['granularity']} | {r['bytes_per_weight']:.3f} | "
                     f"{'-' if target is None else f'<= {target:g}'} | {met} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{(r['peak_rss'] - dense) / 2**20:+.0f} | {parts} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
