"""Dense vs sparsity methods on Fashion-MNIST, side by side in one process.

Every variant starts from the same initial weights and sees the same batches. For each batch the
variants take one training step each (forward, backward, the method's hooks, Adam step) in
rotating order, so the CPU's fast and slow phases hit all of them alike. The script reports the
median per-step time ratio to dense, and the achieved density and test accuracy after training.
Sparsity settings are read from recipes/fmnist_lenet300_<variant>.yaml (variants: gmp, gradual,
dns, l0_constrained, l0_augmented, autoprune, ...). ``--model`` picks the network: LeNet-300-100
(its dense recipe's training settings), or a conv model (timm ``resnet18`` from
recipes/fmnist_resnet18_dense.yaml, images resized to ``--image-size``) with the same methods on
every Conv2d/Linear weight.

    python bench/bench_engine.py [--epochs 10] [--density 0.1] [--methods gmp gradual dns]
    python bench/bench_engine.py --model resnet18 --image-size 64 --steps 40 --methods gmp dns l0_constrained
    python bench/bench_engine.py --epochs 1 --methods l0_constrained --breakdown   # + ms per phase of a step
    python bench/bench_engine.py --device cuda --bf16 --steps 300 ...   # on a GPU (bench/gpu_check.sh)
    python bench/bench_engine.py --gate-kernels eager ...   # L0's gate kernels uncompiled (default: compiled)
    python bench/bench_engine.py --clock cpu ...   # CPU time of the thread: robust on a busy machine
    python bench/bench_engine.py --distill --steps 300 --methods gmp   # + each variant distilled from
                                                                      #   a frozen copy of the start ("self")
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from hf_sparse import Sparsifier, load_recipe
from hf_sparse.config.recipe import DistillationConfig
from hf_sparse.data import load_data
from hf_sparse.methods import gate_kernels
from hf_sparse.models import build_model

REPO = Path(__file__).resolve().parents[1]


#: the parts of one training step, timed separately for ``--breakdown``
PHASES = ("before_forward", "forward+backward", "after_backward", "optimizer", "after_step")

#: --model -> the dense recipe whose model, data and training settings the bench uses.
MODELS = {"lenet300": "recipes/fmnist_lenet300_dense.yaml", "resnet18": "recipes/fmnist_resnet18_dense.yaml"}


def evaluate(model, data, limit: int, batch: int = 500, device: str = "cpu") -> float:
    model.eval()
    correct, n = 0, min(limit, len(data.eval))
    with torch.no_grad():
        for i in range(0, n, batch):
            b = data.collator(data.eval.__getitems__(list(range(i, min(i + batch, n)))))
            logits = model(b["pixel_values"].to(device)).logits
            correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
    model.train()
    return correct / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--methods", nargs="+", default=["gmp", "gradual", "dns"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    ap.add_argument("--image-size", type=int, default=None, help="resize the images (conv models)")
    ap.add_argument("--steps", type=int, default=None, help="train this many steps instead of --epochs")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the dense recipe's)")
    ap.add_argument("--eval-samples", type=int, default=10_000)
    ap.add_argument("--breakdown", action="store_true", help="also print the median time of each phase of a step")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (timed with a synchronize at each mark)")
    ap.add_argument("--bf16", action="store_true", help="forward and backward under bf16 autocast")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this thread's CPU time (thread_time), which a busy machine's "
                         "preemptions do not inflate (CPU device, one thread only)")
    ap.add_argument("--gate-kernels", choices=["auto", "eager", "compiled"], default="compiled",
                    help="L0's fused gate kernels: compiled (default here: what a full-length run gets), eager, or "
                         "auto (compiled only for runs of >= 2^30 gate-steps; a 1-epoch bench is below that)")
    ap.add_argument("--distill", action="store_true", help="also time each variant distilled from a frozen copy "
                                                           "of the starting weights (teacher 'self', kl)")
    args = ap.parse_args()
    gate_kernels.set_mode(args.gate_kernels)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        ap.error("--clock cpu measures this thread only: use it with --device cpu --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    sets = [f"data.image_size={args.image_size}"] if args.image_size else []
    if args.batch:
        sets.append(f"training.per_device_train_batch_size={args.batch}")
    dense_recipe = load_recipe(REPO / MODELS[args.model], sets)
    tr = dense_recipe.training
    data = load_data(dense_recipe.data)
    torch.manual_seed(tr["seed"])
    base = build_model(dense_recipe.model, data)
    steps_per_epoch = math.ceil(len(data.train) / tr["per_device_train_batch_size"])
    total = args.steps or int(args.epochs * steps_per_epoch)

    variants = {}
    names = ["dense", *args.methods]
    if args.distill:
        names += [f"{n}+distill" for n in names]
    for name in names:
        method, distilled = name.removesuffix("+distill"), name.endswith("+distill")
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=tr["learning_rate"], weight_decay=tr["weight_decay"])
        sp = None
        if method != "dense":
            overrides = [f"sparsity.target_density={args.density}"]
            if args.model != "lenet300":  # the method's settings, on the conv model's Conv2d/Linear weights
                overrides.append("sparsity.targets.include_head=false")
            recipe = load_recipe(REPO / f"recipes/fmnist_lenet300_{method}.yaml", overrides)
            sp = Sparsifier(model, recipe.sparsity, seed=tr["seed"])
            sp.setup(total)
            for group in sp.method.param_groups(tr["learning_rate"]):  # gates, auxiliary masks
                opt.add_param_group(group)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        distiller = None
        if distilled:
            from hf_sparse.training.distill import Distiller

            distiller = Distiller(model, DistillationConfig(teacher="self"))
        variants[name] = (model, opt, sched, sp, distiller)

    phases = {n: {p: [] for p in PHASES} for n in variants}

    def step(name, batch, i) -> float:
        model, opt, sched, sp, distiller = variants[name]

        def mark():
            sync()
            marks.append(clock())

        marks: list[float] = []
        mark()
        if sp:
            sp.before_forward(i)
        mark()
        with autocast():
            out = model(**batch)
            loss = out.loss if distiller is None else distiller.combine(out.loss, out, batch, model)
        loss.backward()
        mark()
        if sp:
            sp.after_backward(i)
        mark()
        opt.step()
        mark()
        if sp:
            sp.after_step(i, opt)
        opt.zero_grad(set_to_none=True)
        mark()
        sched.step()
        for phase, a, b in zip(PHASES, marks, marks[1:]):
            phases[name][phase].append(b - a)
        return marks[-1] - marks[0]

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
            batch = {k: v.to(device) for k, v in data.collator(data.train.__getitems__(idx)).items()}
            rot = names[i % len(names):] + names[:i % len(names)]
            times = {n: step(n, batch, i) for n in rot}
            for n in ratios:
                ratios[n].append(times[n] / times["dense"])
            i += 1

    size = f", {args.image_size}x{args.image_size} images" if args.image_size else ""
    where = f"{args.threads} threads" if device.type == "cpu" else str(device) + (", bf16 autocast" if args.bf16 else "")
    print(f"{args.model}, Fashion-MNIST{size}, batch {tr['per_device_train_batch_size']}, {total} steps, "
          f"target density {args.density}, {where}, gate kernels {args.gate_kernels}, {args.clock} clock")
    print("| variant | step time / dense (median) | achieved density | test accuracy |")
    print("|---|---|---|---|")
    for name, (model, _, _, sp, _) in variants.items():
        if sp:
            sp.finalize()
        ratio = "1.00" if name == "dense" else f"{statistics.median(ratios[name]):.3f}"
        density = "1.0000" if sp is None else f"{sp.density():.4f}"
        print(f"| {name} | {ratio} | {density} | {evaluate(model, data, args.eval_samples, device=device):.4f} |")
    if args.breakdown:
        print("\nms per step (median) in each phase of the step")
        print("| variant | " + " | ".join(PHASES) + " |")
        print("|---|" + "---|" * len(PHASES))
        for name, times in phases.items():
            print(f"| {name} | " + " | ".join(f"{1e3 * statistics.median(times[p]):.2f}" for p in PHASES) + " |")


if __name__ == "__main__":
    main()
