"""``to_sparse_runtime``: swap a model's sparse Linear/GRU/LSTM layers for sparse-kernel modules.

Sparsity is read from the weights' zeros, so any ``nn.Module`` works, whether or not hf_sparse
trained it. Each layer is decided alone (see :func:`hf_sparse.runtime.formats.choose_format`) and
every decision, conversions and fallbacks alike, is logged with its reason and kept in
``model.sparse_runtime_report``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import DTYPES, FormatChoice, choose_format

logger = logging.getLogger("hf_sparse.runtime")

DEFAULT_THRESHOLD = 0.5


def kernels_available() -> str | None:
    """None when the compiled kernels can run, else why not."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numba is not installed (pip install 'hf_sparse[runtime]')"
    return None


def _unsupported(module: nn.Module) -> str | None:
    params = list(module.parameters(recurse=False))
    if any(p.device.type != "cpu" for p in params):
        return "weights are not on the CPU"
    if any(p.dtype != torch.float32 for p in params):
        return f"dtype {params[0].dtype} (the kernels are float32)"
    if getattr(module, "proj_size", 0):
        return "LSTM proj_size is not supported"
    return None


def _rnn_choices(rnn: nn.RNNBase, threshold: float) -> tuple[dict[str, FormatChoice], str | None]:
    """Per-weight choices; a recurrent layer converts only if every ``weight_hh`` goes sparse."""
    choices = {name: choose_format(p.detach(), threshold) for name, p in rnn.named_parameters(recurse=False)
               if name.startswith("weight_")}
    dense_hh = [n for n, c in choices.items() if n.startswith("weight_hh") and c.block == 0]
    if dense_hh:
        return choices, "; ".join(f"{n}: {choices[n].reason}" for n in dense_hh)
    return choices, None


#: A candidate converts only where measured at least this much faster at every batch size: the ~30 ms
#: timings spread by about 10% on a busy machine, and a layer timed at 1.08x at batch 32 (the FSDD
#: LSTM) ran its model 0.95x end to end; a layer near break-even gains nothing worth that risk.
MIN_MEASURED_GAIN = 1.1

#: Time steps of the input a recurrent layer is timed on (its whole loop, input projections included).
TIMING_STEPS = 16


def _measured_gain(dense_fn, sparse_fn) -> float:
    """Speed-up of the sparse layer over the dense one, from a few ms of paired timing (median ratio)."""
    from .speed import paired_timing

    with torch.no_grad():
        return paired_timing(dense_fn, sparse_fn, budget_s=0.03, min_pairs=7, warmup=1)["speedup"]


def _layer_input(module: nn.Module, batch: int) -> torch.Tensor:
    """A random input of ``batch`` rows as the layer runs: (batch, in) for a Linear, ``TIMING_STEPS``
    frames of (batch, input_size) for a GRU/LSTM (in its own ``batch_first`` layout)."""
    gen = torch.Generator().manual_seed(batch)
    if isinstance(module, nn.Linear):
        return torch.randn(batch, module.in_features, generator=gen)
    shape = (batch, TIMING_STEPS) if module.batch_first else (TIMING_STEPS, batch)
    return torch.randn(*shape, module.input_size, generator=gen)


def measure_layer(dense: nn.Module, sparse: nn.Module, batch_sizes: Sequence[int]) -> dict[int, float]:
    """Batch size -> speed-up of ``sparse`` over ``dense``, each timed whole as it runs (a Linear on a
    batch; a GRU/LSTM over ``TIMING_STEPS`` frames: input projections, the recurrent loop and the gate
    arithmetic), the two interleaved call by call on the same input."""
    gains = {}
    for batch in batch_sizes:
        x = _layer_input(dense, int(batch))
        gains[int(batch)] = _measured_gain(lambda x=x: dense(x), lambda x=x: sparse(x))
    return gains


def _measured_text(gains: Mapping[int, float]) -> str:
    return ", ".join(f"{g:.2f}x at batch {b}" for b, g in gains.items())


