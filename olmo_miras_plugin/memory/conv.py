"""Short causal depthwise convolution with a carried context (Titans / GDN-style q/k/v conv).

OLMo-core's ``CausalConv1d`` dispatches to flash-linear-attention kernels and keeps no
state between calls; the memory needs both a CPU path and exact continuation across pieces, so
this convolves ``[previous kernel−1 inputs | new inputs]`` itself.

Why a sum of shifted products and not ``F.conv1d``: conv1d wants ``(batch, channels, seq)``, so
the ``(batch, seq, channels)`` activations were transposed in and out (two strided copies each
way) around ATen's generic depthwise kernel: ~4 ms forward+backward at T = 16k, 6144 channels on
an H100. The shifted sum works in place in the token-major layout.

Why each tap reads ``x`` and the context through zero pads and not ``torch.cat([context, x])``:
under inductor a pad is a masked load fused into its consumer, while the concatenation was a
(T+K−1, channels) copy forward (0.2 GB at T = 16k in bf16) and a slice of its gradient backward.
The layer runs :func:`causal_conv_silu` inside its compiled input preparation (``fusion.py``),
fused with the q/k/v split, layout change and q/k norm.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShortCausalConv", "causal_conv_silu"]


class ShortCausalConv(nn.Module):
    """Holds the ``(channels, kernel_size)`` depthwise weight; the math is :func:`causal_conv_silu`."""

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
        """``x``: (batch, seq, channels); returns SiLU(conv(x)) and the new context, in ``x``'s dtype."""
        if context is None:
            context = self.empty_context(x.shape[0], x.device, x.dtype)
        return causal_conv_silu(x, self.weight.to(x.dtype), context.to(x.dtype))


def causal_conv_silu(
    x: torch.Tensor, weight: torch.Tensor, context: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``SiLU(Σ_j w[:, j] · xx[t + j])`` over ``xx = [context | x]``, and the new context (the last
    ``K−1`` rows of ``xx``).

    ``x`` ``(batch, T, channels)``, ``weight`` ``(channels, K)``, ``context`` ``(batch, K−1, channels)``,
    one dtype. Each tap reads ``x`` and ``context`` directly (zero-padded, so an exact ``+ 0``
    joins them): no ``xx`` buffer for inductor to realise and save for backward.
    """
    k, t = weight.shape[1], x.shape[1]
    y: Optional[torch.Tensor] = None
    for j in range(k):
        s = k - 1 - j  # tap j reads the input s tokens back
        # shape: (batch, T, channels): x[t − s], or the context's row K−1−s+t for t < s
        tap = F.pad(x, (0, 0, s, 0))[:, :t]
        if s > 0:
            tap = tap + F.pad(context[:, j:], (0, 0, 0, t))[:, :t]
        y = tap * weight[:, j] if y is None else y + tap * weight[:, j]
    assert y is not None
    # shape: (batch, K−1, channels)
    new_context = F.pad(x, (0, 0, k - 1, 0))[:, t:] + F.pad(context, (0, 0, 0, t))[:, t:]
    return F.silu(y), new_context
