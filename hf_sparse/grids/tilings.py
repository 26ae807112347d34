"""How one tensor's entries map onto a grid of groups: the building blocks granularities tile with.

A tiling has a ``group_shape``, reduces per-entry values to per-group ones (``reduce``: ``sum``
or ``max``) and broadcasts a group-shaped tensor back onto the tensor (``expand``). ``entrywise``
tilings have one entry per group, which lets a grid skip the reductions.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class Tiling(Protocol):
    group_shape: tuple[int, ...]
    entrywise: bool

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor: ...

    def expand(self, g: torch.Tensor) -> torch.Tensor: ...


class Entries:
    """Each entry is its own group (unstructured, N:M)."""

    entrywise = True

    def __init__(self, shape: torch.Size):
        self.group_shape = tuple(shape)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        return g


class Blocks:
    """r x c tiles of the tensor viewed as ``(shape[0], prod(shape[1:]))``; edge tiles may be partial."""

    entrywise = False

    def __init__(self, shape: torch.Size, block: tuple[int, int]):
        self.shape = shape
        self.rows, self.cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
        self.r, self.c = block
        self.group_shape = (math.ceil(self.rows / self.r), math.ceil(self.cols / self.c))

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        gr, gc = self.group_shape
        padded = x.new_zeros(gr * self.r, gc * self.c)  # scores are >= 0, so zero padding is neutral
        padded[: self.rows, : self.cols] = x.reshape(self.rows, self.cols)
        tiles = padded.view(gr, self.r, gc, self.c)
        return tiles.sum((1, 3)) if op == "sum" else tiles.amax((1, 3))

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        gr, gc = self.group_shape
        full = g[:, None, :, None].expand(gr, self.r, gc, self.c).reshape(gr * self.r, gc * self.c)
        return full[: self.rows, : self.cols].reshape(self.shape)


class Rows:
    """Output rows: ``blocks`` stacked blocks (recurrent gates) of ``units`` rows each."""

    entrywise = False

    def __init__(self, shape: torch.Size, units: int):
        if shape[0] % units:
            raise ValueError(f"{shape[0]} rows do not split into blocks of {units} units")
        self.blocks, self.units, self.ndim = shape[0] // units, units, len(shape)
        self.group_shape = (units,)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        x = x.reshape(self.blocks, self.units, -1)
        return x.sum((0, 2)) if op == "sum" else x.amax((0, 2))

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        g = g.repeat(self.blocks) if self.blocks > 1 else g
        return g.view(-1, *([1] * (self.ndim - 1)))


class Slices:
    """A coupled group's channels along one dim of a tensor: row ``c`` of ``index`` holds the
    positions of channel ``c``; positions outside the group are always kept."""

    entrywise = False

    def __init__(self, shape: torch.Size, dim: int, index: torch.Tensor):
        self.shape, self.dim, self.index = tuple(shape), dim, index.long()
        self.group_shape = (int(index.shape[0]),)
        self.per = int(index.shape[1])
        flat = self.index.flatten()
        self.flat = flat
        self.identity = len(flat) == self.shape[dim] and bool((flat == torch.arange(len(flat))).all())

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        picked = x.index_select(self.dim, self.flat.to(x.device)).movedim(self.dim, 0)
        picked = picked.reshape(self.group_shape[0], -1)
        return picked.sum(1) if op == "sum" else picked.amax(1)

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        per_pos = g.repeat_interleave(self.per) if self.per > 1 else g
        if not self.identity:
            full = g.new_ones(self.shape[self.dim])
            per_pos = full.index_put((self.flat.to(g.device),), per_pos)
        view = [1] * len(self.shape)
        view[self.dim] = self.shape[self.dim]
        return per_pos.view(view)


def mixes(weight: torch.Tensor, tiling: Tiling) -> bool:
    """Whether some group of ``tiling`` holds both zero and nonzero entries of ``weight``.

    A kept trained weight is (almost surely) nonzero, so the zeros show the mask.
    """
    nonzero = weight != 0
    any_kept = tiling.reduce(nonzero.float(), "max") > 0
    return bool((nonzero != tiling.expand(any_kept).expand(weight.shape)).any())
