"""AutoPrune's straight-through estimates side by side: identity vs leaky_relu vs softplus.

Each variant is the recipe ``recipes/fmnist_lenet5_autoprune.yaml`` (LeNet-5, Fashion-MNIST, target
density 0.05) with only ``sparsity.params.ste`` changed, trained through the same code path as
``hf-sparse train`` (one run after another, same seed, same batches). Optionally the dense recipe
as the reference. Prints a Markdown table: test accuracy, achieved density, weights restored (pruned
and later back: distinct weights, and 0->1 events), and writes it as JSON next to the runs.

    python bench/bench_autoprune.py [--epochs 5] [--density 0.05] [--stes identity leaky_relu softplus] [--dense]
                                    [--seed 0] [--set sparsity.params.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hf_sparse.config.recipe import load_recipe
from hf_sparse.training.run import make_trainer, prepare_run

REPO = Path(__file__).resolve().parents[1]


def run(recipe_path: Path, out: Path, overrides: list[str]) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    trainer = make_trainer(prepare_run(recipe, out))
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    ev = trainer.evaluate()
    row = {"accuracy": ev["eval_accuracy"], "train_s": runtime, "density": 1.0}
    if trainer.sparsifier is not None:
        m = trainer.sparsifier.method.metrics()
        row.update(density=trainer.sparsifier.density(), restored_weights=int(m["restored_weights"]),
                   restore_events=int(m["restore_events"]),
                   per_layer={k: v["density"] for k, v in trainer.sparsifier.per_layer().items()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--stes", nargs="+", default=["identity", "leaky_relu", "softplus"])
    ap.add_argument("--dense", action="store_true", help="also train the dense recipe as the reference")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every run")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides for every sparse run")
    ap.add_argument("--out", default="runs/bench_autoprune")
    args = ap.parse_args()
    out = Path(args.out)
    common = [f"training.num_train_epochs={args.epochs}", f"training.seed={args.seed}", "training.disable_tqdm=true",
              "training.logging_steps=500"]
    rows = {}
    if args.dense:
        rows["dense"] = run(REPO / "recipes/fmnist_lenet5_dense.yaml", out / "dense", common)
        print("dense", rows["dense"], flush=True)
    for ste in args.stes:
        sets = [*common, f"sparsity.target_density={args.density}", f"sparsity.params.ste={ste}", *args.set]
        rows[ste] = run(REPO / "recipes/fmnist_lenet5_autoprune.yaml", out / ste, sets)
        print(ste, rows[ste], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"epochs": args.epochs, "target": args.density, "seed": args.seed, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nLeNet-5 / Fashion-MNIST, {args.epochs:g} epochs, seed {args.seed}, target density {args.density}\n")
    print("| variant | test accuracy | density | restored weights (distinct) | restore events |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.4f} | {r['density']:.4f} | {r.get('restored_weights', '-')} | "
              f"{r.get('restore_events', '-')} |")


if __name__ == "__main__":
    main()
