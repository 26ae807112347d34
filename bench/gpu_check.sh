#!/usr/bin/env bash
# GPU checks of hf_sparse, run where CUDA is present; elsewhere prints "no GPU" and exits 0.
# Sections (each prints its own header; add new ones below as further "section_*" blocks):
#   1. semi-structured 2:4 sparsity: torch.sparse.to_sparse_semi_structured on a 4096x4096 Linear
#      (compute capability >= 8.0): outputs vs dense, and speed vs dense at batch 1 / 64 / 1024.
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
