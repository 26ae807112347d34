"""Paired timing of a dense model against its sparse runtime, for benchmarks and model cards.

The CPU drifts between fast and slow phases, so timing one variant after the other measures the
drift: the two run alternately (one call each, the order swapped every pair) on the same input,
and the figure is the median of the per-pair ratios dense / runtime.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..families import example_inputs


def paired_timing(dense: Callable[[], Any], sparse: Callable[[], Any], *, budget_s: float = 0.3,
                  min_pairs: int = 5, max_pairs: int = 1000, warmup: int = 2) -> dict[str, float]:
    """Alternate ``dense()`` and ``sparse()`` for about ``budget_s`` seconds; medians and pair count."""
    for _ in range(warmup):
        dense()
        sparse()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    ratios: list[float] = []
    start = time.perf_counter()
    pair = 0
    while pair < max_pairs and (pair < min_pairs or time.perf_counter() - start < budget_s):
        order = (("dense", dense), ("sparse", sparse)) if pair % 2 == 0 else (("sparse", sparse), ("dense", dense))
        took = {}
        for name, fn in order:
            t = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - t
            times[name].append(took[name])
        ratios.append(took["dense"] / took["sparse"])
        pair += 1
    return {"speedup": statistics.median(ratios), "dense_ms": 1e3 * statistics.median(times["dense"]),
            "runtime_ms": 1e3 * statistics.median(times["sparse"]), "pairs": pair}


def measure_runtime_speedup(model: nn.Module, runtime_model: nn.Module, inputs: dict[str, torch.Tensor], *,
                            budget_s: float = 0.3) -> dict[str, Any]:
    """Batch-1 CPU latency of ``model`` vs ``runtime_model`` on ``inputs``, with the conditions."""
    model.eval()
    with torch.no_grad():
        timing = paired_timing(lambda: model(**inputs), lambda: runtime_model(**inputs), budget_s=budget_s)
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    return {"speedup": round(timing["speedup"], 3), "dense_ms": round(timing["dense_ms"], 4),
            "runtime_ms": round(timing["runtime_ms"], 4), "pairs": timing["pairs"],
            "input_shapes": shapes, "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32",
            "torch": torch.__version__}


def checkpoint_speed(model: nn.Module, *, budget_s: float = 0.3) -> dict[str, Any]:
    """What a checkpoint's card states about speed: the runtime's batch-1 CPU speed-up, or why none.

    Measured only when the runtime converts at least one layer (the density makes it worthwhile and
    the layer, timed whole at batch 1, beats its dense form) and a batch-1 input can be built from the
    model's config; otherwise the reason, with each layer's own measured figure, is recorded instead.
    The per-layer figures that decided the conversion (``layer_speedups``) and the decisions
    themselves (``decisions``: ``to_sparse_runtime(..., decisions=...)`` reproduces the conversion)
    are recorded beside the end-to-end figure.
    """
    from .convert import to_sparse_runtime

    try:
        runtime = to_sparse_runtime(model)
    except Exception as e:  # the card must not cost the checkpoint: record why, never raise
        return {"measured": False, "reason": f"conversion failed: {type(e).__name__}: {e}"}
    converted = [e for e in runtime.sparse_runtime_report if e["converted"]]
    layers = {e["layer"]: e["measured"] for e in runtime.sparse_runtime_report if e.get("measured")}
    if not converted:
        reasons = "; ".join(f"{e['layer']}: {e['reason']}" for e in runtime.sparse_runtime_report[:4])
        return {"measured": False, "reason": "the runtime keeps every layer dense" + (f" ({reasons})" if reasons else "")}
    inputs = example_inputs(model, frames=100)  # a second of speech: the card's speed is per 100 frames
    if not isinstance(inputs, dict):  # a positional image tensor: a timm model, whose convolutions stay dense
        return {"measured": False, "reason": f"no example input is known for {type(model).__name__}"}
    was_training = model.training
    try:
        result = measure_runtime_speedup(model, runtime, inputs, budget_s=budget_s)
    except Exception as e:
        return {"measured": False, "reason": f"timing failed: {type(e).__name__}: {e}"}
    finally:
        model.train(was_training)
    formats = sorted({f for e in converted for f in e["formats"].values() if f != "dense"})
    return {"measured": True, **result, "converted_layers": [e["layer"] for e in converted], "formats": formats,
            "layer_speedups": layers, "decisions": runtime.sparse_runtime_decisions}


def speed_sentence(speed: dict[str, Any] | None) -> str | None:
    """The model card's statement of a checkpoint's ``runtime_speed`` (None: nothing to state)."""
    if not speed:
        return None
    if not speed.get("measured"):
        return f"Not measured with the sparse runtime: {speed.get('reason', 'no reason recorded')}."
    shapes = ", ".join(f"`{k}` {'×'.join(map(str, v))}" for k, v in speed["input_shapes"].items())
    return (f"With `runtime=\"sparse\"` ({', '.join(speed['formats'])} kernels on {len(speed['converted_layers'])} "
            f"layer(s)) this model ran **{speed['speedup']:.2f}×** the speed of its dense form: "
            f"{speed['runtime_ms']:.3f} ms vs {speed['dense_ms']:.3f} ms per batch-1 forward on {shapes} "
            f"(CPU, {speed['dtype']}, {speed['threads']} thread(s), torch {speed['torch']}; median of "
            f"{speed['pairs']} interleaved pairs, measured when the checkpoint was saved)."
            + (" Each layer timed whole against its dense form at batch 1 (converted where faster): "
               + ", ".join(f"`{name}` {g['1']:.2f}×" for name, g in speed["layer_speedups"].items() if "1" in g)
               + "." if speed.get("layer_speedups") else ""))
