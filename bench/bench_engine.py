"""Dense vs sparsity methods on LeNet-300-100 + Fashion-MNIST, side by side in one process.

Every variant starts from the same initial weights and sees the same batches. For each batch the
variants take one training step each (forward, backward, the method's hooks, Adam step) in
rotating order, so the CPU's fast and slow phases hit all of them alike. The script reports the
median per-step time ratio to dense, and the achieved density and test accuracy after training.
Hyper-parameters and sparsity settings are read from recipes/fmnist_lenet300_<variant>.yaml
(variants: gmp, gradual, dns, l0_constrained, l0_augmented, autoprune, ...).

    python bench/bench_engine.py [--epochs 10] [--density 0.1] [--methods gmp gradual dns]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from hf_sparse import Sparsifier, load_recipe
from hf_sparse.data import load_data
from hf_sparse.models import build_model

REPO = Path(__file__).resolve().parents[1]


def evaluate(model, data, batch=1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.eval), batch):
            b = data.collator(data.eval.__getitems__(list(range(i, min(i + batch, len(data.eval))))))
            correct += int((model(b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum())
    model.train()
    return correct / len(data.eval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--methods", nargs="+", default=["gmp", "gradual", "dns"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dense_recipe = load_recipe(REPO / "recipes/fmnist_lenet300_dense.yaml")
    tr = dense_recipe.training
    data = load_data(dense_recipe.data)
    torch.manual_seed(tr["seed"])
    base = build_model(dense_recipe.model, data)
    steps_per_epoch = math.ceil(len(data.train) / tr["per_device_train_batch_size"])
    total = int(args.epochs * steps_per_epoch)

    variants = {}
    for name in ["dense", *args.methods]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=tr["learning_rate"], weight_decay=tr["weight_decay"])
        sp = None
        if name != "dense":
            recipe = load_recipe(REPO / f"recipes/fmnist_lenet300_{name}.yaml", [f"sparsity.target_density={args.density}"])
            sp = Sparsifier(model, recipe.sparsity, seed=tr["seed"])
            sp.setup(total)
            for group in sp.method.param_groups(tr["learning_rate"]):  # gates, auxiliary masks
                opt.add_param_group(group)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        variants[name] = (model, opt, sched, sp)

    def step(name, batch, i) -> float:
        model, opt, sched, sp = variants[name]
        start = time.perf_counter()
        if sp:
            sp.before_forward(i)
        loss = model(**batch).loss
        loss.backward()
        if sp:
            sp.after_backward(i)
        opt.step()
        if sp:
            sp.after_step(i, opt)
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        sched.step()
        return elapsed

    names = list(variants)
    ratios = {n: [] for n in names[1:]}
    g = torch.Generator().manual_seed(tr["seed"])
    i = 0
    while i < total:
        order = torch.randperm(len(data.train), generator=g).tolist()
        for b in range(steps_per_epoch):
            if i >= total:
                break
            idx = order[b * tr["per_device_train_batch_size"]:(b + 1) * tr["per_device_train_batch_size"]]
            batch = data.collator(data.train.__getitems__(idx))
            rot = names[i % len(names):] + names[:i % len(names)]
            times = {n: step(n, batch, i) for n in rot}
            for n in ratios:
                ratios[n].append(times[n] / times["dense"])
            i += 1

    print(f"LeNet-300-100, Fashion-MNIST, {args.epochs:g} epochs ({total} steps), target density {args.density}, "
          f"{args.threads} threads")
    print("| variant | step time / dense (median) | achieved density | test accuracy |")
    print("|---|---|---|---|")
    for name, (model, _, _, sp) in variants.items():
        if sp:
            sp.finalize()
        ratio = "1.00" if name == "dense" else f"{statistics.median(ratios[name]):.3f}"
        density = "1.0000" if sp is None else f"{sp.density():.4f}"
        print(f"| {name} | {ratio} | {density} | {evaluate(model, data):.4f} |")


if __name__ == "__main__":
    main()
