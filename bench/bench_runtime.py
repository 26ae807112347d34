"""Dense torch layers vs the sparse runtime (hf_sparse.runtime), side by side in one process.

Cases: nn.GRU / nn.LSTM (input size = hidden, ``--steps`` time steps, weight_ih and weight_hh
pruned alike) and nn.Linear (hidden x hidden), at hidden 512/1024, densities 0.2/0.1/0.05,
unstructured or block-pruned (16x16, 8x8 blocks kept at random), batch 1 and 8, the runtime's
weights in float32 and int8 (``--dtypes``), 1 and 2 intra-op threads (torch's dense kernels use them; the runtime's kernels run on one thread). Each case
alternates dense and runtime calls on the same input (order swapped every pair) for
``--budget`` seconds and reports the median per-pair ratio dense/runtime and the largest
absolute output difference. Layers are converted with ``calibrate=False`` so that every row
times the sparse kernels, including the cases where ``to_sparse_runtime`` would keep them dense.
With ``--gru-vs-lstm`` each case instead times a GRU and an LSTM of the same size in one rotation
(with their dense forms) and compares their speed-ups, so that both see the same load.

With ``--checkpoint DIR`` it instead classifies (or CTC-decodes) the test split of the
checkpoint's own recipe end to end, `--batch-size` utterances at a time (default 1), with the checkpoint loaded dense and
with ``runtime="sparse"`` (the two alternate per utterance), and reports utterances per second of
each, their median per-utterance ratio and whether every prediction agrees.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_runtime.py [--kinds gru,lstm,linear]
        [--hidden 512,1024] [--densities 0.2,0.1,0.05] [--structures unstructured,16x16,8x8]
        [--batches 1,8] [--dtypes float32,int8] [--threads 1,2] [--steps 100] [--budget 1.0] [--out results.json]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_runtime.py --gru-vs-lstm [same grid options, --kinds ignored]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_runtime.py --checkpoint runs/fsdd_gru_gradual_block/model
        [--batch-size 32] [--decide-at 1,32] [--dtype int8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sparse.runtime import SparseLinear, SparseRNN, to_sparse_runtime  # noqa: E402
from hf_sparse.runtime.speed import paired_timing  # noqa: E402


@torch.no_grad()
def prune_(module: nn.Module, density: float, block: int, gen: torch.Generator) -> None:
    """Zero each weight matrix at random to ``density``, entry by entry or in ``block x block`` blocks."""
    for name, p in module.named_parameters():
        if not name.startswith("weight"):
            continue
        rows, cols = p.shape
        if block == 1:
            keep = torch.rand(rows, cols, generator=gen) < density
        else:
            keep = torch.rand(rows // block, cols // block, generator=gen) < density
            keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
        p.mul_(keep)


def build(kind: str, hidden: int) -> nn.Module:
    if kind == "gru":
        return nn.GRU(hidden, hidden)
    if kind == "lstm":
        return nn.LSTM(hidden, hidden)
    return nn.Linear(hidden, hidden)


F32 = 4  # bytes per float32


def product_bytes(weight_bytes: int, k: int, m: int, n: int) -> int:
    """Bytes one product y[n, m] = x[n, k] W^T moves: the weight once, its input and its output."""
    return weight_bytes + F32 * n * (k + m)


def weight_bytes(product) -> int:
    """Bytes a runtime product (a ``SparseProduct``) or a ``SparseWeight`` reads for its weight."""
    sparse = getattr(product, "sparse", product)
    return sparse.nbytes if sparse is not None else F32 * product.dense.numel()


def bytes_per_call(model: nn.Module, kind: str, batch: int, steps: int) -> int:
    """Bytes a call moves: every weight as stored (values, indices, row pointers; dense: rows x cols
    floats) each time it is read, plus each product's input and output activations. A recurrent
    layer reads weight_ih once (one product over all frames) and weight_hh once per step."""
    if kind == "linear":
        w = weight_bytes(model.product) if isinstance(model, SparseLinear) else F32 * model.weight.numel()
        return product_bytes(w, model.in_features, model.out_features, batch)
    if isinstance(model, SparseRNN):
        ih, hh = model.cells[0][0], model.cells[0][1]
        w_ih, w_hh, g = weight_bytes(ih), weight_bytes(hh), hh.shape[0]
    else:
        w_ih, w_hh, g = F32 * model.weight_ih_l0.numel(), F32 * model.weight_hh_l0.numel(), model.weight_hh_l0.shape[0]
    hidden = g // (3 if kind == "gru" else 4)
    return product_bytes(w_ih, hidden, g, steps * batch) + steps * product_bytes(w_hh, hidden, g, batch)


def dense_matvec_bandwidth(rows: int, cols: int, budget: float) -> float:
    """Bytes/s of torch's dense float32 matrix-vector product on a rows x cols matrix (the ceiling the
    rows are measured against: a batch-1 product streams its matrix from memory)."""
    w, x = torch.randn(rows, cols), torch.randn(cols)
    timing = paired_timing(lambda: torch.mv(w, x), lambda: torch.mv(w, x), budget_s=budget)
    return product_bytes(F32 * rows * cols, cols, rows, 1) / (timing["dense_ms"] * 1e-3)


def kernel_rows(hidden: int, density: float, structure: str, batch: int, budget: float, bandwidth: float,
                dtypes: tuple[str, ...] = ("float32",)) -> list[dict]:
    """One GRU-sized weight_hh (3*hidden x hidden) product at ``batch``: torch dense against the runtime's
    kernel (each of ``dtypes``), torch's CSR/BSR and (if installed) scipy's CSR/BSR, each timed paired
    with the dense one."""
    from hf_sparse.runtime import kernels
    from hf_sparse.runtime.formats import to_sparse_weight

    gen = torch.Generator().manual_seed(0)
    block = 1 if structure == "unstructured" else int(structure.split("x")[0])
    layer = nn.Linear(hidden, 3 * hidden, bias=False)
    prune_(layer, density, block, gen)
    w = layer.weight.detach().contiguous()
    x = torch.randn(batch, hidden)
    xt = x.t().contiguous().numpy()
    y = np.empty((batch, w.shape[0]), np.float32)
    candidates = {}
    for dtype in dtypes:
        sw = to_sparse_weight(w, block, dtype)
        name = "runtime " + sw.format + ("" if dtype == "float32" else " " + dtype)
        candidates[name] = (lambda sw=sw: kernels.spmm(sw.block, sw.indptr, sw.indices, sw.data, xt, y, True, sw.scale),
                            sw.nbytes)
    xt_t = torch.from_numpy(xt)
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    csr = w.to_sparse_csr()
    csr_bytes = F32 * csr.values().numel() + 8 * (csr.col_indices().numel() + csr.crow_indices().numel())
    candidates["torch csr"] = (lambda: torch.mm(csr, xt_t), csr_bytes)
    if block > 1:
        bsr = w.to_sparse_bsr((block, block))
        bsr_bytes = F32 * bsr.values().numel() + 8 * (bsr.col_indices().numel() + bsr.crow_indices().numel())
        candidates[f"torch bsr{block}x{block}"] = (lambda: torch.mm(bsr, xt_t), bsr_bytes)
    try:
        import scipy.sparse as sp
    except ImportError:
        sp = None
    if sp is not None:
        wn = w.numpy()
        s_csr = sp.csr_matrix(wn)
        candidates["scipy csr"] = (lambda: s_csr @ xt, s_csr.data.nbytes + s_csr.indices.nbytes + s_csr.indptr.nbytes)
        if block > 1:
            s_bsr = sp.bsr_matrix(wn, blocksize=(block, block))
            candidates[f"scipy bsr{block}x{block}"] = (lambda: s_bsr @ xt,
                                                       s_bsr.data.nbytes + s_bsr.indices.nbytes + s_bsr.indptr.nbytes)
    rows = []
    with torch.no_grad():
        for name, (fn, wbytes) in candidates.items():
            fn()
            timing = paired_timing(lambda: torch.nn.functional.linear(x, w), fn, budget_s=budget)
            moved = product_bytes(wbytes, hidden, w.shape[0], batch)
            dense_moved = product_bytes(F32 * w.numel(), hidden, w.shape[0], batch)
            rows.append({"kernel": name, "hidden": hidden, "density": density, "structure": structure, "batch": batch,
                         "dense_ms": timing["dense_ms"], "ms": timing["runtime_ms"], "speedup": timing["speedup"],
                         "mb_per_call": moved / 1e6, "byte_ceiling": dense_moved / moved,
                         "fraction_of_ceiling": moved / (timing["runtime_ms"] * 1e-3) / bandwidth})
    return rows


def make_case(kind: str, hidden: int, density: float, structure: str, batch: int, dtype: str, steps: int):
    """The pruned dense layer, its runtime conversion, an input and the outputs' largest difference."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = 1 if structure == "unstructured" else int(structure.split("x")[0])
    dense = build(kind, hidden).eval()
    prune_(dense, density, block, gen)
    runtime = to_sparse_runtime(dense, calibrate=False, dtype=dtype)  # the kernels themselves, also where they lose
    x = torch.randn(batch, hidden) if kind == "linear" else torch.randn(steps, batch, hidden)
    with torch.no_grad():
        ref, out = dense(x), runtime(x)
        ref, out = (ref[0], out[0]) if kind != "linear" else (ref, out)
    return dense, runtime, x, float((ref - out).abs().max())


