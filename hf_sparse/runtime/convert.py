"""``to_sparse_runtime``: swap a model's sparse Linear/GRU/LSTM layers for sparse-kernel modules.

Sparsity is read from the weights' zeros, so any ``nn.Module`` works, whether or not hf_sparse
trained it. Each layer is decided alone (see :func:`hf_sparse.runtime.formats.choose_format`) and
every decision, conversions and fallbacks alike, is logged with its reason and kept in
``model.sparse_runtime_report``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from .formats import FormatChoice, choose_format

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


def _measured_gain(dense_fn, sparse_fn) -> float:
    """Batch-1 speed-up of a sparse kernel over the dense product, from a few ms of paired timing."""
    from .speed import paired_timing

    with torch.no_grad():
        return paired_timing(dense_fn, sparse_fn, budget_s=0.02, min_pairs=7, warmup=1)["speedup"]


def _linear_gain(dense: nn.Linear, sparse: nn.Module) -> float:
    x = torch.randn(1, dense.in_features)
    return _measured_gain(lambda: dense(x), lambda: sparse(x))


def _recurrent_gain(rnn: nn.RNNBase, sparse: nn.Module) -> float:
    """The recurrent product alone (the step loop around it costs the same either way)."""
    from . import kernels

    w = rnn.weight_hh_l0.detach()
    h = torch.randn(1, rnn.hidden_size)
    rec = sparse.cells[0][1]
    ht, y = h.numpy().T.copy(), np.empty((w.shape[0], 1), np.float32)
    return _measured_gain(lambda: torch.nn.functional.linear(h, w),
                          lambda: kernels.spmm(rec.block, rec.indptr, rec.indices, rec.data, ht, y))


def _record(report: list[dict[str, Any]], name: str, kind: str, converted: bool, formats: dict[str, str],
            density: float, reason: str) -> None:
    entry = {"layer": name, "type": kind, "converted": converted, "formats": formats,
             "density": round(density, 6), "reason": reason}
    report.append(entry)
    logger.info("%s %s (%s): %s", "sparse" if converted else "dense fallback", name or "<model>", kind, reason)


def to_sparse_runtime(model: nn.Module, threshold: float = DEFAULT_THRESHOLD, *, inplace: bool = False,
                      calibrate: bool = True) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) in eval mode with its sparse layers on sparse kernels.

    Every ``nn.Linear`` whose weight density is at most ``threshold``, and every ``nn.GRU``/``nn.LSTM``
    whose recurrent weights are, becomes a :class:`SparseLinear`/:class:`SparseRNN` when the measured
    cost model says the sparse kernel is faster and, with ``calibrate``, a few milliseconds of paired
    timing at batch 1 confirm it (small layers lose to dense: a kernel call costs ~10 us of fixed
    overhead, and small dense weights sit in cache); the rest stay dense, each with a logged reason.
    Inference only: the converted modules run without autograd on CPU float32.
    """
    from .layers import SparseLinear, SparseRNN

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
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
        if kind == "Linear":
            choice = choose_format(module.weight.detach(), threshold)
            if choice.block == 0:
                _record(report, name, kind, False, {"weight": "dense"}, density, choice.reason)
                continue
            new = SparseLinear(module, choice.block).eval()
            gain = _linear_gain(module, new) if calibrate else None
            if gain is not None and gain < 1.0:
                _record(report, name, kind, False, {"weight": "dense"}, density,
                        f"{choice.format} measured {gain:.2f}x dense at batch 1 (slower)")
                continue
            replacements.append((name, new))
            _record(report, name, kind, True, {"weight": choice.format}, density,
                    choice.reason + ("" if gain is None else f", measured {gain:.2f}x at batch 1"))
            continue
        choices, why_dense = _rnn_choices(module, threshold)
        formats = {n: c.format for n, c in choices.items()}
        if why_dense:
            _record(report, name, kind, False, formats, density, why_dense)
            continue
        new = SparseRNN(module, {n: c.block for n, c in choices.items()}).eval()
        gain = _recurrent_gain(module, new) if calibrate else None
        hh = "weight_hh " + ", ".join(f"{c.format} at density {c.density:.3f} (est. {c.estimated_speedup:.1f}x)"
                                      for n, c in choices.items() if n.startswith("weight_hh"))
        if gain is not None and gain < 1.0:
            _record(report, name, kind, False, formats, density,
                    f"{hh}; weight_hh_l0 product measured {gain:.2f}x dense at batch 1 (slower)")
            continue
        replacements.append((name, new))
        _record(report, name, kind, True, formats, density,
                hh + ("" if gain is None else f"; weight_hh_l0 product measured {gain:.2f}x at batch 1"))
    for name, new in replacements:
        if not name:
            model = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.eval()
    model.sparse_runtime_report = report
    return model
