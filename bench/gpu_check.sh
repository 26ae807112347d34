#!/usr/bin/env bash
# GPU checks of hf_sparse, run where CUDA is present; elsewhere prints "no GPU" and exits 0.
# Sections (each prints its own header; add new ones below as further "section_*" blocks):
#   1. semi-structured 2:4 sparsity: torch.sparse.to_sparse_semi_structured on a 4096x4096 Linear
#      (compute capability >= 8.0): outputs vs dense, and speed vs dense at batch 1 / 64 / 1024.
#   2. step cost of every method on CUDA with bf16 autocast, interleaved with dense in one process
#      (bench/bench_engine.py --device cuda --bf16): LeNet-300-100 and timm resnet18 at 64x64; L0's
#      gate kernels compiled (Triton), the ratios printed against the CPU targets (l0 <= 1.5 / 1.25,
#      autoprune <= 1.3 / 1.15 on LeNet / resnet18).
#   3. the speech GRU on CUDA (cuDNN, flatten_parameters): dense and gradual recipes for 300 steps
#      with bf16, steps per second and the density reached.
#   5. (printed after 2) L0's fused gate kernels on CUDA, compiled: the counter-based noise has the
#      CPU's bits, the outputs match the eager CPU kernels, and the time per call for 11.2M gates.
#   4. with 2 or more GPUs: the two-rank DDP test (masks equal on both ranks after every step, every
#      method and granularity) and the SparseTrainer FSDP2 tests (masks = one process, resume,
#      export) on CUDA/nccl (HF_SPARSE_TEST_DEVICE=cuda). With one GPU: skipped, says so.
#
#   bash bench/gpu_check.sh            (uses .venv/bin/python when present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no GPU"
    exit 0
fi

"$PY" - <<'PYEOF'
import time

import torch
import torch.nn.functional as F


def section(title):
    print(f"\n== {title} ==", flush=True)