def run_case(kind: str, hidden: int, density: float, structure: str, batch: int, dtype: str, threads: int,
             steps: int, budget: float) -> dict:
    dense, runtime, x, diff = make_case(kind, hidden, density, structure, batch, dtype, steps)
    torch.set_num_threads(threads)
    with torch.no_grad():
        timing = paired_timing(lambda: dense(x), lambda: runtime(x), budget_s=budget)
    moved = bytes_per_call(runtime, kind, batch, steps)
    dense_moved = bytes_per_call(dense, kind, batch, steps)
    fmt = ",".join(sorted({f for e in runtime.sparse_runtime_report for f in e["formats"].values()})) or "-"
    return {"kind": kind, "hidden": hidden, "density": density, "structure": structure, "batch": batch,
            "dtype": dtype, "threads": threads, "steps": steps if kind != "linear" else None, "format": fmt,
            "converted": all(e["converted"] for e in runtime.sparse_runtime_report),
            "dense_ms": timing["dense_ms"], "runtime_ms": timing["runtime_ms"], "speedup": timing["speedup"],
            "pairs": timing["pairs"], "max_abs_diff": diff, "mb_per_call": moved / 1e6,
            "byte_ceiling": dense_moved / moved, "runtime_gbs": moved / (timing["runtime_ms"] * 1e-3) / 1e9,
            "dense_gbs": dense_moved / (timing["dense_ms"] * 1e-3) / 1e9}


