"""Names of the memory block types."""

from __future__ import annotations

from olmo_core.config import StrEnum

__all__ = ["MemoryBlockType", "parse_block_type"]


class MemoryBlockType(StrEnum):
    mal = "mal"
    """Memory as a layer: ``x ← x + memory(norm(x))`` before the block's (sliding-window) attention."""
    mag = "mag"
    """Memory as a gate: ``attention(x) + σ(W x̂) ⊙ memory(x̂)``, side by side on the same input."""
    mac = "mac"
    """Memory as context: attention also sees persistent tokens and per-segment memory read-outs."""
    lm2 = "lm2"
    """LM2 memory bank: slots read by cross-attention, gated into the stream, gated slot updates."""

    @classmethod
    def _missing_(cls, value: object) -> "MemoryBlockType":
        # Reached from MemoryBlockType(value) and from config decoding: name the valid choices.
        valid = ", ".join(t.value for t in cls)
        raise ValueError(f"unknown memory block type {value!r}; valid: {valid}")


def parse_block_type(value: object) -> MemoryBlockType:
    """``MemoryBlockType(value)``; an unknown name raises a ``ValueError`` listing the valid ones."""
    return MemoryBlockType(value)
