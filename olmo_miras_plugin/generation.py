"""Generation with carried memory state, for OLMo-core models and exported Hugging Face models.

A long prompt is fed **segment by segment**: each call continues where the previous one stopped
(RoPE position, the keys/values the attention can still see — ``window − 1`` of them on sliding-
window layers — the neural-memory weights, the LM2 bank, MAC's read-outs), so the memory is
written as the prompt goes by and the cost of a segment doesn't grow with what came before.
Decoding then feeds one token per call with the same carried state. Because carrying state is
exact (feeding a sequence in pieces gives the outputs of feeding it whole; see
``olmo_miras_plugin.blocks.state``), greedy decoding here equals the argmax of full forward
passes over the growing sequence.

Constant memory on unbounded streams needs one approximation: full-attention layers would keep
every past key/value, so ``max_kv_context`` caps what they carry between calls (OLMo-core
``MirasAttention.max_kv_context``; :class:`~olmo_miras_plugin.hf.modeling_olmo_miras.CappedKVLayer`
on the HF side — the same rule, so both sides still agree). Sliding-window layers are exact either
way. Positions are the other thing that grows: OLMo-core's RoPE caches a sin/cos table from
position 0 up to the current one, so while an OLMo-core model generates here its RoPE computes
only the rows each call needs (:func:`_windowed_rope_forward`; transformers' RoPE already does).

Two back ends with one interface (:class:`StatefulLM`):

- :class:`OLMoCoreStatefulLM`: an OLMo-core model from ``MirasModelConfig`` under
  ``carry_memory_states``.
- :class:`HFStatefulLM`: an ``OlmoMirasForCausalLM`` with a ``MirasCache`` (its ``generate()``
  works too: pass ``prefill_chunk_size`` to prefill in segments).
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Union

import torch
import torch.nn as nn

from .blocks import MirasAttention, carry_memory_states, reset_memory_states
from .blocks.state import memory_state_modules

__all__ = [
    "GenerationStats",
    "HFStatefulLM",
    "OLMoCoreStatefulLM",
    "StatefulLM",
    "decode",
    "generate",
    "sample_next",
    "stateful_lm",
    "stream",
]


def _check_max_kv_context(max_kv_context: Optional[int]) -> None:
    if max_kv_context is not None and (
        isinstance(max_kv_context, bool) or not isinstance(max_kv_context, numbers.Integral) or max_kv_context < 0
    ):
        raise ValueError(f"max_kv_context must be None (no cap) or an integer >= 0, got {max_kv_context!r}")


def _check_sampling(temperature: float, top_k: Optional[int]) -> None:
    """Refuse what would otherwise be silently changed: a negative temperature is not greedy, a
    top-k below 1 is not "all tokens"."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None (all tokens) or an integer >= 1, got {top_k!r}")


class StatefulLM:
    """A language model that carries state from call to call."""

    vocab_size: int

    def reset(self) -> None:
        """Start a new sequence (position 0, fresh memory)."""
        raise NotImplementedError

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Continue the sequence with ``ids`` ``(batch, len)``; the logits after its last token ``(batch, vocab)``."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def close(self) -> None:
        """Release the carried state (and leave stateful mode)."""