@torch.no_grad()
def gru_vs_lstm(hidden: int, density: float, structure: str, batch: int, dtype: str, threads: int, steps: int,
                budget: float) -> dict:
    """GRU and LSTM speed-ups timed in one rotation (dense GRU, runtime GRU, dense LSTM, runtime LSTM,
    the order rotated every round) so that both see the same load: timed as separate rows, minutes
    apart, the dense references drifted by up to 2x on a shared machine and the comparison with them.
    ``lstm_over_gru``: median over rounds of the LSTM's speed-up divided by the GRU's."""
    import statistics
    import time

    cases = {kind: make_case(kind, hidden, density, structure, batch, dtype, steps) for kind in ("gru", "lstm")}
    torch.set_num_threads(threads)
    calls = [(kind, role, (lambda m=c[0] if role == "dense" else c[1], x=c[2]: m(x)))
             for kind, c in cases.items() for role in ("dense", "runtime")]
    for _, _, fn in calls:
        fn()
    times = {(kind, role): [] for kind, role, _ in calls}
    rel = []
    start, rounds = time.perf_counter(), 0
    while rounds < 5 or time.perf_counter() - start < budget:
        took = {}
        for kind, role, fn in calls[rounds % 4:] + calls[:rounds % 4]:
            t = time.perf_counter()
            fn()
            took[kind, role] = time.perf_counter() - t
            times[kind, role].append(took[kind, role])
        speedup = {k: took[k, "dense"] / took[k, "runtime"] for k in cases}
        rel.append(speedup["lstm"] / speedup["gru"])
        rounds += 1
    row = {"hidden": hidden, "density": density, "structure": structure, "batch": batch, "dtype": dtype,
           "threads": threads, "steps": steps, "rounds": rounds, "lstm_over_gru": statistics.median(rel)}
    for kind, c in cases.items():
        d, r = (1e3 * statistics.median(times[kind, role]) for role in ("dense", "runtime"))
        row[kind] = {"dense_ms": d, "runtime_ms": r, "speedup": statistics.median(
            a / b for a, b in zip(times[kind, "dense"], times[kind, "runtime"])), "max_abs_diff": c[3]}
    return row


