"""Compiled (numba) kernels of the sparse runtime: sparse matrix products and whole recurrent layers.

A sparse matrix is held in one layout for both formats: ``indptr`` (int64, one entry per row of
blocks plus one), ``indices`` (uint16, or uint32 past 65535, block column of each stored block) and ``data`` (float32,
or int8 with a float32 ``scale`` per stored block, per row for CSR; flat). With block size ``b == 1`` that is plain CSR;
with ``b > 1`` it is BSR with ``b x b`` blocks in a row-slab layout: a block row's ``nb`` blocks
(``p0 .. p0+nb-1``) occupy ``data[p0*b*b : (p0+nb)*b*b]`` with row ``r`` of all of them contiguous
(``data[p0*b*b + r*nb*b + q*b + k]`` is row ``r``, column ``k`` of block ``p0+q``), so that at batch 1
each output row is one contiguous dot product with the gathered inputs, which vectorises.

``spmm`` takes feature-major activations (``x[feature, batch]``; CSR's batched loop reads one
input row per stored entry); :func:`bsr_rows` takes them utterance-major (``x[batch, feature]``,
torch's layout, so the input projections make no transposing copy). Every BSR product, whatever
the batch, is a dot product per output row over a contiguous gather of the inputs its block row reads.

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
from numba import njit


@njit(cache=True, inline="always")
def _store(y, row, n, value, batch_major):
    """y[row, n] = value, or y[n, row] for an output wanted batch-major (as torch holds it)."""
    if batch_major:
        y[n, row] = value
    else:
        y[row, n] = value


#: Reassociation for the row sums (so they vectorise) without fastmath's no-NaN/no-inf assumptions.
_SUM = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=_SUM)
def _csr(indptr, indices, data, scale, x, y, batch_major):
    nrows = indptr.shape[0] - 1
    batch = x.shape[1]
    if batch == 1:
        # one reassociable sum per row over unsigned indices, from a contiguous copy of the input:
        # LLVM vectorises it with gathers (3072x1024 at density 0.1: 218 -> 146 us; the four
        # hand-written partial sums it replaces stayed scalar)
        xv = np.empty(x.shape[0], np.float32)
        for k in range(x.shape[0]):
            xv[k] = x[k, 0]
        for i in range(nrows):
            acc = np.float32(0.0)
            for p in range(np.uint64(indptr[i]), np.uint64(indptr[i + 1])):
                acc += np.float32(data[p]) * xv[np.uint64(indices[p])]
            if scale is not None:  # int8 CSR: one scale per row, applied once to its sum
                acc *= scale[i]
            _store(y, i, 0, acc, batch_major)
        return
    group = 16  # rows computed before they are stored, so a batch-major store writes runs of them
    acc = np.empty((group, batch), np.float32)
    for i0 in range(0, nrows, group):
        rows = min(group, nrows - i0)
        for g in range(rows):
            i = i0 + g
            a = acc[g]
            a[:] = 0.0
            # four stored entries per pass over the row's batch: one load and store of the sums per
            # four products instead of per product (the input projection over 100 frames of a
            # 4096x1024 CSR weight: 14.8 -> 8.1 ms)
            p = indptr[i]
            end = indptr[i + 1]
            while p + 4 <= end:
                w0, w1 = np.float32(data[p]), np.float32(data[p + 1])
                w2, w3 = np.float32(data[p + 2]), np.float32(data[p + 3])
                x0, x1, x2, x3 = x[indices[p]], x[indices[p + 1]], x[indices[p + 2]], x[indices[p + 3]]
                for n in range(batch):
                    a[n] += w0 * x0[n] + w1 * x1[n] + w2 * x2[n] + w3 * x3[n]
                p += 4
            while p < end:
                w0 = np.float32(data[p])
                x0 = x[indices[p]]
                for n in range(batch):
                    a[n] += w0 * x0[n]
                p += 1
            if scale is not None:  # int8 CSR: one scale per row, applied once to its sums
                for n in range(batch):
                    a[n] *= scale[i]
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


@njit(cache=True, fastmath=_SUM)
def bsr_rows(b, indptr, indices, data, scale, xb, y, batch_major):
    """BSR on the row-slab layout for utterance-major input ``xb[B, K]`` (any batch): for each block
    row and utterance, the inputs its blocks read (times each block's int8 scale) are gathered into
    a contiguous buffer, then each of the ``b`` rows is one contiguous dot product with it, which
    LLVM vectorises (int8 values widen to float32 in registers); four utterances at a time share
    each weight load, and a block row's values stay in L1 across the batch. Indices are unsigned so
    numba adds no negative-index check (that check had kept the earlier kernels' loops scalar).
    Measured figures: docs/runtime.md."""
    nrows = indptr.shape[0] - 1
    batch, cols = xb.shape
    xg = np.empty((4, cols), np.float32)
    for t0 in range(0, batch, _TILE):
        t1 = min(t0 + _TILE, batch)
        for i in range(nrows):
            p0 = indptr[i]
            nb = indptr[i + 1] - p0
            length = np.uint64(nb * b)
            base = np.uint64(p0 * b * b)
            n0 = t0
            while n0 < t1:
                group = 4 if n0 + 4 <= t1 else 1  # four utterances share each weight load and widening
                for g in range(group):
                    for q in range(nb):
                        c = np.int64(indices[p0 + q]) * b
                        s = np.float32(1.0) if scale is None else scale[p0 + q]
                        for k in range(b):
                            xg[g, q * b + k] = xb[n0 + g, c + k] * s
                for r in range(b):
                    start = base + np.uint64(r) * length
                    if group == 4:
                        a0 = np.float32(0.0)
                        a1 = np.float32(0.0)
                        a2 = np.float32(0.0)
                        a3 = np.float32(0.0)
                        for j in range(length):
                            w = np.float32(data[start + j])
                            a0 += w * xg[0, j]
                            a1 += w * xg[1, j]
                            a2 += w * xg[2, j]
                            a3 += w * xg[3, j]
                        _store(y, i * b + r, n0, a0, batch_major)
                        _store(y, i * b + r, n0 + 1, a1, batch_major)
                        _store(y, i * b + r, n0 + 2, a2, batch_major)
                        _store(y, i * b + r, n0 + 3, a3, batch_major)
                    else:
                        acc = np.float32(0.0)
                        for j in range(length):
                            acc += np.float32(data[start + j]) * xg[0, j]
                        _store(y, i * b + r, n0, acc, batch_major)
                n0 += group


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
    which at batch 1 is the same memory (a reshape) and otherwise a transposing copy into ``xt``."""
    batch, hidden = h.shape
    if b == 1:
        if batch == 1:
            _csr(indptr, indices, data, scale, h.reshape((hidden, 1)), gh, True)
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
    h_n[:, :] = h
    if lstm:
        c_n[:, :] = cs


#: Block sizes with kernels (1: CSR); each compiles on first use and numba caches it on disk.
SUPPORTED_BLOCKS = (1, 4, 8, 16)
