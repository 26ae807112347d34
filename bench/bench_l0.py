"""L0 gates on Fashion-MNIST: a penalty sweep against constrained (and augmented) control.

The penalty form (Louizos et al. 2018) buys *some* density for each lambda; the constrained form
(Gallego-Posada et al. 2022) and the augmented Lagrangian (Wang et al. 2020) are given the density.
Each row is one recipe trained through the same code path as ``hf-sparse train`` (same seed and
batches as its dense row), with only one key changed (``--model lenet300``; ``lenet5`` has the
dense and constrained recipes):

* dense:        ``recipes/fmnist_lenet300_dense.yaml``
* penalty:      ``recipes/fmnist_lenet300_l0_penalty.yaml``     ``--set sparsity.params.penalty=LAMBDA``
* constrained:  ``recipes/fmnist_lenet300_l0_constrained.yaml`` ``--set sparsity.target_density=T``
* augmented:    ``recipes/fmnist_lenet300_l0_augmented.yaml``   ``--set sparsity.target_density=T``

Prints a Markdown table (achieved density from the final hard masks, test accuracy, the gap to the
dense run of the same seed) and writes it, with the raw numbers as JSON, into ``--out``. ``--jobs 2``
runs two recipes at a time in separate processes (give each one thread: ``OMP_NUM_THREADS=1``).

    OMP_NUM_THREADS=1 python bench/bench_l0.py [--targets 0.5 0.2 0.1 0.05] [--penalties 0.05 0.2 0.5 2]
        [--controls constrained augmented] [--epochs 10] [--out runs/bench_l0]
    OMP_NUM_THREADS=1 python bench/bench_l0.py --model lenet5 --targets 0.02 --penalties --controls constrained
        --seeds 0 1 --jobs 2 --out runs/bench_l0_lenet5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hf_sparse.config.recipe import load_recipe
from hf_sparse.training.run import make_trainer, prepare_run

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "lenet300": {
        "dense": "fmnist_lenet300_dense.yaml",
        "penalty": "fmnist_lenet300_l0_penalty.yaml",
        "constrained": "fmnist_lenet300_l0_constrained.yaml",
        "augmented": "fmnist_lenet300_l0_augmented.yaml",
    },
    "lenet5": {
        "dense": "fmnist_lenet5_dense.yaml",
        "constrained": "fmnist_lenet5_l0_constrained.yaml",
    },
}


def run(recipe_file: str, kind: str, out: Path, overrides: list[str]) -> dict:
    recipe = load_recipe(REPO / "recipes" / recipe_file, overrides)
    trainer = make_trainer(prepare_run(recipe, out))
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    ev = trainer.evaluate()
    row = {"kind": kind, "overrides": overrides, "accuracy": ev["eval_accuracy"], "train_s": runtime,
           "density": 1.0, "target": recipe.sparsity.target_density, "seed": trainer.args.seed}
    if trainer.sparsifier is not None:
        row["density"] = trainer.sparsifier.density()
        row["per_layer"] = {k: v["density"] for k, v in trainer.sparsifier.per_layer().items()}
        row["metrics"] = trainer.sparsifier.method.metrics()
    return row


def table(rows: list[dict]) -> str:
    dense = {r["seed"]: r["accuracy"] for r in rows if r["kind"] == "dense"}
    lines = ["| control | setting | seed | target density | achieved density | accuracy | vs dense | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = r.get("setting", "")
        target = "-" if r["target"] is None else f"{r['target']:g}"
        ref = dense.get(r["seed"])
        gap = "-" if ref is None or r["kind"] == "dense" else f"{100 * (r['accuracy'] - ref):+.2f} pt"
        lines.append(f"| {r['kind']} | {setting} | {r['seed']} | {target} | {r['density']:.4f} | {r['accuracy']:.4f} "
                     f"| {gap} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(RECIPES), default="lenet300")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--penalties", type=float, nargs="*", default=[0.05, 0.2, 0.5, 2.0])
    ap.add_argument("--controls", nargs="*", default=["constrained", "augmented"],
                    choices=["constrained", "augmented"])
    ap.add_argument("--epochs", type=float, default=None, help="override training.num_train_epochs everywhere")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override training.seed (one row each)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    ap.add_argument("--out", default="runs/bench_l0")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every run, e.g. training.learning_rate=0.001")
    args = ap.parse_args()
    recipes = RECIPES[args.model]
    out = Path(args.out)
    common = ["training.disable_tqdm=true", "training.logging_steps=1000", *args.set]
    if args.epochs is not None:
        common.append(f"training.num_train_epochs={args.epochs}")
    plan = [] if args.no_dense else [("dense", "", [])]
    plan += [("penalty", f"lambda={lam:g}", [f"sparsity.params.penalty={lam}"]) for lam in args.penalties]
    plan += [(c, f"target={t:g}", [f"sparsity.target_density={t}"]) for c in args.controls for t in args.targets]
    missing = sorted({kind for kind, _, _ in plan} - set(recipes))
    if missing:
        ap.error(f"--model {args.model} has no recipe for {', '.join(missing)}")
    seeds = [None] if args.seeds is None else args.seeds
    jobs = []
    for seed in seeds:
        for kind, setting, sets in plan:
            name = f"{kind}-{setting.replace('=', '')}" if setting else kind
            if seed is not None:
                name, sets = f"{name}-seed{seed}", [*sets, f"training.seed={seed}"]
            jobs.append((kind, setting, out / name, [*common, *sets]))
    context = multiprocessing.get_context("spawn")
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # one interpreter per run
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, **fresh) as pool:
        futures = [pool.submit(run, recipes[kind], kind, path, sets) for kind, _, path, sets in jobs]
        rows = []
        for (kind, setting, _, _), future in zip(jobs, futures):
            row = future.result()
            row["setting"] = setting
            rows.append(row)
            print(f"{kind:12s} {setting:14s} seed={row['seed']} density={row['density']:.4f} "
                  f"accuracy={row['accuracy']:.4f} ({row['train_s']:.0f} s)", flush=True)
    text = table(rows)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
