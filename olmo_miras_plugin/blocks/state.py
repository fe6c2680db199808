"""Carrying memory state across calls: the per-block state and the model-level API.

OLMo-core's ``Transformer.forward`` passes no recurrent state to its blocks, so each stateful
mixer (:class:`~.attention.MirasAttention`) keeps its own state *when stateful mode is on* and
starts from a fresh state on every call otherwise (the default, and what training on independent
sequences wants). The model-level functions below switch the mode and read/write the states::

    with carry_memory_states(model):            # fresh states, carried from call to call
        for segment in long_document.split(1024, dim=1):
            loss = model(segment, labels=...)   # each call continues where the last one stopped
            loss.backward()
            detach_memory_states(model)         # truncated backprop between segments

What is carried per block (:class:`MirasBlockState`): the position (RoPE continues from it), the
last keys/values the attention can still see (``window − 1`` of them for sliding-window layers,
all of them for full-attention layers unless ``max_kv_context`` caps them), the neural-memory
state, MAC's read-out keys/values of the unfinished segment, and LM2's slot bank with the inputs
of its unfinished update chunk.

Exactness: feeding a sequence in pieces gives the outputs of feeding it whole, for every block
type (MAL, MAG, MAC, LM2, attention-only), sliding-window and full-attention layers, GQA,
persistent tokens, both base block flavours, and any split points (inside a memory chunk, a MAC
segment, an LM2 chunk or a window; one token at a time). "The same" means equal up to float
rounding (≤ 2e-5 in float32 in the tests: the pieces take different SDPA/matmul shapes); the
first call of a fresh stream is bitwise the stateless call. Not exact by design:
``max_kv_context`` (full-attention layers then see a truncated past), a model built with
``stream_attention=False`` (its plain layers see only the current call), dropout > 0.

Activation checkpointing recomputes a block's forward during backward; the recomputation must
start from the state the original call started from, not from the state that call left behind.
Each call in stateful mode remembers its starting state, keyed by the identity of the block's
input tensor (the checkpoint replays the call with that same tensor object), and a call made
while autograd is executing a backward pass with a known input replays that state without
advancing it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from ..memory import MemoryState

__all__ = [
    "LM2State",
    "MirasBlockState",
    "StatefulMixer",
    "carry_memory_states",
    "detach_memory_states",
    "get_memory_states",
    "memory_state_modules",
    "reset_memory_states",
    "set_memory_states",
]

KV = Tuple[torch.Tensor, torch.Tensor]
"""``(keys, values)``, each ``(batch, len, n_kv_heads, head_dim)``; keys already carry RoPE."""


TensorFn = Callable[[torch.Tensor], torch.Tensor]


def _map_kv(kv: Optional[KV], fn: TensorFn) -> Optional[KV]:
    return None if kv is None else (fn(kv[0]), fn(kv[1]))


@dataclass
class LM2State:
    """An LM2 slot bank between calls."""

    bank: torch.Tensor
    """``(batch, n_slots, d_model)``: the slots as of the start of the current update chunk."""
    pending: torch.Tensor
    """``(batch, position % chunk_size, d_model)``: normed inputs of the unfinished chunk (the
    bank is written once per whole chunk, so they wait for the rest of it)."""
    position: int

    def map_tensors(self, fn: TensorFn) -> "LM2State":
        return replace(self, bank=fn(self.bank), pending=fn(self.pending))

    def detach(self) -> "LM2State":
        return self.map_tensors(torch.Tensor.detach)

    def tensors(self) -> List[torch.Tensor]:
        return [self.bank, self.pending]


@dataclass
class MirasBlockState:
    """Everything one block needs to continue a sequence exactly where the previous call stopped."""

    position: int
    """Tokens consumed so far (the absolute position of the next token)."""
    kv: Optional[KV] = None
    """The attention's visible past: RoPE'd keys and values of the last tokens."""
    memory: Optional[MemoryState] = None
    """Neural-memory state (MAL / MAG / MAC)."""
    readout_kv: Optional[KV] = None
    """MAC: keys/values of the memory read-outs of the unfinished segment."""
    lm2: Optional[LM2State] = None
    """LM2: the slot bank."""

    @property
    def batch_size(self) -> Optional[int]:
        for t in self.tensors():
            return t.shape[0]
        return None

    def map_tensors(self, fn: TensorFn) -> "MirasBlockState":
        """A copy with ``fn`` applied to every tensor."""
        return MirasBlockState(
            position=self.position,
            kv=_map_kv(self.kv, fn),
            memory=None if self.memory is None else self.memory.map_tensors(fn),
            readout_kv=_map_kv(self.readout_kv, fn),
            lm2=None if self.lm2 is None else self.lm2.map_tensors(fn),
        )

    def detach(self) -> "MirasBlockState":
        """Same values, cut from the autograd graph (truncated backprop between segments)."""
        out = self.map_tensors(torch.Tensor.detach)
        out.memory = None if self.memory is None else self.memory.detach()
        return out

    def tensors(self) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for kv in (self.kv, self.readout_kv):
            if kv is not None:
                out.extend(kv)
        if self.memory is not None:
            out.extend(self.memory.tensors())
        if self.lm2 is not None:
            out.extend(self.lm2.tensors())
        return out


_MISSING = object()


class StatefulMixer:
    """Mixin holding a module's carried state (see the module docstring for the protocol).

    ``_carry``: stateful mode on/off. ``_state``: the state the next call starts from
    (``None`` = fresh). ``_replay``: block input → starting state of the call that saw it.
    """

    _carry: bool
    _state: Optional[MirasBlockState]
    _replay: Optional[WeakIdKeyDictionary]

    def _init_stateful(self) -> None:
        self._carry = False
        self._state = None
        self._replay = None

    @torch.compiler.disable
    def _starting_state(self, key: torch.Tensor) -> Tuple[Optional[MirasBlockState], bool]:
        """``(state to start from, is_replay)`` for a call whose block input is ``key``."""
        if not self._carry:
            return None, False
        if self._replay is not None and torch._C._current_graph_task_id() != -1:
            saved = self._replay.get(key, _MISSING)
            if saved is not _MISSING:
                return saved, True  # activation-checkpoint recomputation: replay, don't advance
        return self._state, False

    @torch.compiler.disable
    def _advance_state(
        self, key: torch.Tensor, start: Optional[MirasBlockState], new: MirasBlockState, is_replay: bool
    ) -> None:
        if not self._carry or is_replay:
            return
        if torch.is_grad_enabled():
            if self._replay is None:
                self._replay = WeakIdKeyDictionary()
            self._replay[key] = start
        self._state = unaliased(new, self)  # type: ignore[arg-type]


def unaliased(state: MirasBlockState, module: nn.Module) -> MirasBlockState:
    """``state`` with every tensor that shares storage with ``module``'s parameters cloned.

    A fresh state can be a view of the learned initial memory (e.g. after a call shorter than a
    chunk); an optimizer step, ``load_state_dict`` or FSDP resharding would then change a carried
    state behind our back."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return state.map_tensors(lambda t: t.clone() if t.untyped_storage().data_ptr() in params else t)