@torch.no_grad()
def run_checkpoint(folder: Path, threads: int, limit: int | None, batch_size: int = 1,
                   decide_at: tuple[int, ...] = (1,), dtype: str = "float32") -> dict:
    """End to end on the checkpoint's test split, ``batch_size`` utterances per call: utterances/s
    dense vs runtime (its sparse weights in ``dtype``), and for a classifier both accuracies. The
    runtime converts each layer only where, timed whole, it beat dense at every batch size in
    ``decide_at`` (its per-layer decisions and measured ratios are in the result)."""
    import statistics
    import time

    from hf_sparse import load_sparse
    from hf_sparse.config.recipe import load_recipe
    from hf_sparse.data import load_data

    torch.set_num_threads(threads)
    bundle = load_data(load_recipe(folder / "recipe.yaml").data)
    dense, sparse = load_sparse(folder), load_sparse(folder, runtime="sparse", batch_sizes=decide_at, dtype=dtype)
    rows = bundle.eval if limit is None else bundle.eval.select(range(min(limit, len(bundle.eval))))
    warm = bundle.collator([rows[0]])
    warm.pop("labels", None)
    dense(**warm), sparse(**warm)  # first calls compile or load the kernels
    times = {"dense": [], "sparse": []}
    ratios, agree, correct = [], 0, {"dense": 0, "sparse": 0}
    chunks = [[rows[j] for j in range(i, min(i + batch_size, len(rows)))] for i in range(0, len(rows), batch_size)]
    for i, chunk in enumerate(chunks):
        batch = bundle.collator(chunk)
        labels = batch.pop("labels", None)
        outs = {}
        for name in (("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")):
            model = dense if name == "dense" else sparse
            t = time.perf_counter()
            outs[name] = model(**batch).logits.argmax(-1)
            times[name].append(time.perf_counter() - t)
        ratios.append(times["dense"][-1] / times["sparse"][-1])
        agree += int((outs["dense"] == outs["sparse"]).reshape(len(chunk), -1).all(1).sum())
        if labels is not None and labels.dim() == 1:  # a classifier: one label per utterance
            for name in correct:
                correct[name] += int((outs[name] == labels).sum())
    n = len(rows)
    decisions = {e["layer"]: {"converted": e["converted"], "measured": e.get("measured")}
                 for e in sparse.sparse_runtime_report if e["type"] != "Linear" or e.get("measured")}
    accuracy = {f"{k}_accuracy": v / n for k, v in correct.items()} if bundle.task.endswith("classification") else {}
    return {"checkpoint": str(folder), "task": bundle.task, "utterances": n, "threads": threads,
            "batch_size": batch_size, "decided_at": list(decide_at), "dtype": dtype, **accuracy, "decisions": decisions,
            "dense_utt_per_s": n / sum(times["dense"]), "runtime_utt_per_s": n / sum(times["sparse"]),
            "dense_ms_median": 1e3 * statistics.median(times["dense"]),
            "runtime_ms_median": 1e3 * statistics.median(times["sparse"]),
            "median_speedup": statistics.median(ratios), "predictions_agree": agree, "layers": sparse_layers(sparse)}


