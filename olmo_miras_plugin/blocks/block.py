"""Transformer blocks for memory layers: OLMo-core's blocks with the mixer called so that it can
(a) key its carried state on the block input and (b) for MAL, update the residual stream.

The only change to OLMo-core's ``forward`` is what the mixer is handed; parameters (names,
shapes) are the parent block's plus ``attention.miras.*``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from olmo_core.nn.transformer.block import ReorderedNormTransformerBlock, TransformerBlock

from .types import MemoryBlockType

__all__ = ["MirasTransformerBlock", "MirasReorderedNormTransformerBlock"]


def _is_mal(block: TransformerBlock) -> bool:
    return getattr(block.attention, "memory_block", None) == MemoryBlockType.mal


class MirasTransformerBlock(TransformerBlock):
    """Pre-norm block (OLMo-core ``default``): ``h = x + attn(norm(x))``; MAL first does
    ``x ← x + memory(norm_m(x))``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._mal = _is_mal(self)

    def forward(
        self,
        x: torch.Tensor,
        *,
        loss_div_factor: Optional[Union[torch.Tensor, float]] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        del loss_div_factor
        if self._mal:
            x, att = self.attention(x, state_key=x, mal_pre_norm=self.attention_norm, **kwargs)
        else:
            att = self.attention(self.attention_norm(x), state_key=x, **kwargs)
        h = self.attention_residual_stream(x, att)
        return self.feed_forward_residual_stream(h, self.feed_forward(self.feed_forward_norm(h)))


class MirasReorderedNormTransformerBlock(ReorderedNormTransformerBlock):
    """OLMo2/OLMo3 block (``reordered_norm``): ``h = x + norm(attn(x))``; MAL first does
    ``x ← x + memory(norm_m(x))``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._mal = _is_mal(self)

    def forward(
        self,
        x: torch.Tensor,
        *,
        loss_div_factor: Optional[Union[torch.Tensor, float]] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        del loss_div_factor
        out = self.attention(x, state_key=x, **kwargs)
        x, att = out if self._mal else (x, out)  # MAL also returns the memory-updated stream
        h = self.attention_residual_stream(x, self.attention_norm(att))
        return self.feed_forward_residual_stream(h, self.feed_forward_norm(self.feed_forward(h)))
