"""Inference modules that replace ``nn.Linear``, ``nn.GRU`` and ``nn.LSTM`` with sparse kernels.

Each computes what the dense module computes (to float32 rounding) without multiplying the zeros.
They are inference-only: no autograd, CPU, float32 activations; ``train()`` on them is refused in
``forward``. With ``dtype="int8"`` the sparse weights are stored as int8 with float32 scales (a
quarter of the bytes) and dequantised in registers; weights kept dense stay float32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

try:
    from . import kernels
except ImportError:  # numba missing: to_sparse_runtime falls back to dense with that reason
    kernels = None
from .formats import SparseWeight, to_sparse_weight


class SparseProduct:
    """``x @ W.T`` for 2-D ``x`` with ``W`` held either dense (torch) or sparse (runtime kernel)."""

    def __init__(self, weight: torch.Tensor, block: int | None, dtype: str = "float32"):
        self.out_features, self.in_features = weight.shape
        self.sparse: SparseWeight | None = to_sparse_weight(weight, block, dtype) if block else None
        self.dense = None if block else weight.detach().to(torch.float32).contiguous()

    @property
    def format(self) -> str:
        if self.sparse is None:
            return "dense"
        return self.sparse.format + ("/int8" if self.sparse.scale is not None else "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse is None:
            return F.linear(x, self.dense)
        s = self.sparse
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        y = np.empty((x.shape[0], self.out_features), np.float32)
        if s.block > 1:  # BSR reads utterance-major rows as torch holds them: no transposing copy
            kernels.bsr_rows(s.block, s.indptr, s.indices, s.data, s.scale, x.contiguous().numpy(), y, True)
            return torch.from_numpy(y)
        # CSR: feature-major input (torch's transposing copy is several times numpy's), batch-major output
        kernels.spmm(s.block, s.indptr, s.indices, s.data, x.t().contiguous().numpy(), y, True, s.scale)
        return torch.from_numpy(y)


def _refuse_training(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} is an inference-only sparse runtime layer; "
                           "call .eval() (train the dense model instead)")


class SparseLinear(nn.Module):
    """``nn.Linear`` on a CSR/BSR weight (float32, or int8 with float32 scales)."""

    def __init__(self, linear: nn.Linear, block: int, dtype: str = "float32"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.product = SparseProduct(linear.weight, block, dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.product.format}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_training(self)
        y = self.product(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class SparseRNN(nn.Module):
    """``nn.GRU``/``nn.LSTM`` (any layers, directions, ``batch_first``, packed input, ``h0``/``c0``).

    For each layer and direction the input projection of every time step is one matrix product
    (``weight_ih``, dense or sparse); the recurrence runs in one compiled kernel per direction with
    ``weight_hh`` in CSR/BSR. ``blocks[name]`` gives each weight's storage (0: dense, 1: CSR, b: BSR);
    ``dtype`` the sparse weights' value type (``"float32"`` or ``"int8"``).
    """

    def __init__(self, rnn: nn.GRU | nn.LSTM, blocks: dict[str, int], dtype: str = "float32"):
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError("LSTM with proj_size is not supported by the sparse runtime")
        self.mode = "GRU" if isinstance(rnn, nn.GRU) else "LSTM"
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.batch_first = rnn.num_layers, rnn.batch_first
        self.num_directions = 2 if rnn.bidirectional else 1
        self.gates = 3 if self.mode == "GRU" else 4
        self.cells = []  # per (layer, direction): (input product, recurrent SparseWeight, b_ih, b_hh)
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
                zeros = torch.zeros(w_hh.shape[0])
                b_ih = getattr(rnn, "bias_ih" + sfx).detach().float() if rnn.bias else zeros
                b_hh = getattr(rnn, "bias_hh" + sfx).detach().float() if rnn.bias else zeros
                recurrent = to_sparse_weight(w_hh, blocks["weight_hh" + sfx], dtype)
                self.cells.append((SparseProduct(w_ih, blocks["weight_ih" + sfx], dtype), recurrent,
                                   b_ih.numpy().astype(np.float32).copy(), b_hh.numpy().astype(np.float32).copy()))

    def extra_repr(self) -> str:
        fmts = ", ".join(f"{p.format}/{r.format}" + ("/int8" if r.scale is not None else "")
                         for p, r, _, _ in self.cells)
        return (f"{self.mode}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.num_directions == 2}), ih/hh formats: {fmts}")

    def _initial(self, hx: torch.Tensor | None, batch: int) -> np.ndarray:
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        return np.zeros(shape, np.float32) if hx is None else np.ascontiguousarray(
            hx.detach().to(torch.float32).numpy())

    def _run_direction(self, x: torch.Tensor, lengths: np.ndarray, index: int, h0: np.ndarray,
                       c0: np.ndarray | None, h_n: np.ndarray, c_n: np.ndarray | None, full: bool) -> torch.Tensor:
        """One direction of one layer: its output (T, B, H); h_n (and c_n) written in place. ``full``:
        every utterance spans all frames, so no output frame needs zeroing beforehand."""
        product, rec, b_ih, b_hh = self.cells[index]
        steps, batch, _ = x.shape
        gi = product(x.reshape(steps * batch, -1)).reshape(steps, batch, -1).contiguous().numpy()  # b_ih: in the gates
        reverse = index % self.num_directions == 1
        out = (np.empty if full else np.zeros)((steps, batch, self.hidden_size), np.float32)
        lstm = self.mode == "LSTM"
        # a GRU has no cell state: the kernel ignores c0/c_n
        kernels.rnn_direction(lstm, gi, lengths, reverse, h0, c0 if lstm else h0, rec.block, rec.indptr,
                              rec.indices, rec.data, b_ih, b_hh, out, h_n, c_n if lstm else h_n, rec.scale)
        return torch.from_numpy(out)

    @torch.no_grad()
    def forward(self, input: torch.Tensor | PackedSequence, hx=None):
        _refuse_training(self)
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        # every utterance of the same length (a single one always): the packed data is the padded batch
        # (in sorted order) as it is, so no unpacking or repacking (that had cost a batch-1 FSDD
        # utterance about 45 us, a tenth of its whole sparse forward)
        sizes = input.batch_sizes.numpy() if packed else None  # (indexing the tensor costs a us per item)
        same = packed and sizes[0] == sizes[-1]
        if same:
            steps, batch_size = sizes.shape[0], int(sizes[0])
            x = input.data.view(steps, batch_size, -1)
            if input.unsorted_indices is not None and batch_size > 1:
                x = x.index_select(1, input.unsorted_indices)
            lengths = None  # every one of them: x.shape[0]
        elif packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, F) in the caller's batch order
        else:
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            lengths = None  # every one of them: x.shape[0]
        x = x.detach().to(torch.float32)
        batch = x.shape[1]
        if self.mode == "LSTM":
            h0, c0 = (None, None) if hx is None else hx
        else:
            h0, c0 = hx, None
        if unbatched:
            h0 = None if h0 is None else h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
        h0 = self._initial(h0, batch)
        c0 = self._initial(c0, batch) if self.mode == "LSTM" else None
        full = same or not packed
        lens = np.full(batch, x.shape[0], np.int64) if full else lengths.numpy().astype(np.int64)
        h_n = np.empty_like(h0)
        c_n = np.empty_like(c0) if c0 is not None else None
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                i = layer * self.num_directions + d
                outs.append(self._run_direction(x, lens, i, h0[i], None if c0 is None else c0[i], h_n[i],
                                                None if c_n is None else c_n[i], full))
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        hidden = (torch.from_numpy(h_n), torch.from_numpy(c_n)) if self.mode == "LSTM" else torch.from_numpy(h_n)
        if packed:
            order = input.sorted_indices
            ordered = x if order is None or (same and batch == 1) else x.index_select(1, order)
            data = (ordered.reshape(-1, ordered.shape[2]) if same else
                    pack_padded_sequence(ordered, lengths if order is None else lengths[order]).data)
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), hidden
        if unbatched:
            x = x.squeeze(1)
            hidden = tuple(h.squeeze(1) for h in hidden) if self.mode == "LSTM" else hidden.squeeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x, hidden