def _block_of(fmt: str) -> int:
    """``csr`` -> 1, ``bsrBxB`` -> B, ``dense`` -> 0 (the storage names the report uses)."""
    if fmt == "csr":
        return 1
    if fmt.startswith("bsr"):
        return int(fmt[3:].partition("x")[0])
    if fmt == "dense":
        return 0
    raise ValueError(f"unknown runtime format {fmt!r} (csr, bsrBxB or dense)")


def load_decisions(decisions: Mapping[str, Any] | str | Path) -> dict[str, dict[str, Any]]:
    """Decisions as :func:`to_sparse_runtime` records them (``model.sparse_runtime_decisions``), from a
    mapping or a JSON file: layer name -> ``{"converted": bool, "formats": {weight: format}}``."""
    if isinstance(decisions, (str, Path)):
        decisions = json.loads(Path(decisions).read_text())
    out = {}
    for name, d in dict(decisions).items():
        if not isinstance(d, Mapping) or not isinstance(d.get("converted"), bool):
            raise ValueError(f"runtime decision for {name!r} must be a mapping with a boolean 'converted'")
        out[str(name)] = {"converted": d["converted"], "formats": dict(d.get("formats") or {}),
                          **({"measured": dict(d["measured"])} if d.get("measured") else {})}
    return out


def _record(report: list[dict[str, Any]], name: str, kind: str, converted: bool, formats: dict[str, str],
            density: float, reason: str, measured: Mapping[int, float] | None = None) -> None:
    entry = {"layer": name, "type": kind, "converted": converted, "formats": formats,
             "density": round(density, 6), "reason": reason}
    if measured:
        entry["measured"] = {str(b): round(g, 3) for b, g in measured.items()}
    report.append(entry)
    logger.info("%s %s (%s): %s", "sparse" if converted else "dense fallback", name or "<model>", kind, reason)


def _candidate(module: nn.Module, kind: str, threshold: float) -> tuple[dict[str, int] | None, dict[str, str], str]:
    """(block per weight, or None when the layer stays dense; formats; the reason) from the zeros alone."""
    if kind == "Linear":
        choice = choose_format(module.weight.detach(), threshold)
        return ({"weight": choice.block} if choice.block else None), {"weight": choice.format}, choice.reason
    choices, why_dense = _rnn_choices(module, threshold)
    formats = {n: c.format for n, c in choices.items()}
    if why_dense:
        return None, formats, why_dense
    hh = "weight_hh " + ", ".join(f"{c.format} at density {c.density:.3f} (est. {c.estimated_speedup:.1f}x)"
                                  for n, c in choices.items() if n.startswith("weight_hh"))
    return {n: c.block for n, c in choices.items()}, formats, hh


def _build(module: nn.Module, kind: str, blocks: Mapping[str, int], dtype: str = "float32") -> nn.Module:
    from .layers import SparseLinear, SparseRNN

    if kind == "Linear":
        return SparseLinear(module, blocks["weight"], dtype).eval()
    return SparseRNN(module, dict(blocks), dtype).eval()


