"""The memory-side parameters of a memory block, kept in one submodule (``attention.miras``).

Why one container: everything under ``attention.miras.`` is memory, everything else is exactly
OLMo-core's attention, so base checkpoints load unchanged, the parameter report can split the
counts by name, and initialisation can rebuild the whole memory side in one go (see
:meth:`MirasMemoryParts.init_parameters`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from olmo_core.distributed.utils import distribute_like, get_local_tensor
from olmo_core.nn.layer_norm import LayerNormConfig

from ..memory import NeuralMemory, NeuralMemoryConfig
from .lm2 import LM2MemoryBank, LM2MemoryConfig
from .types import MemoryBlockType

__all__ = ["MirasMemoryParts"]


class MirasMemoryParts(nn.Module):
    """Memory-side modules of one block.

    - ``norm``: the memory branch's own pre-norm (the mixer may see the un-normed residual stream)
    - ``memory``: :class:`NeuralMemory` (MAL, MAG, MAC)
    - ``gate``: MAG's gate, ``σ(W x̂ + b)`` per channel
    - ``lm2``: :class:`LM2MemoryBank` (LM2)
    - ``persistent``: learned, data-independent tokens ``(n_persistent, d_model)``
    - ``context_gate``: per attention head, how much of the memory-context attention replaces the
      base attention (0 = none; MAC and persistent tokens)

    Zero-init: MAL/MAG memory output projections, LM2's ``W_o`` and ``context_gate`` start at 0, so
    the block computes exactly what the base block computes.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_attn_heads: int,
        memory_block: Optional[MemoryBlockType],
        memory: Optional[NeuralMemoryConfig],
        lm2: Optional[LM2MemoryConfig],
        n_persistent: int,
        memory_norm: LayerNormConfig,
        dtype: torch.dtype = torch.float32,
        init_device: str = "cpu",
    ):
        super().__init__()
        self._ctor: Dict[str, Any] = dict(
            d_model=d_model,
            n_attn_heads=n_attn_heads,
            memory_block=memory_block,
            memory=memory,
            lm2=lm2,
            n_persistent=n_persistent,
            memory_norm=memory_norm,
            dtype=dtype,
        )
        self.memory_block = memory_block
        self.n_persistent = n_persistent
        self.norm = memory_norm.build(d_model, init_device=init_device) if memory_block is not None else None
        self.memory: Optional[NeuralMemory] = None
        if memory_block in (MemoryBlockType.mal, MemoryBlockType.mag, MemoryBlockType.mac):
            assert memory is not None
            self.memory = NeuralMemory(memory, init_device=init_device)
        self.gate = (
            nn.Linear(d_model, d_model, bias=True, dtype=dtype, device=init_device)
            if memory_block == MemoryBlockType.mag
            else None
        )
        self.lm2: Optional[LM2MemoryBank] = None
        if memory_block == MemoryBlockType.lm2:
            assert lm2 is not None
            self.lm2 = LM2MemoryBank(lm2, d_model=d_model, n_heads=n_attn_heads, dtype=dtype, init_device=init_device)
        self.persistent = (
            nn.Parameter(torch.empty(n_persistent, d_model, dtype=dtype, device=init_device))
            if n_persistent > 0
            else None
        )
        self.context_gate = (
            nn.Parameter(torch.empty(n_attn_heads, dtype=dtype, device=init_device))
            if self.has_memory_context
            else None
        )
        if init_device != "meta":
            self.reset_parameters()

    @property
    def has_memory_context(self) -> bool:
        """Whether attention also sees memory tokens (MAC read-outs and/or persistent tokens)."""
        return self.memory_block == MemoryBlockType.mac or self.n_persistent > 0

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.memory is not None:
            # MAL/MAG add the memory output straight to the stream: zero it. MAC's read-outs only
            # reach the stream through context_gate (0), so they keep a normal projection.
            zero_out = self.memory_block in (MemoryBlockType.mal, MemoryBlockType.mag)
            self.memory.reset_parameters(std=std, out_std=0.0 if zero_out else std, generator=generator)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=std, generator=generator)
            self.gate.bias.zero_()
        if self.lm2 is not None:
            self.lm2.reset_parameters(std=std, generator=generator)
        if self.persistent is not None:
            nn.init.normal_(self.persistent, std=1.0, generator=generator)
        if self.context_gate is not None:
            self.context_gate.zero_()

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
        """Initialise in place, also when the parameters are FSDP-sharded DTensors.

        A fresh copy is built unsharded on the parameters' device, initialised with
        :meth:`reset_parameters`, and each parameter takes its shard of the fresh values (the
        way OLMo-core's own init handles DTensors).
        """
        device = generator.device if generator is not None else None
        if device is None:
            device = next(get_local_tensor(p).device for p in self.parameters())
        fresh = MirasMemoryParts(**self._ctor, init_device="meta")
        fresh.to_empty(device=device)
        fresh.reset_parameters(std=std, generator=generator)
        fresh_params = dict(fresh.named_parameters())
        for name, p in self.named_parameters():
            src = fresh_params[name].to(dtype=p.dtype)
            if isinstance(p, DTensor):
                src = distribute_like(p, src)
            get_local_tensor(p).copy_(get_local_tensor(src))
