"""``block`` (``block_shape: [r, c]``): r x c tiles of the weight viewed as a matrix
``(out, in * kh * kw)``; tiles at the right/bottom edge may be smaller."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .granularity import Granularity, register_granularity
from .tilings import Blocks, mixes


@register_granularity
@dataclass(frozen=True)
class Block(Granularity):
    name = "block"
    help = "block (with block_shape)"
    takes_block_shape = True
    block: tuple[int, int] = (1, 1)

    @classmethod
    def from_text(cls, text, block_shape):
        if block_shape is None:
            raise ValueError("granularity 'block' needs sparsity.block_shape, e.g. [4, 4]")
        if len(block_shape) != 2 or any(int(b) < 1 for b in block_shape):
            raise ValueError(f"block_shape must be two positive integers [rows, cols], got {list(block_shape)}")
        return cls(block=(int(block_shape[0]), int(block_shape[1])))

    def __str__(self) -> str:
        return f"block {self.block[0]}x{self.block[1]}"

    def tiling(self, shape: torch.Size) -> Blocks:
        return Blocks(shape, self.block)

    def density_problem(self, target, density):
        r, c = self.block
        rows, cols = target.shape[0], math.prod(target.shape[1:])
        blocks = math.ceil(rows / r) * math.ceil(cols / c)
        if round(density * blocks) == 0:
            return ("block_shape", f"{r}x{c} blocks cut {target.name} ({rows}x{cols}) into {blocks} block(s), and a "
                                   f"density of {density!r} keeps none of them: the layer would be all zeros; "
                                   "use smaller blocks")
        return None

    def mask_problem(self, weight, units=None):
        return "a block mixes kept and pruned weights" if mixes(weight, self.tiling(weight.shape)) else None

    def shard_rows(self, grid, chunks):
        r = self.block[0]
        if any(c % r for c in chunks[:-1]):
            raise ValueError(f"{grid.name}: FSDP2 shards of {chunks[0]} rows split blocks of {r} rows; "
                             "choose a block height that divides the shard")
        return [math.ceil(c / r) for c in chunks]