def timed(fn, reps=50):
    """Median CUDA-event time of fn() in ms, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def mask_2_4(w):
    """Keep the 2 largest-magnitude weights of every 4 consecutive ones in a row (2:4)."""
    groups = w.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(w.shape)


props = torch.cuda.get_device_properties(0)
print(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, torch {torch.__version__}")

# -- section 1 -------------------------------------------------------------------------------------
section("1. semi-structured 2:4 Linear 4096x4096 (fp16): correctness and speed vs dense")
if (props.major, props.minor) < (8, 0):
    print(f"skipped: needs compute capability >= 8.0, this GPU has {props.major}.{props.minor}")
else:
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    w = w * mask_2_4(w)
    assert float((w != 0).float().mean()) == 0.5
    ws = to_sparse_semi_structured(w)
    print("| batch | dense ms | 2:4 ms | speed-up | max abs diff (relative to max |y|) |")
    print("|---|---|---|---|---|")
    for batch in (1, 64, 1024):
        x = torch.randn(batch, 4096, device="cuda", dtype=torch.float16)
        try:
            ref, out = F.linear(x, w), F.linear(x, ws)
            diff = float((ref - out).abs().max() / ref.abs().max())
            t_dense, t_sparse = timed(lambda: F.linear(x, w)), timed(lambda: F.linear(x, ws))
            ok = "ok" if diff < 1e-2 else "MISMATCH"
            print(f"| {batch} | {t_dense:.4f} | {t_sparse:.4f} | {t_dense / t_sparse:.2f}x | {diff:.1e} {ok} |")
        except Exception as e:  # report and go on: one batch size failing says something too
            print(f"| {batch} | - | - | - | failed: {type(e).__name__}: {e} |")
PYEOF

METHODS="gmp gradual dns l0_constrained autoprune"

echo; echo "== 2. step cost on CUDA, bf16 autocast, interleaved with dense (median ratio) =="
"$PY" bench/bench_engine.py --device cuda --bf16 --steps 300 --eval-samples 2000 --methods $METHODS --breakdown \
    || echo "section 2 (lenet300) failed: exit $?"
"$PY" bench/bench_engine.py --device cuda --bf16 --model resnet18 --image-size 64 --steps 300 --eval-samples 2000 \
    --methods $METHODS --breakdown || echo "section 2 (resnet18) failed: exit $?"

echo; echo "== 5. L0's fused gate kernels on CUDA (compiled) against the eager CPU ones =="
"$PY" - <<'PYEOF' || echo "section 5 failed: exit $?"
import math, time

import torch

from hf_sparse.methods import gate_kernels as gk
from hf_sparse.methods import hard_concrete as hc

n = 11_200_000  # resnet18's targeted weights
inv_beta, shift = 1 / hc.BETA, hc.BETA * math.log(-hc.GAMMA / hc.ZETA)
g = torch.Generator().manual_seed(0)
cpu = dict(la=(torch.randn(n, generator=g) * 3).clamp(-10, 10).bfloat16(), real=torch.randn(n, generator=g),
           grad=torch.randn(n, generator=g), keys=torch.tensor(hc.step_keys(0, 1, "l0:0"), dtype=torch.int32),
           off=torch.tensor(0, dtype=torch.int32))
gpu = {k: v.cuda() for k, v in cpu.items()}
idx = torch.arange(n, dtype=torch.int32)
same = torch.equal(torch.compile(hc.hashed_uniform, dynamic=True)(idx.cuda(), gpu["keys"]).cpu(),
                   hc.hashed_uniform(idx, cpu["keys"]))
print(f"noise bits CUDA compiled = CPU eager: {same}")
res = {}
for name, t, compiled in (("cpu", cpu, False), ("cuda", gpu, True)):
    out, grad, param = torch.empty_like(t["real"]), t["grad"].clone(), torch.empty_like(t["real"])
    s = gk.run("train_write", compiled, t["la"], t["real"], out, t["keys"], t["off"], inv_beta, shift)
    la_grad = gk.run("train_grads", compiled, t["la"], t["real"], grad, param, t["keys"], t["off"], inv_beta, shift,
                     torch.tensor(0.3, device=t["la"].device))
    res[name] = [x.float().cpu() for x in (out, s, la_grad, grad)]
for label, a, b in zip(("W*z", "sum P", "dL/dlog_alpha", "dL/dW"), res["cpu"], res["cuda"]):
    print(f"{label}: max |CUDA - CPU| = {float((a - b).abs().max()):.2e} (max |value| {float(a.abs().max()):.2e})")
t = gpu
out = torch.empty_like(t["real"])
for _ in range(3):
    gk.run("train_write", True, t["la"], t["real"], out, t["keys"], t["off"], inv_beta, shift)
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(20):
    gk.run("train_write", True, t["la"], t["real"], out, t["keys"], t["off"], inv_beta, shift)
torch.cuda.synchronize()
print(f"train_write, {n:,} gates: {(time.perf_counter() - start) / 20 * 1e3:.3f} ms per call")
PYEOF

echo; echo "== 3. speech GRU on CUDA (cuDNN), bf16, 300 steps =="
OUT3=$(mktemp -d)
for recipe in fsdd_gru_dense fsdd_gru_gradual; do
    if "$PY" -m hf_sparse train "recipes/$recipe.yaml" --output-dir "$OUT3/$recipe" \
        --set training.max_steps=300 training.bf16=true training.use_cpu=false > "$OUT3/$recipe.log" 2>&1; then
        "$PY" - "$OUT3/$recipe/results.json" "$recipe" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: {r['train_steps'] / r['train_runtime_s']:.1f} steps/s, density {r.get('achieved_density', 1.0)}, "
      f"accuracy {r['eval'].get('accuracy')}")
PYEOF
    else
        echo "$recipe failed; last lines of its log:"; tail -5 "$OUT3/$recipe.log"
    fi
done

echo; echo "== 4. DDP and FSDP2 on CUDA/nccl, two ranks =="
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$NGPU" -lt 2 ]; then
    echo "skipped: $NGPU GPU (two ranks need two GPUs with nccl)"
else
    HF_SPARSE_TEST_DEVICE=cuda "$PY" -m pytest -q tests/test_distributed.py tests/test_fsdp_trainer.py \
        || echo "section 4 failed: exit $?"
fi
