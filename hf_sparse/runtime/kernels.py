"""Compiled (numba) kernels of the sparse runtime: sparse matrix products and whole recurrent layers.

A sparse matrix is held in one layout for both formats: ``indptr`` (int64, one entry per row of
blocks plus one), ``indices`` (uint16, or uint32 past 65535, block column of each stored block) and ``data`` (float32,
flat). With block size ``b == 1`` that is plain CSR; with ``b > 1`` it is BSR with ``b x b`` blocks,
each block stored transposed (``data[p*b*b + k*b + r]`` is row ``r``, column ``k`` of block ``p``),
so that the inner loop is an axpy over a block's rows, which vectorises.

Activations are feature-major (``x[feature, batch]``): at batch 1 that is a plain vector, and at
batch B every weight read is used B times from contiguous memory.

A whole GRU/LSTM direction runs inside one compiled call (every time step, the recurrent product on
the sparse ``weight_hh`` and the gate arithmetic), so a step costs no Python or dispatch overhead;
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
from numba import literally, njit


@njit(cache=True, inline="always")
def _store(y, row, n, value, batch_major):
    """y[row, n] = value, or y[n, row] for an output wanted batch-major (as torch holds it)."""
    if batch_major:
        y[n, row] = value
    else:
        y[row, n] = value


@njit(cache=True)
def _csr(indptr, indices, data, x, y, batch_major):
    nrows = indptr.shape[0] - 1
    batch = x.shape[1]
    if batch == 1:
        for i in range(nrows):
            # four partial sums: a single one is a chain of dependent adds (measured ~5% slower)
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            p = indptr[i]
            end = indptr[i + 1]
            while p + 4 <= end:
                s0 += data[p] * x[indices[p], 0]
                s1 += data[p + 1] * x[indices[p + 1], 0]
                s2 += data[p + 2] * x[indices[p + 2], 0]
                s3 += data[p + 3] * x[indices[p + 3], 0]
                p += 4
            while p < end:
                s0 += data[p] * x[indices[p], 0]
                p += 1
            _store(y, i, 0, (s0 + s1) + (s2 + s3), batch_major)
        return
    group = 16  # rows computed before they are stored, so a batch-major store writes runs of them
    acc = np.empty((group, batch), np.float32)
    for i0 in range(0, nrows, group):
        rows = min(group, nrows - i0)
        for g in range(rows):
            i = i0 + g
            acc[g, :] = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                w = data[p]
                c = indices[p]
                for n in range(batch):
                    acc[g, n] += w * x[c, n]
        if batch_major:
            for n in range(batch):
                for g in range(rows):
                    y[n, i0 + g] = acc[g, n]
        else:
            for g in range(rows):
                for n in range(batch):
                    y[i0 + g, n] = acc[g, n]


@njit(cache=True)
def _bsr16_batch1(indptr, indices, data, x, y, batch_major):
    """BSR 16x16 at batch 1 with a block row's 16 sums in scalar variables, not an array: with no
    store in the loop LLVM keeps them in one vector register and vectorises the block (an
    accumulator array is stored and reloaded at every step, since numba cannot tell it apart
    from the weight's memory; that loop stayed scalar and measured 1.7x slower)."""
    nrows = indptr.shape[0] - 1
    for i in range(nrows):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = np.float32(0.0)
        for p in range(indptr[i], indptr[i + 1]):
            c = np.int64(indices[p]) * 16
            off = p * 256
            for k in range(16):
                xv = x[c + k, 0]
                a0 += data[off + 0] * xv
                a1 += data[off + 1] * xv
                a2 += data[off + 2] * xv
                a3 += data[off + 3] * xv
                a4 += data[off + 4] * xv
                a5 += data[off + 5] * xv
                a6 += data[off + 6] * xv
                a7 += data[off + 7] * xv
                a8 += data[off + 8] * xv
                a9 += data[off + 9] * xv
                a10 += data[off + 10] * xv
                a11 += data[off + 11] * xv
                a12 += data[off + 12] * xv
                a13 += data[off + 13] * xv
                a14 += data[off + 14] * xv
                a15 += data[off + 15] * xv
                off += 16
        sums = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        if batch_major:
            for r in range(16):
                y[0, i * 16 + r] = sums[r]
        else:
            for r in range(16):
                y[i * 16 + r, 0] = sums[r]


@njit(cache=True)
def _bsr(b, indptr, indices, data, x, y, batch_major):
    literally(b)  # compiled per block size: the block loops unroll and vectorise
    nrows = indptr.shape[0] - 1
    batch = x.shape[1]
    bb = b * b
    if batch == 1:
        acc1 = np.empty(b, np.float32)
        for i in range(nrows):
            acc1[:] = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                c = np.int64(indices[p]) * b
                base = p * bb
                for k in range(b):
                    xv = x[c + k, 0]
                    off = base + k * b
                    for r in range(b):
                        acc1[r] += data[off + r] * xv
            for r in range(b):
                _store(y, i * b + r, 0, acc1[r], batch_major)
        return
    acc = np.empty((b, batch), np.float32)
    for i in range(nrows):
        acc[:, :] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            c = np.int64(indices[p]) * b
            base = p * bb
            for k in range(b):
                off = base + k * b
                for r in range(b):
                    w = data[off + r]
                    for n in range(batch):
                        acc[r, n] += w * x[c + k, n]
        if batch_major:  # each utterance's b outputs are contiguous there: write them together
            for n in range(batch):
                for r in range(b):
                    y[n, i * b + r] = acc[r, n]
        else:
            for r in range(b):
                for n in range(batch):
                    y[i * b + r, n] = acc[r, n]


@njit(cache=True)
def spmm(b, indptr, indices, data, x, y, batch_major=False):
    """y[M, B] = W @ x[K, B] for W in CSR (``b == 1``) or BSR with ``b x b`` blocks (4, 8 or 16);
    with ``batch_major`` y is [B, M] instead (torch's layout, so no transposing copy follows).

    Each block size has its own compiled loop nest (the constant block size lets the loops unroll
    and vectorise; a block size read at run time measured 1.6x slower at batch 1), and batch 1
    has its own loops.
    """
    if b == 1:
        _csr(indptr, indices, data, x, y, batch_major)
    elif b == 4:
        _bsr(4, indptr, indices, data, x, y, batch_major)
    elif b == 8:
        _bsr(8, indptr, indices, data, x, y, batch_major)
    elif b == 16 and x.shape[1] == 1:
        _bsr16_batch1(indptr, indices, data, x, y, batch_major)
    elif b == 16:
        _bsr(16, indptr, indices, data, x, y, batch_major)
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
def _gru_gates(gi, gh, b_hh, h, out):
    """One utterance's GRU update on contiguous rows: gi, gh, b_hh[3H] (gates r, z, n); h[H] updated
    in place and copied to out[H]. Contiguous 1-D operands and no division check let it vectorise."""
    hidden = h.shape[0]
    for j in range(hidden):
        r = _sigmoid(gi[j] + gh[j] + b_hh[j])
        z = _sigmoid(gi[hidden + j] + gh[hidden + j] + b_hh[hidden + j])
        c = _tanh(gi[2 * hidden + j] + r * (gh[2 * hidden + j] + b_hh[2 * hidden + j]))
        hv = (np.float32(1.0) - z) * c + z * h[j]
        h[j] = hv
        out[j] = hv


@njit(cache=True, fastmath=True, error_model="numpy")
def _lstm_gates(gi, gh, b_hh, h, cs, out):
    """One utterance's LSTM update on contiguous rows: gi, gh, b_hh[4H] (gates i, f, g, o); h, cs[H]
    updated in place, h copied to out[H]."""
    hidden = h.shape[0]
    for j in range(hidden):
        ig = _sigmoid(gi[j] + gh[j] + b_hh[j])
        fg = _sigmoid(gi[hidden + j] + gh[hidden + j] + b_hh[hidden + j])
        gg = _tanh(gi[2 * hidden + j] + gh[2 * hidden + j] + b_hh[2 * hidden + j])
        og = _sigmoid(gi[3 * hidden + j] + gh[3 * hidden + j] + b_hh[3 * hidden + j])
        cv = fg * cs[j] + ig * gg
        hv = og * _tanh(cv)
        cs[j] = cv
        h[j] = hv
        out[j] = hv


@njit(cache=True)
def _column(a, n, buf):
    """buf[:] = a[:, n] (a feature-major operand's column for one utterance, made contiguous)."""
    for j in range(buf.shape[0]):
        buf[j] = a[j, n]


@njit(cache=True)
def _set_column(a, n, buf):
    for j in range(buf.shape[0]):
        a[j, n] = buf[j]


@njit(cache=True)
def gru_direction(gi, lengths, reverse, h0, b, indptr, indices, data, b_hh, out, h_n):
    """One GRU direction over a padded batch: gi[T, B, 3H] = x W_ih^T + b_ih (gates r, z, n);
    h0[H, B]; writes out[T, B, H] (zeros past each length) and h_n[B, H]."""
    steps = gi.shape[0]
    batch = gi.shape[1]
    hidden = h0.shape[0]
    h = h0.copy()
    gh = np.empty((3 * hidden, batch), np.float32)
    ghc = np.empty(3 * hidden, np.float32)
    hc = np.empty(hidden, np.float32)
    for s in range(steps):
        spmm(b, indptr, indices, data, h, gh)
        for n in range(batch):
            if s >= lengths[n]:
                continue
            t = _time_index(s, lengths[n], reverse)
            _column(gh, n, ghc)
            _column(h, n, hc)
            _gru_gates(gi[t, n], ghc, b_hh, hc, out[t, n])
            _set_column(h, n, hc)
    for n in range(batch):
        for j in range(hidden):
            h_n[n, j] = h[j, n]


@njit(cache=True)
def lstm_direction(gi, lengths, reverse, h0, c0, b, indptr, indices, data, b_hh, out, h_n, c_n):
    """One LSTM direction: gi[T, B, 4H] = x W_ih^T + b_ih (gates i, f, g, o); h0, c0[H, B];
    writes out[T, B, H], h_n[B, H] and c_n[B, H]."""
    steps = gi.shape[0]
    batch = gi.shape[1]
    hidden = h0.shape[0]
    h = h0.copy()
    cs = c0.copy()
    gh = np.empty((4 * hidden, batch), np.float32)
    ghc = np.empty(4 * hidden, np.float32)
    hc = np.empty(hidden, np.float32)
    cc = np.empty(hidden, np.float32)
    for s in range(steps):
        spmm(b, indptr, indices, data, h, gh)
        for n in range(batch):
            if s >= lengths[n]:
                continue
            t = _time_index(s, lengths[n], reverse)
            _column(gh, n, ghc)
            _column(h, n, hc)
            _column(cs, n, cc)
            _lstm_gates(gi[t, n], ghc, b_hh, hc, cc, out[t, n])
            _set_column(h, n, hc)
            _set_column(cs, n, cc)
    for n in range(batch):
        for j in range(hidden):
            h_n[n, j] = h[j, n]
            c_n[n, j] = cs[j, n]


#: Block sizes with kernels (1: CSR); each compiles on first use and numba caches it on disk.
SUPPORTED_BLOCKS = (1, 4, 8, 16)