def sparse_layers(model: nn.Module) -> list[str]:
    return [f"{e['layer']}: {'/'.join(sorted(set(e['formats'].values())))}" for e in model.sparse_runtime_report
            if e["converted"]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="gru,lstm,linear")
    ap.add_argument("--hidden", default="512,1024")
    ap.add_argument("--densities", default="0.2,0.1,0.05")
    ap.add_argument("--structures", default="unstructured,16x16,8x8")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,int8", help="the runtime's weight value types")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=100, help="time steps of the recurrent cases")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of paired timing per case")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON")
    ap.add_argument("--no-kernel-rows", dest="kernel_rows", action="store_false",
                    help="skip the weight_hh product rows (runtime, torch and scipy sparse kernels)")
    ap.add_argument("--gru-vs-lstm", action="store_true",
                    help="time GRU and LSTM in one rotation per case and compare their speed-ups (ignores --kinds)")
    ap.add_argument("--checkpoint", type=Path, help="a speech checkpoint folder: end to end on its test split")
    ap.add_argument("--limit", type=int, help="with --checkpoint: only the first N test utterances")
    ap.add_argument("--batch-size", type=int, default=1, help="with --checkpoint: utterances per call")
    ap.add_argument("--dtype", default="float32", help="with --checkpoint: the runtime's weight value type")
    ap.add_argument("--decide-at", default="1", help="with --checkpoint: batch sizes the runtime's per-layer "
                                                     "decisions are timed at (converted only where faster at all)")
    args = ap.parse_args(argv)
    if args.checkpoint:
        result = run_checkpoint(args.checkpoint, int(args.threads.split(",")[0]), args.limit, args.batch_size,
                                tuple(int(b) for b in args.decide_at.split(",")), args.dtype)
        print(json.dumps(result, indent=1))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    hiddens = [int(h) for h in args.hidden.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    structures, batches = args.structures.split(","), [int(b) for b in args.batches.split(",")]
    dtypes = tuple(args.dtypes.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    if args.gru_vs_lstm:
        rows = []
        print("| hidden | density | structure | batch | dtype | threads | GRU dense ms | GRU runtime ms | GRU speed-up "
              "| LSTM dense ms | LSTM runtime ms | LSTM speed-up | LSTM / GRU speed-up | rounds | max abs diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for case in itertools.product(hiddens, densities, structures, batches, dtypes, threads):
            row = gru_vs_lstm(*case, steps=args.steps, budget=args.budget)
            rows.append(row)
            g, m = row["gru"], row["lstm"]
            print(f"| {row['hidden']} | {row['density']} | {row['structure']} | {row['batch']} | {row['dtype']} "
                  f"| {row['threads']} | {g['dense_ms']:.3f} | {g['runtime_ms']:.3f} | {g['speedup']:.2f}x "
                  f"| {m['dense_ms']:.3f} | {m['runtime_ms']:.3f} | {m['speedup']:.2f}x | {row['lstm_over_gru']:.3f} "
                  f"| {row['rounds']} | {max(g['max_abs_diff'], m['max_abs_diff']):.1e} |", flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
        return
    grid = itertools.product(args.kinds.split(","), hiddens, densities, structures, batches, dtypes, threads)
    rows = []
    print("Ceiling: torch's dense float32 matvec on a 3*hidden x hidden matrix, one thread, timed just before "
          "each row (the machine's load drifts); 'of ceiling' is the row's GB/s over that matvec's.")
    print("| layer | hidden | density | structure | batch | dtype | threads | format | dense ms | runtime ms "
          "| speed-up | byte-ratio ceiling | MB/call | GB/s | matvec GB/s | of ceiling | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in grid:
        torch.set_num_threads(1)
        bandwidth = dense_matvec_bandwidth(3 * case[1], case[1], args.budget / 4)
        row = run_case(*case, steps=args.steps, budget=args.budget)
        row["matvec_gbs"] = bandwidth / 1e9
        row["fraction_of_ceiling"] = row["runtime_gbs"] / row["matvec_gbs"]
        rows.append(row)
        print(f"| {row['kind']} | {row['hidden']} | {row['density']} | {row['structure']} | {row['batch']} "
              f"| {row['dtype']} | {row['threads']} | {row['format'] if row['converted'] else 'dense (fallback)'} "
              f"| {row['dense_ms']:.3f} | {row['runtime_ms']:.3f} | {row['speedup']:.2f}x "
              f"| {row['byte_ceiling']:.1f}x | {row['mb_per_call']:.2f} | {row['runtime_gbs']:.1f} "
              f"| {row['matvec_gbs']:.1f} | {row['fraction_of_ceiling']:.2f} | {row['max_abs_diff']:.1e} |", flush=True)
    if args.kernel_rows:
        torch.set_num_threads(1)
        print("\nweight_hh product alone (3*hidden x hidden), one thread, against torch's dense F.linear:")
        print("| kernel | hidden | density | structure | batch | dense ms | ms | speed-up | byte-ratio ceiling "
              "| MB/call | of ceiling |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for h, d, st, b in itertools.product(hiddens, densities, structures, batches):
            bandwidth = dense_matvec_bandwidth(3 * h, h, args.budget / 4)
            for row in kernel_rows(h, d, st, b, args.budget / 4, bandwidth, dtypes):
                rows.append(row)
                print(f"| {row['kernel']} | {h} | {d} | {st} | {b} | {row['dense_ms']:.3f} | {row['ms']:.3f} "
                      f"| {row['speedup']:.2f}x | {row['byte_ceiling']:.1f}x | {row['mb_per_call']:.2f} "
                      f"| {row['fraction_of_ceiling']:.2f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
