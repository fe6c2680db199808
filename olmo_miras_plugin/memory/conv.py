"""Short causal depthwise convolution with a carried context (Titans / GDN-style q/k/v conv).

OLMo-core's ``CausalConv1d`` dispatches to flash-linear-attention kernels and keeps no
state between calls; the memory needs both a CPU path and exact continuation across pieces, so
this convolves ``[previous kernel−1 inputs | new inputs]`` itself.

Why a sum of shifted products and not ``F.conv1d``: conv1d wants ``(batch, channels, seq)``, so
the ``(batch, seq, channels)`` activations were transposed in and out (two strided copies each
way) around ATen's generic depthwise kernel: ~4 ms forward+backward at T = 16k, 6144 channels on
an H100. The shifted sum works in place in the token-major layout, and on CUDA ``torch.compile``
fuses it with the SiLU into one kernel each way.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        new_context = xx[:, xx.shape[1] - (self.kernel_size - 1) :]
        weight = self.weight.to(x.dtype)
        fused = x.is_cuda and not torch.compiler.is_compiling()
        return (_compiled_conv_silu() if fused else causal_conv_silu)(xx, weight), new_context


def causal_conv_silu(xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``SiLU(Σ_j w[:, j] · xx[t + j])``: ``xx`` ``(batch, K−1+T, channels)`` → ``(batch, T, channels)``."""
    k = weight.shape[1]
    t = xx.shape[1] - k + 1
    y = xx[:, :t] * weight[:, 0]
    for j in range(1, k):
        y = y + xx[:, j : j + t] * weight[:, j]
    return F.silu(y)


_COMPILED: Optional[Callable] = None


def _compiled_conv_silu() -> Callable:
    global _COMPILED
    if _COMPILED is None:  # dynamic: one kernel for every sequence length and batch size
        _COMPILED = torch.compile(causal_conv_silu, dynamic=True)
    return _COMPILED