def _windowed_rope_forward(rope: nn.Module, q: torch.Tensor, k: torch.Tensor, head_first: bool = True, **kwargs):
    """OLMo-core ``RotaryEmbedding.forward`` computing sin/cos only for the positions of this call.

    OLMo-core caches a sin/cos table for positions ``[0, n)`` and rebuilds all of it whenever a
    call needs a longer one, so a stream at position p holds (and, token by token, rebuilds) a
    p-row table: memory and time that grow with the stream. The rows a call needs are the same
    numbers (the same formula on the same float positions), computed for ``[start, start + len)``
    and handed to OLMo-core's forward as its buffers.
    """
    from olmo_core.nn.rope import compute_inv_freqs

    forward = type(rope).forward
    start = kwargs.get("start_pos")
    if start is None or kwargs.get("pos_sin") is not None or kwargs.get("cu_doc_lens") is not None:
        return forward(rope, q, k, head_first, **kwargs)
    n = k.shape[2] if head_first else k.shape[1]
    device = q.device
    with torch.autocast(device.type, enabled=False):
        if rope.scaling is None:
            inv_freq, factor = compute_inv_freqs(rope.theta, rope.rotary_dim, device), 1.0
        else:
            inv_freq, factor = rope.scaling.compute_scaled_inv_freq(theta=rope.theta, dim=rope.rotary_dim, device=device)
        pos = torch.arange(start, start + n, device=device, dtype=torch.float)
        freqs = torch.einsum("i , j -> i j", pos, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        sin, cos = angles.sin() * factor, angles.cos() * factor
    kwargs.update(start_pos=0, pos_sin=sin, pos_cos=cos)
    return forward(rope, q, k, head_first, **kwargs)


def _enable_windowed_rope(model: nn.Module) -> List[nn.Module]:
    """Shadow the ``forward`` of every OLMo-core ``RotaryEmbedding`` of ``model`` (on the instance,
    undone by :func:`_disable_windowed_rope`) with :func:`_windowed_rope_forward`."""
    from olmo_core.nn.rope import RotaryEmbedding

    ropes = {id(m): m for m in model.modules() if type(m) is RotaryEmbedding and "forward" not in m.__dict__}
    for rope in ropes.values():
        rope.forward = functools.partial(_windowed_rope_forward, rope)
    return list(ropes.values())


def _disable_windowed_rope(ropes: List[nn.Module]) -> None:
    for rope in ropes:
        rope.__dict__.pop("forward", None)


class OLMoCoreStatefulLM(StatefulLM):
    """An OLMo-core MIRAS model (``MirasModelConfig(...).build()``) in stateful mode.

    Every attention layer must be able to carry its context (``stream_attention=True``, the
    default), otherwise layers without memory would forget everything between segments.
    """

    def __init__(self, model: nn.Module, *, max_kv_context: Optional[int] = None):
        mods = memory_state_modules(model)
        plain = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"]
        if not mods or plain:
            raise ValueError(
                "the model can't carry state across segments: build it from MirasModelConfig with "
                f"stream_attention=True (plain attention layers: {plain[:4] or 'n/a'})"
            )
        _check_max_kv_context(max_kv_context)
        self.model = model
        self.vocab_size = int(model.vocab_size)
        self._saved_caps = {}
        if max_kv_context is not None:
            for name, m in model.named_modules():
                if isinstance(m, MirasAttention) and m.window_size is None:
                    self._saved_caps[name] = m.max_kv_context
                    m.max_kv_context = max_kv_context
        self._carry = carry_memory_states(model)
        self._windowed_ropes = _enable_windowed_rope(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        reset_memory_states(self.model)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device), logits_to_keep=1)[:, -1]

    def close(self) -> None:
        self._carry.__exit__(None, None, None)
        _disable_windowed_rope(self._windowed_ropes)
        self._windowed_ropes = []
        mods = dict(self.model.named_modules())
        for name, cap in self._saved_caps.items():
            mods[name].max_kv_context = cap
        self._saved_caps = {}


class HFStatefulLM(StatefulLM):
    """An exported ``OlmoMirasForCausalLM`` carrying a ``MirasCache`` from call to call.

    ``max_kv_context=None`` keeps the model's own setting, as :class:`OLMoCoreStatefulLM` does.
    """

    def __init__(self, model: nn.Module, *, max_kv_context: Optional[int] = None):
        from .hf.modeling_olmo_miras import MirasCache

        if not hasattr(model, "config") or getattr(model.config, "model_type", None) != "olmo_miras":
            raise ValueError(f"expected an olmo-miras Hugging Face model, got {type(model).__name__}")
        _check_max_kv_context(max_kv_context)
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self._make_cache = lambda: MirasCache(config=model.config, max_kv_context=max_kv_context)
        self.cache = self._make_cache()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        self.cache = self._make_cache()

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids.to(self.device), cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def close(self) -> None:
        self.cache = self._make_cache()