# ---------------------------------------------------------------------------------------------- API
def memory_state_modules(model: nn.Module) -> Dict[str, StatefulMixer]:
    """The stateful mixers of ``model`` by module name (wrappers from FSDP/compile/AC included)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, StatefulMixer)}


def _modules_or_raise(model: nn.Module) -> Dict[str, StatefulMixer]:
    mods = memory_state_modules(model)
    if not mods:
        raise ValueError(
            f"{type(model).__name__} has no stateful miras mixers; build it with "
            "olmo_miras_plugin.models (MirasModelConfig) or MirasAttentionConfig layers"
        )
    return mods


def reset_memory_states(model: nn.Module) -> None:
    """Forget all carried state: the next call starts a new sequence at position 0."""
    for m in _modules_or_raise(model).values():
        m._state = None
        m._replay = None


def detach_memory_states(model: nn.Module) -> None:
    """Cut the carried states from the autograd graph (call between segments for truncated BPTT)."""
    for m in _modules_or_raise(model).values():
        if m._state is not None:
            m._state = m._state.detach()


def get_memory_states(model: nn.Module) -> Dict[str, Optional[MirasBlockState]]:
    """The carried state of every stateful mixer, by module name (``None``: fresh)."""
    return {name: m._state for name, m in _modules_or_raise(model).items()}


def set_memory_states(model: nn.Module, states: Dict[str, Optional[MirasBlockState]]) -> None:
    """Restore states from :func:`get_memory_states` (e.g. to branch a document into two continuations)."""
    mods = _modules_or_raise(model)
    missing = sorted(set(mods) - set(states))
    unexpected = sorted(set(states) - set(mods))
    if missing or unexpected:
        raise KeyError(f"memory states don't match the model: missing {missing}, unexpected {unexpected}")
    for name, m in mods.items():
        state = states[name]
        if state is not None and not isinstance(state, MirasBlockState):
            raise TypeError(f"state for {name!r} must be a MirasBlockState or None, got {type(state).__name__}")
        m._state = state
        m._replay = None


class carry_memory_states:
    """Turn stateful mode on (or off) for every stateful mixer of ``model``.

    Takes effect immediately, so it works as a plain call; as a context manager it restores the
    previous modes on exit and drops the states it carried. ``reset=True`` (default) starts from
    fresh states. Nested inside a carrying context, the outer stream survives: an inner
    ``reset=False`` context continues it (and the outer one goes on from where the inner stopped),
    while an inner fresh stream (``reset=True``) or stateless stretch (``enabled=False``) leaves it
    as it was.
    """

    def __init__(self, model: nn.Module, enabled: bool = True, reset: bool = True):
        self._mods = _modules_or_raise(model)
        self._previous = {name: (m._carry, m._state, m._replay) for name, m in self._mods.items()}
        self._continues = bool(enabled) and not reset
        for m in self._mods.values():
            m._carry = bool(enabled)
            if reset or not enabled:
                m._state = None
                m._replay = None

    def __enter__(self) -> "carry_memory_states":
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, m in self._mods.items():
            carry, state, replay = self._previous[name]
            m._carry = carry
            if not carry:
                m._state, m._replay = None, None  # the states this context carried are dropped
            elif not self._continues:
                m._state, m._replay = state, replay  # the outer stream, as the inner context found it
