"""Compiled (numba) kernels of the sparse runtime: sparse matrix products and whole recurrent layers.

A sparse matrix is held in one layout for both formats: ``indptr`` (int64, one entry per row of
blocks plus one), ``indices`` (uint16, or uint32 past 65535, block column of each stored block) and
``data`` (float32, or int8 with a float32 ``scale`` per stored block, per row for CSR; flat). With
block size ``b == 1`` that is plain CSR; with ``b > 1`` it is BSR with ``b x b`` blocks, each stored
transposed: ``data[p*b*b + k*b + r]`` is row ``r``, column ``k`` of block ``p``, so that a block
column is one ``b``-wide vector (one output row per lane).

The BSR products and the batched CSR products are compiled vector code (:func:`_block_row_kernel`,
:func:`_csr_row_kernel`: LLVM vector IR emitted from numba intrinsics, so the sums stay in vector
registers for a whole (block) row); numba's own loops over the same data vectorised across the dot
product instead, with a horizontal sum and a scalar remainder per output row, or not at all. CSR at
batch 1 is a numba loop that LLVM vectorises with gathers. ``spmm`` takes feature-major activations
(``x[feature, batch]``); :func:`bsr_rows` takes them utterance-major (``x[batch, feature]``, torch's
layout, so the input projections make no transposing copy).

A whole GRU/LSTM direction runs inside one compiled call, :func:`rnn_direction` for both (every
time step, the recurrent product on the sparse ``weight_hh`` and the gate arithmetic; only the gate
function differs), so a step costs no Python or dispatch overhead; the state is utterance-major, so
each utterance's state, recurrent product and gate inputs are contiguous rows used in place;
the input projections for all steps are computed beforehand as one matrix product (on the sparse
kernels too when ``weight_ih`` is stored sparse). Per-utterance lengths give packed-sequence
semantics: an utterance's state stops at its last frame, the reverse direction starts at it, and
frames past it stay zero. The gate arithmetic runs per utterance on contiguous rows so that it
vectorises (that needs ``error_model="numpy"``: numba's default division-by-zero check is a branch
that keeps the loop scalar, which made the gates cost a quarter of a hidden-1024 GRU step). The
kernels run on one thread.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic


@njit(cache=True, inline="always")
def _store(y, row, n, value, batch_major):
    """y[row, n] = value, or y[n, row] for an output wanted batch-major (as torch holds it)."""
    if batch_major:
        y[n, row] = value
    else:
        y[row, n] = value


def _splat(builder, vec, value):
    """``value`` broadcast to every lane of ``vec``."""
    undef = ir.Constant(vec, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


def _fmuladd(builder, vec):
    """``llvm.fmuladd`` on ``vec``: a fused multiply-add where the target has one (no libm call where not)."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                          f"llvm.fmuladd.v{vec.count}f32")


def _load_f32(builder, ptr, index, f32):
    """One stored value as float32 (int8 widened)."""
    value = builder.load(builder.gep(ptr, [index]))
    return value if value.type == f32 else builder.sitofp(value, f32)


