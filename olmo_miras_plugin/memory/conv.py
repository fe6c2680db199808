"""Short causal depthwise convolution with a carried context (Titans / GDN-style q/k/v conv).

OLMo-core's ``CausalConv1d`` dispatches to flash-linear-attention kernels and keeps no
state between calls; the memory needs both a CPU path and exact continuation across pieces, so
this is a plain ``conv1d`` over ``[previous kernel−1 inputs | new inputs]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = ["ShortCausalConv"]


class ShortCausalConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int, *, dtype: torch.dtype = torch.float32, init_device: str = "cpu"):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv kernel size must be >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size, dtype=dtype, device=init_device))
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # Start close to identity (last tap 1) so the memory sees the token itself at init.
        with torch.no_grad():
            nn.init.normal_(self.weight, std=0.02, generator=generator)
            self.weight[:, -1] += 1.0

    def empty_context(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x``: (batch, seq, channels); returns SiLU(conv(x)) and the new context."""
        if context is None:
            context = self.empty_context(x.shape[0], x.device, x.dtype)
        xx = torch.cat([context.to(x.dtype), x], dim=1)
        # shape: (batch, channels, seq)
        y = F.conv1d(rearrange(xx, "b t c -> b c t"), self.weight.to(x.dtype).unsqueeze(1), groups=self.channels)
        new_context = xx[:, xx.shape[1] - (self.kernel_size - 1) :]
        return F.silu(rearrange(y, "b c t -> b t c")), new_context
