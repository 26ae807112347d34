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
the input projections for all steps are computed beforehand as one dense matrix product. Per-utterance
lengths give packed-sequence semantics: an utterance's state stops at its last frame, the reverse
direction starts at it, and frames past it stay zero. The kernels run on one thread.
"""

from __future__ import annotations

import numpy as np
from numba import literally, njit


@njit(cache=True)
def _csr(indptr, indices, data, x, y):
    nrows = indptr.shape[0] - 1
    batch = x.shape[1]
    if batch == 1:
        for i in range(nrows):
            s = np.float32(0.0)
            for p in range(indptr[i], indptr[i + 1]):
                s += data[p] * x[indices[p], 0]
            y[i, 0] = s
        return
    acc = np.empty(batch, np.float32)
    for i in range(nrows):
        acc[:] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            w = data[p]
            c = indices[p]
            for n in range(batch):
                acc[n] += w * x[c, n]
        for n in range(batch):
            y[i, n] = acc[n]


@njit(cache=True)
def _bsr(b, indptr, indices, data, x, y):
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
                y[i * b + r, 0] = acc1[r]
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
        for r in range(b):
            for n in range(batch):
                y[i * b + r, n] = acc[r, n]


@njit(cache=True)
def spmm(b, indptr, indices, data, x, y):
    """y[M, B] = W @ x[K, B] for W in CSR (``b == 1``) or BSR with ``b x b`` blocks (4, 8 or 16).

    Each block size has its own compiled loop nest (the constant block size lets the loops unroll
    and vectorise; a block size read at run time measured 1.6x slower at batch 1), and batch 1
    has its own loops.
    """
    if b == 1:
        _csr(indptr, indices, data, x, y)
    elif b == 4:
        _bsr(4, indptr, indices, data, x, y)
    elif b == 8:
        _bsr(8, indptr, indices, data, x, y)
    elif b == 16:
        _bsr(16, indptr, indices, data, x, y)
    else:
        raise ValueError("unsupported block size")


@njit(cache=True, fastmath=True)
def _tanh(x):
    """float32 tanh as a clamped rational function (Eigen's), within 3e-7 of tanh everywhere.

    Unlike the libm call it vectorises: the gate arithmetic of a hidden-1024 GRU step took about
    as long as its sparse matrix product with libm's tanh/exp, and a tenth of it with this.
    """
    c = np.float32(7.90531110763549805)
    x = min(max(x, -c), c)
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


@njit(cache=True, fastmath=True)
def _sigmoid(x):
    return np.float32(0.5) * _tanh(np.float32(0.5) * x) + np.float32(0.5)


@njit(cache=True)
def _time_index(step, length, reverse):
    return length - 1 - step if reverse else step


@njit(cache=True, fastmath=True)
def gru_direction(gi, lengths, reverse, h0, b, indptr, indices, data, b_hh, out, h_n):
    """One GRU direction over a padded batch: gi[T, B, 3H] = x W_ih^T + b_ih (gates r, z, n);
    h0[H, B]; writes out[T, B, H] (zeros past each length) and h_n[B, H]."""
    steps = gi.shape[0]
    batch = gi.shape[1]
    hidden = h0.shape[0]
    h = h0.copy()
    gh = np.empty((3 * hidden, batch), np.float32)
    for s in range(steps):
        spmm(b, indptr, indices, data, h, gh)
        for n in range(batch):
            if s >= lengths[n]:
                continue
            t = _time_index(s, lengths[n], reverse)
            for j in range(hidden):
                r = _sigmoid(gi[t, n, j] + gh[j, n] + b_hh[j])
                z = _sigmoid(gi[t, n, hidden + j] + gh[hidden + j, n] + b_hh[hidden + j])
                c = _tanh(gi[t, n, 2 * hidden + j] + r * (gh[2 * hidden + j, n] + b_hh[2 * hidden + j]))
                hv = (np.float32(1.0) - z) * c + z * h[j, n]
                h[j, n] = hv
                out[t, n, j] = hv
    for n in range(batch):
        for j in range(hidden):
            h_n[n, j] = h[j, n]



@njit(cache=True, fastmath=True)
def lstm_direction(gi, lengths, reverse, h0, c0, b, indptr, indices, data, b_hh, out, h_n, c_n):
    """One LSTM direction: gi[T, B, 4H] = x W_ih^T + b_ih (gates i, f, g, o); h0, c0[H, B];
    writes out[T, B, H], h_n[B, H] and c_n[B, H]."""
    steps = gi.shape[0]
    batch = gi.shape[1]
    hidden = h0.shape[0]
    h = h0.copy()
    cs = c0.copy()
    gh = np.empty((4 * hidden, batch), np.float32)
    for s in range(steps):
        spmm(b, indptr, indices, data, h, gh)
        for n in range(batch):
            if s >= lengths[n]:
                continue
            t = _time_index(s, lengths[n], reverse)
            for j in range(hidden):
                ig = _sigmoid(gi[t, n, j] + gh[j, n] + b_hh[j])
                fg = _sigmoid(gi[t, n, hidden + j] + gh[hidden + j, n] + b_hh[hidden + j])
                gg = _tanh(gi[t, n, 2 * hidden + j] + gh[2 * hidden + j, n] + b_hh[2 * hidden + j])
                og = _sigmoid(gi[t, n, 3 * hidden + j] + gh[3 * hidden + j, n] + b_hh[3 * hidden + j])
                cv = fg * cs[j, n] + ig * gg
                hv = og * _tanh(cv)
                cs[j, n] = cv
                h[j, n] = hv
                out[t, n, j] = hv
    for n in range(batch):
        for j in range(hidden):
            h_n[n, j] = h[j, n]
            c_n[n, j] = cs[j, n]



#: Block sizes with kernels (1: CSR); each compiles on first use and numba caches it on disk.
SUPPORTED_BLOCKS = (1, 4, 8, 16)
