"""Helpers shared by the test modules."""

from __future__ import annotations

import torch

from olmo_miras_plugin.blocks import MemoryBlockType
from olmo_miras_plugin.models import is_memory_param

BLOCK_TYPES = [b.value for b in MemoryBlockType]  # every memory block type the tests sweep


@torch.no_grad()
def activate_memory(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every memory parameter off its zero init (context gates to 0.7, the rest by N(0, 0.3²)
    noise) so the memory branch visibly changes the output; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_memory_param(name):
            if "context_gate" in name:
                p.fill_(0.7)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model
