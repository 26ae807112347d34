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
        x = x.detach().to(torch.float32)
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

    def _initial(self, hx: torch.Tensor | None, batch: int) -> torch.Tensor:
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        return torch.zeros(shape) if hx is None else hx.detach().to(torch.float32)

    def _run_direction(self, x: torch.Tensor, lengths: np.ndarray, index: int, h0: torch.Tensor,
                       c0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        product, rec, b_ih, b_hh = self.cells[index]
        steps, batch, _ = x.shape
        gi = product(x.reshape(steps * batch, -1)).reshape(steps, batch, -1).contiguous().numpy()  # b_ih: in the gates
        reverse = index % self.num_directions == 1
        out = np.zeros((steps, batch, self.hidden_size), np.float32)
        h_n = np.empty((batch, self.hidden_size), np.float32)
        lstm = self.mode == "LSTM"
        h0 = np.ascontiguousarray(h0.numpy())
        c_n = np.empty_like(h_n) if lstm else h_n  # a GRU has no cell state: the kernel ignores c0/c_n
        c0 = np.ascontiguousarray(c0.numpy()) if lstm else h0
        kernels.rnn_direction(lstm, gi, lengths, reverse, h0, c0, rec.block, rec.indptr, rec.indices, rec.data,
                              b_ih, b_hh, out, h_n, c_n, rec.scale)
        return torch.from_numpy(out), torch.from_numpy(h_n), torch.from_numpy(c_n) if lstm else None

    @torch.no_grad()
    def forward(self, input: torch.Tensor | PackedSequence, hx=None):
        _refuse_training(self)
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, F) in the caller's batch order
        else:
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            lengths = torch.full((x.shape[1],), x.shape[0], dtype=torch.long)
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
        lens = lengths.numpy().astype(np.int64)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                i = layer * self.num_directions + d
                out, h, c = self._run_direction(x, lens, i, h0[i], None if c0 is None else c0[i])
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        h_n = torch.stack(h_n)
        hidden = (h_n, torch.stack(c_n)) if self.mode == "LSTM" else h_n
        if packed:
            order = input.sorted_indices
            ordered = x if order is None else x.index_select(1, order)
            data = pack_padded_sequence(ordered, lengths if order is None else lengths[order]).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), hidden
        if unbatched:
            x = x.squeeze(1)
            hidden = tuple(h.squeeze(1) for h in hidden) if self.mode == "LSTM" else hidden.squeeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x, hidden