def _csr_row_kernel(vectors: int):
    """One CSR row of a batched product, written as LLVM vector code: ``out[off + l] = s * sum over
    the row's entries p of data[p] * xt[indices[p]*stride + lane + l]`` for ``l < 16*vectors``, the
    sums in registers for the whole row (numba's loop kept them in memory, loaded and stored once
    per four entries), over two sets of sums so that consecutive entries do not wait on each other."""
    f32 = ir.FloatType()
    i64 = ir.IntType(64)
    vec = ir.VectorType(f32, 16)
    chains = 2

    @intrinsic
    def csr_row(typingctx, indices, data, start, end, xt, stride, lane, s, out, off):
        u64 = types.uint64
        sig = types.void(indices, data, u64, u64, xt, u64, u64, types.float32, out, u64)

        def codegen(context, builder, sig, args):
            idx_p, data_p, xt_p, out_p = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                          for i in (0, 1, 4, 8))
            start, end, stride, lane, s, off = (args[i] for i in (2, 3, 5, 6, 7, 9))
            fmuladd = _fmuladd(builder, vec)
            zero = ir.Constant(vec, [0.0] * 16)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(vectors)] for _ in range(chains)]

            def entry(p, chain):
                w = _splat(builder, vec, _load_f32(builder, data_p, p, f32))
                row = builder.add(builder.mul(builder.zext(builder.load(builder.gep(idx_p, [p])), i64), stride), lane)
                for v in range(vectors):
                    xp = builder.gep(xt_p, [builder.add(row, ir.Constant(i64, 16 * v))])
                    xv = builder.load(builder.bitcast(xp, vec.as_pointer()), align=4)
                    builder.store(builder.call(fmuladd, [w, xv, builder.load(acc[chain][v])]), acc[chain][v])

            n = builder.sub(end, start)
            pairs = builder.udiv(n, ir.Constant(i64, chains))
            with cgutils.for_range(builder, pairs, intp=i64) as loop:
                p = builder.add(start, builder.mul(loop.index, ir.Constant(i64, chains)))
                for c in range(chains):
                    entry(builder.add(p, ir.Constant(i64, c)), c)
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(n, ir.Constant(i64, chains)),
                                                       ir.Constant(i64, 0))):
                entry(builder.sub(end, ir.Constant(i64, 1)), 0)
            scale = _splat(builder, vec, s)
            for v in range(vectors):
                total = builder.fadd(builder.load(acc[0][v]), builder.load(acc[1][v]))
                out = builder.gep(out_p, [builder.add(off, ir.Constant(i64, 16 * v))])
                builder.store(builder.fmul(total, scale), builder.bitcast(out, vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return csr_row


_csr_row1, _csr_row2, _csr_row4 = (_csr_row_kernel(v) for v in (1, 2, 4))


#: Reassociation for the row sums (so they vectorise) without fastmath's no-NaN/no-inf assumptions.
_SUM = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=_SUM)
def _csr_vector(indptr, indices, data, scale, xv, y, batch_major):
    """CSR times one contiguous input vector ``xv``: one reassociable sum per row over unsigned
    indices, which LLVM vectorises with gathers (3072x1024 at density 0.1: 218 -> 146 us; the four
    hand-written partial sums it replaces stayed scalar)."""
    for i in range(indptr.shape[0] - 1):
        acc = np.float32(0.0)
        for p in range(np.uint64(indptr[i]), np.uint64(indptr[i + 1])):
            acc += np.float32(data[p]) * xv[np.uint64(indices[p])]
        if scale is not None:  # int8 CSR: one scale per row, applied once to its sum
            acc *= scale[i]
        _store(y, i, 0, acc, batch_major)


@njit(cache=True, fastmath=_SUM)
def _csr(indptr, indices, data, scale, x, y, batch_major):
    # (element loops, not slice assignments, throughout: numba's broadcasting setitem took seconds
    # to compile, most of a cold GRU's compile time)
    nrows = indptr.shape[0] - 1
    batch = x.shape[1]
    if batch == 1:  # from a contiguous copy of the input
        xv = np.empty(x.shape[0], np.float32)
        for k in range(x.shape[0]):
            xv[k] = x[k, 0]
        _csr_vector(indptr, indices, data, scale, xv, y, batch_major)
        return
    # batched: the input copied feature-major into whole 16-lane vectors (zero padded), one row's
    # sums per call of the compiled row kernel, 16 rows computed before they are stored so that a
    # batch-major store writes runs of them
    cols = x.shape[0]
    lanes = (batch + 15) // 16 * 16
    xt = np.zeros((cols, lanes), np.float32)
    for k in range(cols):
        for n in range(batch):
            xt[k, n] = x[k, n]
    group = 16
    acc = np.empty((group, lanes), np.float32)
    for i0 in range(0, nrows, group):
        rows = min(group, nrows - i0)
        for g in range(rows):
            i = i0 + g
            s = np.float32(1.0) if scale is None else scale[i]
            start, end = np.uint64(indptr[i]), np.uint64(indptr[i + 1])
            lane = 0
            while lane < lanes:
                vectors = 4 if lanes - lane >= 64 else (2 if lanes - lane >= 32 else 1)
                off = np.uint64(g * lanes + lane)
                if vectors == 4:
                    _csr_row4(indices, data, start, end, xt, np.uint64(lanes), np.uint64(lane), s, acc, off)
                elif vectors == 2:
                    _csr_row2(indices, data, start, end, xt, np.uint64(lanes), np.uint64(lane), s, acc, off)
                else:
                    _csr_row1(indices, data, start, end, xt, np.uint64(lanes), np.uint64(lane), s, acc, off)
                lane += 16 * vectors
        if batch_major:
            for n in range(batch):
                for g in range(rows):
                    y[n, i0 + g] = acc[g, n]
        else:
            for g in range(rows):
                for n in range(batch):
                    y[i0 + g, n] = acc[g, n]


#: Utterances per pass over the weight in :func:`bsr_rows`: their inputs (32 x 4 KB at 1024 features)
#: stay in L2 while every block row reads them; an input projection over all frames of a batch (800
#: rows at batch 8) had streamed its whole input from memory once per block row.
_TILE = 32


def _block_row_kernel(b: int, group: int, chains: int):
    """A compiled block row of a BSR product on ``group`` utterances, written as LLVM vector code.

    ``y[yoff + g*ystride + r] = sum over the row's blocks p, columns k of W_p[r, k] * x[xoff +
    g*xstride + indices[p]*b + k]`` for ``r < b``: one ``b``-wide vector (one output row per lane) per
    block column, multiplied by the broadcast input and added to the row's ``b`` sums, which stay in
    registers for the whole block row and are stored once as one vector. numba cannot express this:
    LLVM vectorised the equivalent scalar loops across the dot product instead (16 horizontal sums
    per block row, a scalar remainder per row) or not at all. int8 blocks are widened in registers
    and summed per block, then scaled once (one fused multiply-add per block). ``chains`` independent
    sums per utterance hide the add latency at ``group == 1``. Plain vector IR (``llvm.fmuladd``),
    so any target compiles it; on AVX-512 a 16x16 block column is one ``zmm`` multiply-add.
    """
    f32 = ir.FloatType()
    i64 = ir.IntType(64)
    vec = ir.VectorType(f32, b)

    @intrinsic
    def block_row(typingctx, indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride):
        u64 = types.uint64
        sig = types.void(indices, data, scale, u64, u64, x, u64, u64, y, u64, u64)

        def codegen(context, builder, sig, args):
            idx_p, data_p, x_p, y_p = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                       for i in (0, 1, 5, 8))
            int8 = sig.args[1].dtype == types.int8
            scale_p = context.make_array(sig.args[2])(context, builder, args[2]).data if int8 else None
            p0, nb, xoff, xstride, yoff, ystride = (args[i] for i in (3, 4, 6, 7, 9, 10))
            fmuladd = _fmuladd(builder, vec)
            zero = ir.Constant(vec, [0.0] * b)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(chains)] for _ in range(group)]
            x_rows = [builder.add(xoff, builder.mul(ir.Constant(i64, g), xstride)) for g in range(group)]
            with cgutils.for_range(builder, nb, intp=i64) as loop:
                p = builder.add(p0, loop.index)
                col = builder.mul(builder.zext(builder.load(builder.gep(idx_p, [p])), i64), ir.Constant(i64, b))
                wbase = builder.mul(p, ir.Constant(i64, b * b))
                part = [[None] * chains for _ in range(group)]  # int8: this block's sums, scaled below
                for k in range(b):
                    wp = builder.gep(data_p, [builder.add(wbase, ir.Constant(i64, k * b))])
                    if int8:
                        w = builder.load(builder.bitcast(wp, ir.VectorType(ir.IntType(8), b).as_pointer()), align=1)
                        w = builder.sitofp(builder.sext(w, ir.VectorType(ir.IntType(32), b)), vec)
                    else:
                        w = builder.load(builder.bitcast(wp, vec.as_pointer()), align=4)
                    for g in range(group):
                        xk = _splat(builder, vec, builder.load(builder.gep(
                            x_p, [builder.add(x_rows[g], builder.add(col, ir.Constant(i64, k)))])))
                        c = k % chains
                        if int8:
                            prev = part[g][c]
                            part[g][c] = builder.fmul(w, xk) if prev is None else builder.call(fmuladd, [w, xk, prev])
                        else:
                            builder.store(builder.call(fmuladd, [w, xk, builder.load(acc[g][c])]), acc[g][c])
                if int8:
                    s = _splat(builder, vec, builder.load(builder.gep(scale_p, [p])))
                    for g in range(group):
                        total = part[g][0]
                        for c in range(1, chains):
                            total = builder.fadd(total, part[g][c])
                        builder.store(builder.call(fmuladd, [total, s, builder.load(acc[g][0])]), acc[g][0])
            for g in range(group):
                total = builder.load(acc[g][0])
                for c in range(1, chains):
                    total = builder.fadd(total, builder.load(acc[g][c]))
                out = builder.gep(y_p, [builder.add(yoff, builder.mul(ir.Constant(i64, g), ystride))])
                builder.store(total, builder.bitcast(out, vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return block_row


#: Utterances per call of a block-row kernel (one pass over the block row's weights each).
_GROUPS = (8, 4, 1)
_ROW_KERNELS = {(b, g): _block_row_kernel(b, g, 4 if g == 1 else 1) for b in (4, 8, 16) for g in _GROUPS}
_row4_8, _row4_4, _row4_1 = (_ROW_KERNELS[4, g] for g in _GROUPS)
_row8_8, _row8_4, _row8_1 = (_ROW_KERNELS[8, g] for g in _GROUPS)
_row16_8, _row16_4, _row16_1 = (_ROW_KERNELS[16, g] for g in _GROUPS)


@njit(cache=True, inline="always")
def _block_row(b, group, indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride):
    """Dispatch to the compiled block-row kernel for block size ``b`` and ``group`` utterances."""
    if b == 16:
        if group == 8:
            _row16_8(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
        elif group == 4:
            _row16_4(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
        else:
            _row16_1(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
    elif b == 8:
        if group == 8:
            _row8_8(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
        elif group == 4:
            _row8_4(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
        else:
            _row8_1(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
    elif b == 4:
        if group == 8:
            _row4_8(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
        elif group == 4:
            _row4_4(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
        else:
            _row4_1(indices, data, scale, p0, nb, x, xoff, xstride, y, yoff, ystride)
    else:
        raise ValueError("unsupported block size")


@njit(cache=True)
def _bsr_batch_major(b, indptr, indices, data, scale, xb, y):
    """y[B, M] = xb[B, K] W^T (both C-contiguous): 32 utterances at a time over every block row, in
    groups of 8, 4 or 1 sharing each weight load and int8 widening (a block row's values stay in L1
    across the group)."""
    nrows = indptr.shape[0] - 1
    batch, cols = xb.shape
    ycols = np.uint64(y.shape[1])
    for t0 in range(0, batch, _TILE):
        t1 = min(t0 + _TILE, batch)
        for i in range(nrows):
            p0 = np.uint64(indptr[i])
            nb = np.uint64(indptr[i + 1]) - p0
            n0 = t0
            while n0 < t1:
                group = 8 if n0 + 8 <= t1 else (4 if n0 + 4 <= t1 else 1)
                _block_row(b, group, indices, data, scale, p0, nb, xb, np.uint64(n0) * np.uint64(cols),
                           np.uint64(cols), y, np.uint64(n0) * ycols + np.uint64(i * b), ycols)
                n0 += group


@njit(cache=True)
def bsr_rows(b, indptr, indices, data, scale, xb, y, batch_major):
    """BSR product for utterance-major input ``xb[B, K]`` (any batch; torch's layout, so the input
    projections make no transposing copy); ``y`` is [B, M] when ``batch_major``, else [M, B].
    Each stored block is held transposed (column ``k``'s ``b`` values contiguous), so a block row is
    a sequence of ``b``-wide vector multiply-adds into the row's sums (see :func:`_block_row_kernel`).
    Measured figures: docs/runtime.md."""
    if not xb.flags.c_contiguous:  # the block-row kernels address rows by offset (no copy otherwise)
        xb = xb.copy()
    if batch_major and y.flags.c_contiguous:
        _bsr_batch_major(b, indptr, indices, data, scale, xb, y)
        return
    yb = np.empty((xb.shape[0], (indptr.shape[0] - 1) * b), np.float32)
    _bsr_batch_major(b, indptr, indices, data, scale, xb, yb)
    for n in range(yb.shape[0]):
        for m in range(yb.shape[1]):
            _store(y, m, n, yb[n, m], batch_major)


@njit(cache=True)
def _bsr(b, indptr, indices, data, scale, x, y, batch_major):
    """:func:`bsr_rows` for feature-major ``x[K, B]`` (the recurrent state's layout)."""
    xb = np.empty((x.shape[1], x.shape[0]), np.float32)
    for k in range(x.shape[0]):
        for n in range(x.shape[1]):
            xb[n, k] = x[k, n]
    bsr_rows(b, indptr, indices, data, scale, xb, y, batch_major)


@njit(cache=True)
def spmm(b, indptr, indices, data, x, y, batch_major=False, scale=None):
    """y[M, B] = W @ x[K, B] for W in CSR (``b == 1``) or BSR with ``b x b`` blocks (4, 8 or 16);
    with ``batch_major`` y is [B, M] instead (torch's layout, so no transposing copy follows).
    ``scale`` (float32) marks int8 ``data``: one scale per stored block (BSR) or per row (CSR).

    CSR has its own loops for batch 1; every BSR block size and batch runs one kernel (its inner
    loop is a dot product whose length is the block row's stored width, not the block size).
    """
    if b == 1:
        _csr(indptr, indices, data, scale, x, y, batch_major)
    elif b == 4 or b == 8 or b == 16:
        _bsr(b, indptr, indices, data, scale, x, y, batch_major)
    else:
        raise ValueError("unsupported block size")


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _tanh(x):
    """float32 tanh as a clamped rational function (Eigen's), within 3e-7 of tanh everywhere.

    Unlike the libm call it vectorises: the gate arithmetic of a hidden-1024 GRU step took about
    as long as its sparse matrix product with libm's tanh/exp, and a tenth of it with this.
    """
    c = np.float32(7.90531110763549805)
    x = x if x > -c else -c  # (not min/max: those block vectorisation)
    x = x if x < c else c
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _sigmoid(x):
    return np.float32(0.5) * _tanh(np.float32(0.5) * x) + np.float32(0.5)


@njit(cache=True)
def _time_index(step, length, reverse):
    return length - 1 - step if reverse else step


@njit(cache=True, fastmath=True, error_model="numpy")
def _gru_gates(gi, gh, b_ih, b_hh, h, out):
    """One utterance's GRU update on contiguous rows: gi, gh, b_ih, b_hh[3H] (gates r, z, n); h[H] updated
    in place and copied to out[H]. Contiguous 1-D operands and no division check let it vectorise."""
    hidden = h.shape[0]
    for j in range(hidden):
        r = _sigmoid(gi[j] + b_ih[j] + gh[j] + b_hh[j])
        z = _sigmoid(gi[hidden + j] + b_ih[hidden + j] + gh[hidden + j] + b_hh[hidden + j])
        c = _tanh(gi[2 * hidden + j] + b_ih[2 * hidden + j] + r * (gh[2 * hidden + j] + b_hh[2 * hidden + j]))
        hv = (np.float32(1.0) - z) * c + z * h[j]
        h[j] = hv
        out[j] = hv


@njit(cache=True, fastmath=True, error_model="numpy")
def _lstm_gates(gi, gh, b_ih, b_hh, h, cs, out):
    """One utterance's LSTM update on contiguous rows: gi, gh, b_ih, b_hh[4H] (gates i, f, g, o); h, cs[H]
    updated in place, h copied to out[H]."""
    hidden = h.shape[0]
    for j in range(hidden):
        ig = _sigmoid(gi[j] + b_ih[j] + gh[j] + b_hh[j])
        fg = _sigmoid(gi[hidden + j] + b_ih[hidden + j] + gh[hidden + j] + b_hh[hidden + j])
        gg = _tanh(gi[2 * hidden + j] + b_ih[2 * hidden + j] + gh[2 * hidden + j] + b_hh[2 * hidden + j])
        og = _sigmoid(gi[3 * hidden + j] + b_ih[3 * hidden + j] + gh[3 * hidden + j] + b_hh[3 * hidden + j])
        cv = fg * cs[j] + ig * gg
        hv = og * _tanh(cv)
        cs[j] = cv
        h[j] = hv
        out[j] = hv


@njit(cache=True)
def _recurrent_product(b, indptr, indices, data, scale, h, xt, gh):
    """gh[B, G] = h[B, H] W^T, utterance-major in and out so that each utterance's rows are contiguous
    for the gates (no per-step column copies). BSR reads ``h`` as it is; CSR reads it feature-major,
    which at batch 1 is the same memory (the one state vector) and otherwise a transposing copy into
    ``xt``."""
    batch, hidden = h.shape
    if b == 1:
        if batch == 1:  # the one utterance's state is the contiguous vector the batch-1 loop reads
            _csr_vector(indptr, indices, data, scale, h[0], gh, True)
            return
        for n in range(batch):
            for k in range(hidden):
                xt[k, n] = h[n, k]
        _csr(indptr, indices, data, scale, xt, gh, True)
    elif b == 4 or b == 8 or b == 16:
        bsr_rows(b, indptr, indices, data, scale, h, gh, True)
    else:
        raise ValueError("unsupported block size")


@njit(cache=True)
def rnn_direction(lstm, gi, lengths, reverse, h0, c0, b, indptr, indices, data, b_ih, b_hh, out, h_n, c_n,
                  scale=None):
    """One GRU or LSTM direction over a padded batch, both through the same loop (only the gate
    function differs): gi[T, B, G] = x W_ih^T (GRU: G = 3H, gates r, z, n; LSTM: G = 4H, gates i,
    f, g, o), its bias ``b_ih`` added in the gates (no pass over every frame's projection for it);
    h0, c0[B, H] (a GRU ignores ``c0`` and ``c_n``); writes out[T, B, H] (zeros past each length),
    h_n[B, H] and, for an LSTM, c_n[B, H]. ``scale``: the int8 weight's scales (None: float32 ``data``)."""
    steps = gi.shape[0]
    batch = gi.shape[1]
    h = h0.copy()
    cs = c0.copy()
    gh = np.empty((batch, gi.shape[2]), np.float32)
    xt = np.empty((h.shape[1], batch), np.float32)
    for s in range(steps):
        _recurrent_product(b, indptr, indices, data, scale, h, xt, gh)
        for n in range(batch):
            if s >= lengths[n]:
                continue
            t = _time_index(s, lengths[n], reverse)
            if lstm:
                _lstm_gates(gi[t, n], gh[n], b_ih, b_hh, h[n], cs[n], out[t, n])
            else:
                _gru_gates(gi[t, n], gh[n], b_ih, b_hh, h[n], out[t, n])
    for n in range(batch):
        for j in range(h.shape[1]):
            h_n[n, j] = h[n, j]
            if lstm:
                c_n[n, j] = cs[n, j]


#: Block sizes with kernels (1: CSR); each compiles on first use and numba caches it on disk.
SUPPORTED_BLOCKS = (1, 4, 8, 16)
