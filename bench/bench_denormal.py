"""Why pruned weights' optimizer state matters on CPU: ``sqrt`` over normal, zero and subnormal floats.

Masked gradients leave Adam's second moment ``v`` of a pruned weight to decay by ``beta2`` per
step: it turns subnormal and, in float32, stays there (``v * beta2`` rounds back to ``v``). This
times ``v.sqrt().add_(eps)`` (Adam's denominator) over each kind of value, side by side, and
counts the steps until ``v`` leaves the normal range and until it stops changing. Then it times
whole AdamW steps (``--adam-numel`` weights, zero gradient) with the moments AutoPrune's pruned
weights can hold: normal, both zero (zeroing at every step), a subnormal first moment, a
subnormal second moment (left to decay for long), and the second moment floored at
``autoprune.V_FLOOR`` (what AutoPrune does).

    OMP_NUM_THREADS=1 python bench/bench_denormal.py [--numel 2000000] [--beta2 0.999] [--v0 1e-4]
        [--adam-numel 266200]
"""

from __future__ import annotations

import argparse
import time

import torch


def best_time(v: torch.Tensor, repeats: int = 7, calls: int = 10) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            v.sqrt().add_(1e-8)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=2_000_000)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--v0", type=float, default=1e-4, help="second moment when the weight is pruned")
    ap.add_argument("--adam-numel", type=int, default=266_200, help="weights of the AdamW steps (LeNet-300-100's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tiny = torch.finfo(torch.float32).tiny
    kinds = {"normal": 1e-6, "zero": 0.0, "subnormal": 1e-40}
    times = {k: best_time(torch.full((args.numel,), v)) for k, v in kinds.items()}
    for k, t in times.items():
        print(f"sqrt over {k:9s}: {t:.3f} s per 10 calls ({t / times['normal']:.1f}x normal)")
    v, steps = torch.tensor([args.v0]), 0
    while v.item() >= tiny:
        v.mul_(args.beta2)
        steps += 1
    normal_steps = steps
    while v.item() > 0:  # in float32, v * beta2 rounds back to v once v is a few hundred ulps
        before = v.item()
        v.mul_(args.beta2)
        steps += 1
        if v.item() == before:
            break
    end = "zero" if v.item() == 0 else f"stuck at the subnormal {v.item():.3g} (v * beta2 rounds to v)"
    print(f"v = {args.v0:g} under zero gradients, beta2 = {args.beta2}: subnormal after {normal_steps} steps, "
          f"{end} after {steps}")
    for name, ms in adam_steps(args.adam_numel).items():
        print(f"AdamW step, {args.adam_numel:,} weights, moments {name}: {ms:.3f} ms")


def adam_steps(n: int, rounds: int = 30) -> dict[str, float]:
    """Median ms of one AdamW step over ``n`` weights with zero gradients, per kind of moments
    (interleaved rounds, so a busy CPU slows every kind alike)."""
    from hf_sparse.methods.autoprune import V_FLOOR

    kinds = {"normal": (1e-5, 1e-8), "zero (m = v = 0)": (0.0, 0.0), "m subnormal": (1e-40, 1e-8),
             "v subnormal": (1e-5, 1e-40), f"v floored at {V_FLOOR:.3g}": (1e-40, V_FLOOR)}
    runs = {}
    for name in kinds:
        p = torch.nn.Parameter(torch.randn(n))
        opt = torch.optim.AdamW([p], lr=1e-3)
        p.grad = torch.zeros(n)
        opt.step()
        runs[name] = (p, opt)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, (p, opt) in runs.items():
            m, v = kinds[name]
            opt.state[p]["exp_avg"].fill_(m)
            opt.state[p]["exp_avg_sq"].fill_(v)
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    return {k: 1e3 * sorted(t)[len(t) // 2] for k, t in times.items()}


if __name__ == "__main__":
    main()
