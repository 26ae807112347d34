"""The ``onnx`` checkpoint format: the sparse model as an ONNX graph, checked against PyTorch.

``save_sparse_checkpoint(model, out, format="onnx")`` (``hf-sparse export --format onnx``,
``export.format: onnx`` in a recipe) writes the usual checkpoint first (purged for structured
runs, dense-with-zeros otherwise; ``sparsity.json`` keeps that storage format) and adds
``model.onnx`` exported from that model with ``torch.onnx.export``'s TorchScript path
(``dynamo=False``, opset :data:`OPSET`). Batch is a dynamic axis; speech models also take a dynamic
number of frames and ``attention_mask``, so padded batches give each utterance its own result.

Before anything is written the ONNX Runtime outputs are compared with PyTorch's on a batch; a
difference above :data:`ATOL` (float32) is an error and no file is left behind. The batch-1 CPU
latency of ONNX Runtime and of PyTorch is measured and recorded in ``sparsity.json`` (``onnx``)
and the card. ``quantize="int8"`` adds ``model.int8.onnx`` from ONNX Runtime's own quantiser
(:func:`quantize_int8`).

The folder runs with nothing but ``onnxruntime`` and ``numpy``; ``load_sparse(folder,
runtime="onnx")`` returns an :class:`OnnxModel`, a callable with the PyTorch model's keyword inputs.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..families import example_batch, graph_signature
from .files import SPARSITY_FILE
from .save_and_load import CheckpointError, read_sparsity

ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
#: The ONNX opset the export targets (GRU/LSTM, Gemm, Conv and attention all map to it).
OPSET = 17
#: Largest absolute difference between ONNX Runtime's and PyTorch's outputs (float32) the export accepts.
ATOL = 1e-4
#: What dynamic int8 quantises: Linear layers and LSTMs. Not Conv: ONNX Runtime's dynamic ConvInteger ran
#: slower than the float32 convolution (the FSDD GRU model's int8 file took 14.1 ms vs 1.9 ms float32).
#: ONNX Runtime has no int8 GRU: GRU weights stay float32.
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM")


# -- the graph's inputs and outputs (which names, which axes vary: hf_sparse.families.graph_signature) ----


def io_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph: the model's own keyword names."""
    sig = graph_signature(model)
    return sig.inputs, sig.outputs