def stateful_lm(model: Union[nn.Module, StatefulLM], *, max_kv_context: Optional[int] = None) -> StatefulLM:
    """Wrap an OLMo-core or HF olmo-miras model (a :class:`StatefulLM` is returned as is)."""
    if isinstance(model, StatefulLM):
        return model
    if getattr(getattr(model, "config", None), "model_type", None) == "olmo_miras":
        return HFStatefulLM(model, max_kv_context=max_kv_context)
    return OLMoCoreStatefulLM(model, max_kv_context=max_kv_context)


# ---------------------------------------------------------------------------------------------- loops
@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    segments: List[int] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def stream(
    lm: StatefulLM,
    segments: Iterable[torch.Tensor],
    *,
    stats: Optional[GenerationStats] = None,
    on_segment: Optional[Callable[[int], None]] = None,
) -> Optional[torch.Tensor]:
    """Feed token segments ``(batch, len)`` one after another (state carried); the logits after
    the last token, or ``None`` if nothing was fed. ``on_segment(n_tokens)`` after each segment."""
    logits = None
    for seg in segments:
        if seg.shape[-1] == 0:
            continue
        t0 = time.perf_counter()
        logits = lm.feed(seg)
        if stats is not None:
            stats.prefill_seconds += time.perf_counter() - t0
            stats.prompt_tokens += int(seg.shape[-1])
            stats.segments.append(int(seg.shape[-1]))
        if on_segment is not None:
            on_segment(int(seg.shape[-1]))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next tokens ``(batch, 1)``: argmax for ``temperature == 0``, else sampling (optionally top-k)."""
    _check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def _split(ids: torch.Tensor, segment_len: int) -> Iterator[torch.Tensor]:
    for s in range(0, ids.shape[-1], segment_len):
        yield ids[:, s : s + segment_len]


@torch.no_grad()
def decode(
    lm: StatefulLM,
    logits: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: Optional[int] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    stats: Optional[GenerationStats] = None,
    on_token: Optional[Callable[[torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` from ``logits`` (the logits after the last fed token),
    feeding each new token back; stops early once every row has produced ``eos_token_id``
    (finished rows are padded with it). Returns the new tokens ``(batch, n_new)``."""
    _check_sampling(temperature, top_k)
    out: List[torch.Tensor] = []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
        if eos_token_id is not None:
            nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt[:, 0] == eos_token_id)
        out.append(nxt)
        if stats is not None:
            stats.new_tokens += 1
        if on_token is not None:
            on_token(nxt)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        logits = lm.feed(nxt)
    if stats is not None:
        stats.decode_seconds += time.perf_counter() - t0
    if not out:
        return logits.new_zeros((logits.shape[0], 0), dtype=torch.long)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate(
    model: Union[nn.Module, StatefulLM],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    segment_len: int = 512,
    eos_token_id: Optional[int] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    max_kv_context: Optional[int] = None,
    stats: Optional[GenerationStats] = None,
    on_token: Optional[Callable[[torch.Tensor], None]] = None,
    on_segment: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Prefill ``input_ids`` ``(batch, len)`` in segments of ``segment_len`` tokens (memory written
    as it goes), then :func:`decode` up to ``max_new_tokens``. Returns ``(batch, len + n_new)``.

    ``model``: an OLMo-core MIRAS model, an exported HF olmo-miras model, or a :class:`StatefulLM`.
    Its state is reset first (and, for a model passed directly, released at the end).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, len) with len > 0, got {tuple(input_ids.shape)}")
    if segment_len <= 0:
        raise ValueError(f"segment_len must be positive, got {segment_len}")
    _check_sampling(temperature, top_k)  # before the prefill, not after it
    owned = not isinstance(model, StatefulLM)
    lm = stateful_lm(model, max_kv_context=max_kv_context)
    try:
        lm.reset()
        logits = stream(lm, _split(input_ids, segment_len), stats=stats, on_segment=on_segment)
        assert logits is not None
        new = decode(
            lm,
            logits,
            max_new_tokens,
            eos_token_id=eos_token_id,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            stats=stats,
            on_token=on_token,
        )
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    finally:
        if owned:
            lm.close()
