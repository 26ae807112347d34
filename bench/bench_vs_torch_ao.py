"""A peer baseline: torch.ao.pruning's ``WeightNormSparsifier`` with its cubic schedule (``CubicSL``).

It trains through the same code path as ``hf-sparse train recipes/fmnist_lenet300_gmp.yaml``: the
same data, model and initialisation (``training.seed``), optimizer (AdamW), learning rate and
schedule, batch size and epochs, with the recipe's ``sparsity.method`` set to ``none`` and torch.ao
doing the pruning instead, on the same steps as the recipe's gmp schedule (start at
``start_fraction``, end at ``end_fraction`` of the optimizer steps, a mask update every
``frequency`` steps and at the end). The sparsifier is torch.ao's unstructured configuration
(``sparse_block_shape=(1, 1)``, ``zeros_per_block=1``: per-layer magnitude), its masks live in
torch's parametrizations (pruned weights keep their values and get zero gradient), and
``squash_mask()`` writes the final zeros before evaluation.

Only Linear weights are pruned: ``WeightNormSparsifier`` assumes 2-D weights and fails on the 4-D
weights of Conv2d, so for LeNet-5 the convolutions stay dense and the density is that of the
Linear weights (LeNet-300-100 is all Linear, so there it covers exactly what hf_sparse prunes).

Each run is written as ``OUT/torch_ao/d<density>/s<seed>/results.json`` in the layout of
``hf-sparse compare``, so pointing ``--out`` at a compare folder and rerunning the same compare
command (which retrains nothing already complete) adds a ``torch_ao`` row to its tables and plot.

    OMP_NUM_THREADS=1 python bench/bench_vs_torch_ao.py --density 0.1 0.02 --seeds 0 1 2 --jobs 2 \\
        --out runs/compare_lenet300
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"lenet300": "fmnist_lenet300_gmp.yaml", "lenet5": "fmnist_lenet5_gmp.yaml"}
LABEL = "torch_ao"


def run(recipe_file: str, density: float, seed: int, out_dir: Path, extra: list[str]) -> dict:
    import torch
    from torch import nn
    from torch.ao.pruning import WeightNormSparsifier
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
    from transformers import TrainerCallback

    from hf_sparse import __version__
    from hf_sparse.config.recipe import load_recipe
    from hf_sparse.methods.schedules import resolve_step
    from hf_sparse.training.run import make_trainer, prepare_run

    recipe = load_recipe(REPO / "recipes" / recipe_file, [f"sparsity.target_density={density:g}", *extra])
    gmp = recipe.sparsity.method_config()  # the schedule's steps are the gmp recipe's
    recipe = load_recipe(REPO / "recipes" / recipe_file,
                         ["sparsity.method=none", "sparsity.target_density=null", "sparsity.params={}", "sparsity.targets={}",
                          f"training.seed={seed}", "training.disable_tqdm=true", *extra])
    prepared = prepare_run(recipe, out_dir)
    model = prepared.model
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    sparsifier = WeightNormSparsifier(sparsity_level=1.0 - density, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in linear])
    trainer = make_trainer(prepared)
    schedule: dict = {}

    class TorchAOPruning(TrainerCallback):
        """The gmp recipe's steps, from Trainer's own step count; after each optimizer step advance
        the cubic schedule, and refresh the masks on the update steps."""

        def on_train_begin(self, args, state, control, **kwargs):
            t0 = resolve_step(gmp.start_step, gmp.start_fraction, state.max_steps)
            t_end = max(t0 + 1, resolve_step(gmp.end_step, gmp.end_fraction, state.max_steps))
            schedule.update(t0=t0, t_end=t_end, frequency=gmp.frequency, scheduler=CubicSL(
                sparsifier, init_sl=0.0, init_t=t0, delta_t=1, total_t=t_end - t0, initially_zero=True))

        def on_step_end(self, args, state, control, **kwargs):
            step, t0, t_end = state.global_step - 1, schedule["t0"], schedule["t_end"]
            schedule["scheduler"].step()  # sparsity level for t = global_step
            if step == t_end or (t0 <= step < t_end and (step - t0) % gmp.frequency == 0):
                sparsifier.step()

    trainer.add_callback(TorchAOPruning())
    started = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - started
    sparsifier.squash_mask()
    metrics = trainer.evaluate()
    weights = {name: model.get_submodule(name).weight.detach() for name in linear}
    per_layer = {f"{n}.weight": float((w != 0).float().mean()) for n, w in weights.items()}
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    results = {
        "method": "torch_ao.WeightNormSparsifier+CubicSL", "target_density": density,
        "achieved_density": nonzero / sum(w.numel() for w in weights.values()),
        "model_density": sum(int((p != 0).sum()) for p in model.parameters())
                         / sum(p.numel() for p in model.parameters()),
        "per_layer": per_layer, "eval": {k.removeprefix("eval_"): v for k, v in metrics.items()},
        "train_runtime_s": runtime, "train_steps": output.global_step, "world_size": 1,
        "schedule": {k: v for k, v in schedule.items() if k != "scheduler"}, "recipe": recipe_file,
        "torch_version": torch.__version__, "hf_sparse_version": __version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(RECIPES), default="lenet300")
    ap.add_argument("--density", type=float, nargs="+", default=[0.1, 0.02])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    ap.add_argument("--epochs", type=float, default=None, help="override training.num_train_epochs (quick checks)")
    ap.add_argument("--out", default="runs/bench_vs_torch_ao", help="a compare folder (adds its torch_ao row)")
    args = ap.parse_args()
    out = Path(args.out)
    extra = [] if args.epochs is None else [f"training.num_train_epochs={args.epochs}"]
    plan = [(d, s, out / LABEL / f"d{d:g}" / f"s{s}") for d in args.density for s in args.seeds]
    context = multiprocessing.get_context("spawn")
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # one interpreter per run
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, **fresh) as pool:
        futures = [pool.submit(run, RECIPES[args.model], d, s, path, extra) for d, s, path in plan]
        for (d, s, path), future in zip(plan, futures):
            r = future.result()
            print(f"torch.ao density={d:g} seed={s}: achieved {r['achieved_density']:.4f}, "
                  f"accuracy {r['eval']['accuracy']:.4f} ({r['train_runtime_s']:.0f} s) -> {path}", flush=True)


if __name__ == "__main__":
    main()