def example_inputs(model: nn.Module, batch: int = 4, frames: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`hf_sparse.families.example_batch` (speech padded; images at the trained size), a model
    whose input size cannot be told being a :class:`CheckpointError`."""
    try:
        return example_batch(model, batch, frames, seed)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _graph_module(model: nn.Module) -> nn.Module:
    """A module taking the graph's inputs positionally and returning its outputs as a tuple."""
    sig = graph_signature(model)
    inputs, outputs = sig.inputs, sig.outputs

    class _Graph(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.inner(**dict(zip(inputs, args))) if sig.keywords else self.inner(args[0])
            if not isinstance(out, (dict, tuple)) and hasattr(out, "shape"):
                return (out,)
            return tuple(out[k] for k in outputs)

    return _Graph(model)


def torch_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The outputs the ONNX graph must reproduce, computed by ``model`` itself (the packed path)."""

    with torch.no_grad():
        out = _graph_module(model).eval()(*inputs.values())
    return [o.detach().cpu().numpy() for o in out]


# -- export, check, latency --------------------------------------------------------------------------------


def require_onnx() -> None:
    """The ONNX packages, or a one-line error saying how to install them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CheckpointError(f"the onnx format needs {' and '.join(missing)}: pip install \"hf_sparse[onnx]\"")


def _session(path: Path | bytes, threads: int = 1):
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, options,
                                providers=["CPUExecutionProvider"])


def max_difference(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return math.inf
    return max(float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) if g.size else 0.0
               for g, w in zip(got, want))


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = OPSET, atol: float = ATOL,
                inputs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Export ``model`` to ``path`` and check ONNX Runtime against PyTorch on ``inputs`` (default:
    :func:`example_inputs`). Raises :class:`CheckpointError` (and writes nothing) when the outputs
    differ by more than ``atol`` or the export fails. Returns the facts for ``sparsity.json``."""
    import io
    import warnings


    require_onnx()
    model = model.eval().float()
    inputs = inputs if inputs is not None else example_inputs(model)
    want = torch_outputs(model, inputs)
    sig = graph_signature(model)
    names_in, names_out = sig.inputs, sig.outputs
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        try:  # in eval mode: the exporter restores the mode of the module it gets, here and in all submodules
            torch.onnx.export(_graph_module(model).eval(), tuple(inputs.values()), buffer, input_names=names_in,
                              output_names=names_out, dynamic_axes=sig.dynamic_axes, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one line
            raise CheckpointError(f"torch.onnx.export failed for {type(model).__name__}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    graph = buffer.getvalue()
    got = _session(graph).run(names_out, {k: v.numpy() for k, v in inputs.items()})
    diff = max_difference(got, want)
    if not diff <= atol:
        raise CheckpointError(f"ONNX Runtime's outputs differ from PyTorch's by {diff:.3g} (> {atol:g}) on a "
                              f"{'x'.join(map(str, next(iter(inputs.values())).shape))} batch; no ONNX file written")
    Path(path).write_bytes(graph)
    import onnxruntime

    return {"file": Path(path).name, "exporter": "torch.onnx.export (TorchScript, dynamo=False)", "opset": opset,
            "inputs": names_in, "outputs": names_out, "dynamic_axes": {k: dict(v) for k, v in sig.dynamic_axes.items()},
            "check": {"max_abs_diff": diff, "atol": atol,
                      "batch_shape": {k: list(v.shape) for k, v in inputs.items()}},
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _interleaved_ms(runs: dict[str, Callable[[], Any]], pairs: int = 30, budget_s: float = 1.5) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in rotating order (the CPU's speed drifts)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    started = time.perf_counter()
    names = list(runs)
    for i in range(pairs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > budget_s and i >= 4:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def onnx_latency(model: nn.Module, sessions: dict[str, Path]) -> dict[str, Any]:
    """Batch-1 CPU latency (ms, one thread) of PyTorch and of each ONNX file, interleaved."""

    inputs = example_inputs(model, batch=1)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graph = _graph_module(model).eval()
        runs: dict[str, Callable[[], Any]] = {}

        def pytorch() -> Any:
            with torch.no_grad():
                return graph(*inputs.values())

        runs["pytorch_ms"] = pytorch
        for name, path in sessions.items():
            runs[f"{name}_ms"] = (lambda s: lambda: s.run(None, feeds))(_session(path))
        ms = _interleaved_ms(runs)
    finally:
        torch.set_num_threads(threads)
    return {**ms, "batch_shape": {k: list(v.shape) for k, v in inputs.items()}, "threads": 1, "device": "cpu"}


# -- int8 ----------------------------------------------------------------------------------------------------


def _static_suits(path: Path) -> bool:
    """Static (QDQ) int8 for convolutional graphs; recurrent graphs stay dynamic (ONNX Runtime quantises
    GRU/LSTM dynamically only), and so do Linear-only ones."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    return "Conv" in ops and not ops & {"GRU", "LSTM", "RNN"}


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_int8(src: Path, dst: Path, *, calibration: list[dict[str, np.ndarray]] | None = None,
                  mode: str = "auto") -> dict[str, Any]:
    """Quantise ``src`` to int8 with ONNX Runtime's quantiser into ``dst``.

    ``mode``: ``dynamic`` (int8 weights, activations quantised at run time: MatMul/Gemm/GRU/LSTM),
    ``static`` (QDQ, activations' ranges from the ``calibration`` feeds: convolutions too) or
    ``auto`` (static for convolutional graphs when calibration feeds are given, else dynamic).
    Weights are symmetric int8 (zero point 0), so a pruned weight (0.0) stays exactly 0.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "auto":
        mode = "static" if calibration and _static_suits(src) else "dynamic"
    if mode not in ("static", "dynamic"):
        raise CheckpointError(f"unknown int8 mode {mode!r}; choose auto, dynamic or static")
    if mode == "static" and not calibration:
        raise CheckpointError("static int8 quantisation needs calibration inputs (the recipe's training data)")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _pre_process(src, Path(tmp) / "prepared.onnx")
        if mode == "static":  # QOperator (QLinearConv...), per-channel weights
            quantize_static(str(prepared), str(dst), _Calibration(calibration), quant_format=QuantFormat.QOperator,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            extra_options={"WeightSymmetric": True})
        else:
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=list(DYNAMIC_OPS), extra_options={"WeightSymmetric": True})
        zeros = zeros_kept(prepared, dst)
    return {"file": dst.name, "mode": mode, "weights": "int8 symmetric (zero point 0)",
            "activations": "uint8 from calibration" if mode == "static" else "uint8, ranges at run time",
            "calibration_batches": len(calibration or []) if mode == "static" else 0,
            "pre_processed": prepared.name != src.name, "zeros": zeros}


def _pre_process(src: Path, dst: Path) -> Path:
    """ONNX Runtime's quantisation pre-processing (shape inference, graph optimisation); symbolic shape
    inference is skipped where it fails (image graphs with dynamic height/width), and ``src`` itself is
    returned when even that fails (the quantiser then works on the graph as exported). Measured on a
    purged resnet18 (batch 1, 224x224, one thread): pre-processed + QOperator static int8 ran 3.0x faster
    than float32; QDQ without pre-processing ran 0.8x."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantisation works without it
            continue
        if dst.is_file():
            return dst
    return src


def zeros_kept(src: Path, dst: Path) -> dict[str, Any]:
    """Count exact zeros of the float weights and of their int8 versions: pruned weights must stay 0.

    An int8 initializer is paired with its float source by ONNX Runtime's naming (``<name>_quantized``,
    or ``<name>_Transposed_quantized`` for a Gemm's weight); every float zero must still be zero.
    """
    import onnx
    from onnx import numpy_helper

    floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(src)).graph.initializer}
    ints = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(dst)).graph.initializer}
    float_zeros = int_zeros = checked = 0
    broken = []
    for name, w in floats.items():
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        q = ints.get(f"{name}_quantized")
        if q is None and w.ndim == 2 and f"{name}_Transposed_quantized" in ints:
            q, w = ints[f"{name}_Transposed_quantized"], w.T  # a Gemm's weight, transposed for MatMulInteger
        if q is None or q.shape != w.shape:
            continue
        checked += 1
        float_zeros += int((w == 0).sum())
        int_zeros += int((q[w == 0] == 0).sum())
        if not np.all(q[w == 0] == 0):
            broken.append(name)
    if broken:
        raise CheckpointError(f"int8 quantisation turned pruned zeros into nonzeros in {broken[:3]}")
    return {"tensors_checked": checked, "float_zeros": float_zeros, "int8_zeros_at_those": int_zeros}