def to_sparse_runtime(model: nn.Module, threshold: float = DEFAULT_THRESHOLD, *, inplace: bool = False,
                      calibrate: bool = True, batch_sizes: Sequence[int] = (1,),
                      decisions: Mapping[str, Any] | str | Path | None = None, dtype: str = "float32") -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) in eval mode with its sparse layers on sparse kernels.

    Every ``nn.Linear`` whose weight density is at most ``threshold``, and every ``nn.GRU``/``nn.LSTM``
    whose recurrent weights are, is a candidate when the cost model (read from the zeros) expects the
    sparse kernels to be faster. With ``calibrate`` (the default) each candidate is then timed whole,
    as it runs, against its dense form at every batch size in ``batch_sizes`` (a Linear on a batch; a
    recurrent layer over ``TIMING_STEPS`` frames: input projections, loop and gate arithmetic), and is
    converted only where it is at least ``MIN_MEASURED_GAIN`` (1.1x) faster at all of them; the measured ratios are logged and kept per
    layer (``measured``). Small, cache-resident layers and large batches, where dense BLAS wins, stay
    dense with that figure as their reason. ``calibrate=False`` converts every candidate untimed.

    ``decisions`` (a mapping, or a JSON file of one, as ``model.sparse_runtime_decisions`` records:
    layer -> ``{"converted": bool, "formats": {weight: "csr" | "bsrBxB" | "dense"}}``) reproduces a
    conversion without timing; layers it does not name stay dense. Every decision is logged with its
    reason and kept in ``model.sparse_runtime_report``. Inference only: the converted modules run
    without autograd on CPU float32.

    ``dtype="int8"`` stores every converted layer's sparse weights as symmetric int8 with a float32
    scale per stored block (per row for CSR), dequantised in the kernels' registers: a quarter of
    the weight bytes, outputs within int8 rounding of float32 (see docs/runtime.md); weights that
    stay dense stay float32. The calibration times the int8 layer.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown runtime dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    given = load_decisions(decisions) if decisions is not None else None
    report: list[dict[str, Any]] = []
    missing = kernels_available()
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            kind = "Linear"
        elif type(module) in (nn.GRU, nn.LSTM):
            kind = type(module).__name__
        else:
            continue
        weights = [p for n, p in module.named_parameters(recurse=False) if n.startswith("weight")]
        density = sum(int((p != 0).sum()) for p in weights) / max(sum(p.numel() for p in weights), 1)
        why_not = missing or _unsupported(module)
        if why_not:
            _record(report, name, kind, False, {}, density, why_not)
            continue
        if given is not None:
            decided = given.get(name)
            if decided is None or not decided["converted"]:
                _record(report, name, kind, False, (decided or {}).get("formats", {}), density,
                        "dense by the given decisions" + ("" if decided else " (layer not named)"),
                        {int(b): g for b, g in (decided or {}).get("measured", {}).items()})
                continue
            blocks = {w: _block_of(f) for w, f in decided["formats"].items()}
            new = _build(module, kind, blocks, dtype)
            replacements.append((name, new))
            _record(report, name, kind, True, decided["formats"], density, "converted by the given decisions",
                    {int(b): g for b, g in decided.get("measured", {}).items()})
            continue
        blocks, formats, reason = _candidate(module, kind, threshold)
        if blocks is None:
            _record(report, name, kind, False, formats, density, reason)
            continue
        new = _build(module, kind, blocks, dtype)
        # decided on the figures as recorded (3 decimals), so the report never disagrees with the decision
        gains = {b: round(g, 3) for b, g in measure_layer(module, new, batch_sizes).items()} if calibrate else None
        if gains is not None and min(gains.values()) < MIN_MEASURED_GAIN:
            slower = [b for b, g in gains.items() if g < MIN_MEASURED_GAIN]
            _record(report, name, kind, False, {w: "dense" for w in formats}, density,
                    f"{reason}; whole layer measured {_measured_text(gains)} (slower at batch "
                    f"{', '.join(map(str, slower))}" + ("" if min(gains.values()) < 1.0 else
                                                       f" or less than {MIN_MEASURED_GAIN:g}x faster") + ")", gains)
            continue
        replacements.append((name, new))
        _record(report, name, kind, True, formats, density,
                reason + ("" if gains is None else f"; whole layer measured {_measured_text(gains)}"), gains)
    for name, new in replacements:
        if not name:
            model = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.eval()
    for entry in report:
        entry["dtype"] = dtype if entry["converted"] else "float32"
    model.sparse_runtime_report = report
    model.sparse_runtime_decisions = {e["layer"]: {"converted": e["converted"], "formats": e["formats"],
                                                   **({"measured": e["measured"]} if "measured" in e else {})}
                                      for e in report}
    return model
