"""The per-weight elementwise work of the methods, timed by itself: what one step pays per tensor.

Two choices in the code rest on these timings:

* Hard Concrete noise (L0 draws it for every gate at every step): the uniform draw from a CPU
  generator (what hf_sparse used) against the counter-based ``hashed_uniform`` (what it uses now;
  eager here, fused into the gate kernels when compiled), then ``log u - log(1 - u)`` as
  ``torch.logit(u)`` (what hf_sparse uses) or as the two-op ``log(u) - log1p(-u)``.
* Applying a keep-mask in place (mask methods after every step): multiplying by a float 0/1 copy,
  by the bool mask viewed as ``uint8`` (what hf_sparse uses: no extra bytes per weight), or by the
  bool mask itself.

    OMP_NUM_THREADS=1 python bench/bench_elementwise.py [--numel 266200 2400000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from hf_sparse.methods.hard_concrete import hashed_uniform, step_keys, uniform


def best_ms(fn: Callable[[], object], repeats: int = 7, calls: int = 20) -> float:
    """Best over ``repeats`` of the mean time of ``calls`` calls, in ms (the least disturbed run)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def operations(n: int) -> dict[str, Callable[[], object]]:
    """The timed operations on tensors of ``n`` elements."""
    gen = torch.Generator().manual_seed(0)
    u = uniform((n,), step_keys(0, 0))
    index, keys = torch.arange(n, dtype=torch.int32), torch.tensor(step_keys(0, 1), dtype=torch.int32)
    compiled = torch.compile(hashed_uniform, dynamic=True)
    keep = torch.rand(n, generator=gen) > 0.5
    as_float, as_uint8 = keep.float(), keep.view(torch.uint8)
    w = torch.randn(n, generator=gen)
    return {
        "uniform draw (CPU generator)": lambda: torch.rand(n, generator=gen),
        "uniform draw (counter-based hash, eager)": lambda: hashed_uniform(index, keys),
        "uniform draw (counter-based hash, compiled)": lambda: compiled(index, keys),
        "noise: torch.logit(u)": lambda: torch.logit(u),
        "noise: log(u) - log1p(-u)": lambda: torch.log(u) - torch.log1p(-u),
        "mask: w *= float 0/1": lambda: w.mul_(as_float),
        "mask: w *= bool viewed as uint8": lambda: w.mul_(as_uint8),
        "mask: w *= bool": lambda: w.mul_(keep),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, nargs="+", default=[266_200, 2_400_000],
                    help="tensor sizes (266,200: LeNet-300-100's weights)")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| numel | operation | ms |")
    print("|---|---|---|")
    for n in args.numel:
        for name, fn in operations(n).items():
            print(f"| {n:,} | {name} | {best_ms(fn):.3f} |")


if __name__ == "__main__":
    main()