# -- evaluation with ONNX Runtime ------------------------------------------------------------------------------


def recipe_data(recipe_yaml: str | None):
    """The recipe's data bundle (eval split, collator, metrics), or None when there is no recipe."""
    if not recipe_yaml:
        return None
    from ..config.recipe import load_recipe
    from ..data import load_data

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(recipe_yaml)
        recipe = load_recipe(path)
    return load_data(recipe.data)


def _feeds(data, split: str, rows: int, batch_size: int, names: list[str]) -> Iterator[tuple[dict, Any]]:
    ds = getattr(data, split)
    n = min(rows, len(ds))
    for start in range(0, n, batch_size):
        batch = data.collator([ds[i] for i in range(start, min(start + batch_size, n))])
        yield {k: batch[k].numpy().astype(np.int64 if k == "attention_mask" else np.float32) for k in names}, \
            batch.get("labels")


def evaluate_session(path: Path, data, names: list[str], *, max_rows: int = 10_000, batch_size: int = 100) -> dict:
    """The data's own metrics (``compute_metrics``) of an ONNX file over the eval split."""
    from transformers import EvalPrediction

    session = _session(path, threads=1)
    outputs = [o.name for o in session.get_outputs()]
    logits, lengths, labels = [], [], []
    for feed, y in _feeds(data, "eval", max_rows, batch_size, names):
        out = session.run(outputs, feed)
        logits.append(out[0])
        if len(out) > 1:
            lengths.append(out[1])
        labels.append(y.numpy())
    if logits[0].ndim == 3:  # CTC: frames differ per batch; pad to the longest (lengths say what is real)
        frames = max(x.shape[1] for x in logits)
        logits = [np.pad(x, ((0, 0), (0, frames - x.shape[1]), (0, 0))) for x in logits]
        width = max(y.shape[1] for y in labels)
        labels = [np.pad(y, ((0, 0), (0, width - y.shape[1])), constant_values=-100) for y in labels]
    preds = np.concatenate(logits)
    predictions = (preds, np.concatenate(lengths)) if lengths else preds
    metrics = data.compute_metrics(EvalPrediction(predictions=predictions, label_ids=np.concatenate(labels)))
    return {k: float(v) for k, v in metrics.items()}


# -- the checkpoint format ------------------------------------------------------------------------------------


def is_structured(report: dict) -> bool:
    """Whether the run removed whole units/channels (then the ONNX graph is built from the purged model)."""
    from ..grids import GRANULARITIES

    kind = str(report.get("granularity") or "unstructured").split()[0]
    return any(cls.structured and cls.claims(kind) for cls in GRANULARITIES.values()) or bool(report.get("structure"))


