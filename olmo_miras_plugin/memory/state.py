"""Memory state carried between calls, so a long sequence can be fed in pieces."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch

__all__ = ["MemoryState", "map_read_weights"]


@dataclass
class MemoryState:
    """Everything a :class:`NeuralMemory` needs to continue a sequence exactly where it stopped.

    Chunks are aligned to absolute positions (multiples of ``chunk_size`` from the sequence
    start), so a piece may end inside a chunk: then ``read_weights`` still holds the weights the
    unfinished chunk reads and differentiates at, while ``accum``/``momentum`` already include the
    tokens of the chunk seen so far.
    """

    accum: List[torch.Tensor]
    """Per memory layer, ``(batch, n_heads, d_out, d_in)``: the retention accumulator A."""
    momentum: Optional[List[torch.Tensor]]
    """Per memory layer, momentum S (same shapes), or ``None`` without momentum."""
    read_weights: List[torch.Tensor]
    """Per memory layer, φ(A) at the start of the current chunk."""
    conv: Optional[torch.Tensor]
    """``(batch, conv_kernel − 1, channels)``: the last inputs of the short convolution."""
    position: int
    """Tokens consumed so far."""
    signature: str
    """Identifies the config that made this state (checked on use)."""

    @property
    def batch_size(self) -> int:
        return self.accum[0].shape[0]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MemoryState":
        """A copy with ``fn`` applied to every tensor (read weights that are the accumulator stay so:
        :func:`map_read_weights`)."""
        accum = [fn(t) for t in self.accum]
        return replace(
            self,
            accum=accum,
            momentum=None if self.momentum is None else [fn(t) for t in self.momentum],
            read_weights=map_read_weights(fn, self.read_weights, self.accum, accum),
            conv=None if self.conv is None else fn(self.conv),
        )

    def detach(self) -> "MemoryState":
        """Same values, cut from the autograd graph (truncated backprop between segments)."""
        return self.map_tensors(torch.Tensor.detach)

    def tensors(self) -> List[torch.Tensor]:
        out = list(self.accum) + list(self.read_weights)
        if self.momentum is not None:
            out += list(self.momentum)
        if self.conv is not None:
            out.append(self.conv)
        return out

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors())


def map_read_weights(
    fn: Callable[[torch.Tensor], torch.Tensor],
    read: List[torch.Tensor],
    accum: List[torch.Tensor],
    accum_mapped: List[torch.Tensor],
) -> List[torch.Tensor]:
    """``fn`` of each read weight, where that weight *is* the accumulator (identity retention at
    a chunk boundary) the already mapped accumulator itself: the Triton kernels start a piece at
    its first chunk only when the two are one tensor (otherwise that chunk goes through the
    PyTorch scan, measured 20 ms per OLMo2-1B step at 8k with four pieces per layer)."""
    return [am if r is a else fn(r) for r, a, am in zip(read, accum, accum_mapped)]
