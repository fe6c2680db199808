"""OLMo-core wiring of the memory: block types, the ``miras_attention`` mixer, carried state.

Block types (``MemoryBlockType``): ``mal`` (memory as a layer), ``mag`` (memory as a gate),
``mac`` (memory as context), ``lm2`` (LM2 memory bank). Persistent tokens: ``n_persistent``.

- ``config.py``     ``MirasAttentionConfig`` (registered mixer ``"miras_attention"``), ``MirasBlockConfig``
- ``attention.py``  ``MirasAttention``: OLMo-core ``Attention`` + memory branch + carried state
- ``block.py``      the block classes (OLMo-core's ``default`` / ``reordered_norm`` blocks)
- ``parts.py``      the memory-side parameters (``attention.miras.*``) and their init
- ``lm2.py``        the LM2 slot bank
- ``state.py``      ``carry_memory_states`` / ``reset`` / ``detach`` / ``get`` / ``set_memory_states``
"""

from .attention import MirasAttention
from .block import MirasReorderedNormTransformerBlock, MirasTransformerBlock
from .config import SUPPORTED_BASE_BLOCKS, MirasAttentionConfig, MirasBlockConfig
from .lm2 import LM2MemoryBank, LM2MemoryConfig
from .parts import MirasMemoryParts
from .state import (
    LM2State,
    MirasBlockState,
    carry_memory_states,
    detach_memory_states,
    get_memory_states,
    memory_state_modules,
    reset_memory_states,
    set_memory_states,
)
from .types import MemoryBlockType

__all__ = [
    "LM2MemoryBank",
    "LM2MemoryConfig",
    "LM2State",
    "MemoryBlockType",
    "MirasAttention",
    "MirasAttentionConfig",
    "MirasBlockConfig",
    "MirasBlockState",
    "MirasMemoryParts",
    "MirasReorderedNormTransformerBlock",
    "MirasTransformerBlock",
    "SUPPORTED_BASE_BLOCKS",
    "carry_memory_states",
    "detach_memory_states",
    "get_memory_states",
    "memory_state_modules",
    "reset_memory_states",
    "set_memory_states",
]