def add_onnx(folder: str | Path, *, quantize: str | None = None, recipe_yaml: str | None = None,
             data: Any = None, calibration_rows: int = 64) -> dict[str, Any]:
    """Add ``model.onnx`` (and with ``quantize="int8"`` ``model.int8.onnx``) to a checkpoint folder.

    The graph is exported from the folder's own model (``load_sparse``: the purged one when the
    folder is purged), checked against it, timed, and recorded under ``onnx`` in ``sparsity.json``
    and in the card. int8 needs the recipe's data (``recipe_yaml`` or ``data``) for the accuracy
    before and after, and for calibration when convolutions are quantised statically.
    """
    from .formats import weight_digests
    from .save_and_load import load_sparse

    folder = Path(folder)
    if quantize not in (None, "int8"):
        raise CheckpointError(f"unknown quantisation {quantize!r}; the one offered is int8")
    model = load_sparse(folder, verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ONNX_FILE
        info = export_onnx(model, staged)
        sessions = {"onnxruntime": staged}
        if quantize:
            if data is None:
                data = recipe_data(recipe_yaml or _read_text(folder / "recipe.yaml"))
            if data is None:
                raise CheckpointError("--quantize int8 needs the recipe's data for calibration and accuracy: the "
                                      "checkpoint has no recipe.yaml")
            names = io_names(model)[0]
            calibration = [f for f, _ in _feeds(data, "train", calibration_rows, 16, names)]
            int8 = Path(tmp) / ONNX_INT8_FILE
            info["int8"] = quantize_int8(staged, int8, calibration=calibration)
            info["int8"]["eval_fp32"] = evaluate_session(staged, data, names)
            info["int8"]["eval_int8"] = evaluate_session(int8, data, names)
            sessions["onnxruntime_int8"] = int8
        info["latency"] = onnx_latency(model, sessions)
        for f in sessions.values():
            (folder / f.name).write_bytes(f.read_bytes())
    sparsity = read_sparsity(folder)
    sparsity["onnx"] = info
    sparsity["sha256"] = {**weight_digests(folder), **{f.name: _sha(folder / f.name) for f in sessions.values()}}
    (folder / SPARSITY_FILE).write_text(json.dumps(sparsity, indent=2))
    _card_section(folder, info)
    return info


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _sha(path: Path) -> str:
    from .files import file_sha256

    return file_sha256(path)


def onnx_sentence(info: dict[str, Any]) -> str:
    """The card's ONNX section: files, exporter, check, latency and int8 figures."""
    lat = info.get("latency") or {}
    shapes = ", ".join(f"`{k}` {'×'.join(map(str, v))}" for k, v in (lat.get("batch_shape") or {}).items())
    lines = [f"`{info['file']}`: exported with {info['exporter']}, opset {info['opset']}; inputs "
             f"{', '.join(f'`{n}`' for n in info['inputs'])} (dynamic batch"
             + (", dynamic frames" if "attention_mask" in info["inputs"] else "") + "), outputs "
             f"{', '.join(f'`{n}`' for n in info['outputs'])}. ONNX Runtime's outputs matched PyTorch's within "
             f"{info['check']['max_abs_diff']:.1e} (limit {info['check']['atol']:g}, float32).", ""]
    if lat:
        lines.append(f"Batch-1 CPU latency on {shapes} (one thread, median of interleaved runs, measured at export): "
                     f"PyTorch {lat['pytorch_ms']:.3f} ms, ONNX Runtime {lat['onnxruntime_ms']:.3f} ms"
                     + (f", ONNX Runtime int8 {lat['onnxruntime_int8_ms']:.3f} ms" if "onnxruntime_int8_ms" in lat
                        else "") + ".")
    q = info.get("int8")
    if q:
        fp, i8 = q.get("eval_fp32") or {}, q.get("eval_int8") or {}
        metrics = ", ".join(f"{k} {fp[k]:.4f} → {i8[k]:.4f}" for k in fp if k in i8)
        faster = lat.get("onnxruntime_int8_ms", math.inf) < lat.get("onnxruntime_ms", 0)
        zeros = q["zeros"]
        kept = (f"pruned zeros stay zero: {zeros['int8_zeros_at_those']:,} of {zeros['float_zeros']:,} checked"
                if zeros["float_zeros"] else "none of the quantised tensors holds pruned zeros; GRU weights stay "
                "float32 in any case: ONNX Runtime has no int8 GRU")
        lines += ["", f"`{q['file']}`: ONNX Runtime's {q['mode']} int8 quantisation (weights {q['weights']}; {kept}). "
                  f"Eval split, float32 → int8: {metrics}. "
                  + ("int8 ran faster than float32 here." if faster else
                     "int8 was not faster than float32 on this CPU.")]
    return "\n".join(lines)


def _card_section(folder: Path, info: dict[str, Any]) -> None:
    card = folder / "README.md"
    if not card.is_file():
        return
    text = card.read_text()
    marker = "\n## ONNX\n"
    text = text.split(marker)[0].rstrip("\n") + "\n" + marker + "\n" + onnx_sentence(info) + "\n"
    text += ("\n```python\nimport numpy as np, onnxruntime as ort\nsession = ort.InferenceSession(\"model.onnx\")\n"
             f"outputs = session.run(None, {{{', '.join(repr(n) + ': ...' for n in info['inputs'])}}})\n```\n")
    card.write_text(text)


# -- loading ----------------------------------------------------------------------------------------------------


class OnnxOutput(dict):
    """The graph's outputs by name, also readable as attributes (``out.logits``), like a ModelOutput."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OnnxModel:
    """An ONNX checkpoint run by ONNX Runtime, called like the PyTorch model it came from.

    ``model(pixel_values=x)`` or ``model(input_features=f, attention_mask=m)`` with numpy arrays or
    torch tensors returns an :class:`OnnxOutput` (``logits``, and ``output_lengths`` for CTC) of
    the same kind. ``config`` is the checkpoint's transformers config when it has one.
    """

    def __init__(self, folder: str | Path, *, int8: bool = False, threads: int = 1):
        self.folder = Path(folder)
        self.path = self.folder / (ONNX_INT8_FILE if int8 else ONNX_FILE)
        if not self.path.is_file():
            raise CheckpointError(f"{self.folder} holds no {self.path.name}: export it with "
                                  f"hf-sparse export ... --format onnx" + (" --quantize int8" if int8 else ""))
        self.session = _session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.main_input_name = self.input_names[0]
        self.config = None
        if (self.folder / "config.json").is_file():
            try:
                from transformers import AutoConfig

                from .. import models  # noqa: F401  (hf_sparse's configs)

                self.config = AutoConfig.from_pretrained(self.folder)
            except (ValueError, OSError, KeyError):
                self.config = None

    def __call__(self, *args: Any, **inputs: Any) -> OnnxOutput:
        inputs.update(dict(zip(self.input_names, args)))
        missing = [n for n in self.input_names if n not in inputs]
        if self.input_names[1:] == ["attention_mask"] and missing == ["attention_mask"]:
            x = inputs[self.input_names[0]]
            inputs["attention_mask"] = np.ones(tuple(x.shape[:2]), np.int64)
            missing = []
        if missing:
            raise TypeError(f"{self.path.name} needs the inputs {self.input_names}; missing {missing}")
        torch_in = any(type(v).__module__.startswith("torch") for v in inputs.values())
        feeds = {}
        for name in self.input_names:
            v = inputs[name]
            v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            feeds[name] = v.astype(np.int64 if name == "attention_mask" else np.float32)
        out = self.session.run(self.output_names, feeds)
        if torch_in:
            out = [torch.from_numpy(o) for o in out]
        return OnnxOutput(zip(self.output_names, out))

    def eval(self) -> OnnxModel:
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, inputs={self.input_names}, outputs={self.output_names})"


def load_onnx(folder: str | Path, *, int8: bool = False, digests: dict[str, str] | None = None) -> OnnxModel:
    """The :class:`OnnxModel` of an ONNX checkpoint folder (``model.onnx``, or ``model.int8.onnx``).

    With ``digests`` (``sparsity.json``'s ``sha256``) the file must match its recorded SHA-256.
    """
    model = OnnxModel(folder, int8=int8)
    if digests is not None and model.path.name in digests and _sha(model.path) != digests[model.path.name]:
        raise CheckpointError(f"{model.path}: SHA-256 differs from the one recorded in {SPARSITY_FILE}: the file "
                              "was changed or damaged after saving (load_sparse(..., verify=False) skips the check)")
    return model


__all__ = ["ATOL", "ONNX_FILE", "ONNX_INT8_FILE", "OPSET", "OnnxModel", "OnnxOutput", "add_onnx", "example_inputs",
           "export_onnx", "io_names", "load_onnx", "quantize_int8", "zeros_kept"]
