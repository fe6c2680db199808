"""Memory block types (MAL, MAG, MAC, LM2) as OLMo-core blocks: shapes, zero-init equivalence to
the plain OLMo-core block, causality, segment-by-segment == whole, state API, errors."""

from __future__ import annotations

import dataclasses
import io
from typing import List, Optional

import pytest
import torch

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import AttentionBackendName, AttentionConfig, SlidingWindowAttentionConfig
from olmo_core.nn.attention.base import SequenceMixerConfig
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.rope import RoPEConfig
from olmo_core.nn.feed_forward import FeedForwardConfig
from olmo_core.nn.transformer import TransformerBlockConfig, TransformerBlockType
from olmo_core.nn.transformer.init import InitMethod

from olmo_miras_plugin.blocks import (
    LM2MemoryConfig,
    MirasAttention,
    MirasAttentionConfig,
    MirasBlockConfig,
    MirasBlockState,
    carry_memory_states,
    detach_memory_states,
    get_memory_states,
    reset_memory_states,
    set_memory_states,
)
from olmo_miras_plugin.memory import NeuralMemoryConfig

from miras_test_utils import BLOCK_TYPES, activate_memory

# Tiny tensors: one thread avoids OpenMP spin-waits, which dominate on a shared 2-core machine.
torch.set_num_threads(1)

D = 32


def base_block_config(
    *, window: Optional[int] = 6, name: str = "reordered_norm", n_kv_heads: Optional[int] = None
) -> TransformerBlockConfig:
    """An OLMo2/OLMo3-style block (QK-norm, RoPE, SwiGLU) at d_model=32 on the torch SDPA backend."""
    norm = LayerNormConfig(name=LayerNormType.rms, eps=1e-6, bias=False)
    sliding = None
    if window is not None:
        sliding = SlidingWindowAttentionConfig(
            pattern=[window], force_full_attention_on_first_layer=False, force_full_attention_on_last_layer=False
        )
    att = AttentionConfig(
        n_heads=4,
        n_kv_heads=n_kv_heads,
        bias=False,
        rope=RoPEConfig(theta=500_000),
        qk_norm=norm,
        backend=AttentionBackendName.torch,
        sliding_window=sliding,
    )
    return TransformerBlockConfig(
        sequence_mixer=att,
        layer_norm=norm,
        feed_forward=FeedForwardConfig(hidden_size=64, bias=False),
        name=TransformerBlockType(name),
    )


def miras_block_config(
    block_type: Optional[str],
    *,
    window: Optional[int] = 6,
    name: str = "reordered_norm",
    n_kv_heads: Optional[int] = None,
    n_persistent: int = 0,
    chunk: int = 4,
    preset: str = "titans",
) -> MirasBlockConfig:
    base = base_block_config(window=window, name=name, n_kv_heads=n_kv_heads)
    att = base.sequence_mixer
    memory = None
    if block_type in ("mal", "mag", "mac"):
        memory = NeuralMemoryConfig.from_preset(preset, d_model=D, n_heads=2, chunk_size=chunk)
    mixer = MirasAttentionConfig(
        **{f.name: getattr(att, f.name) for f in dataclasses.fields(AttentionConfig)},
        memory_block=block_type,
        memory=memory,
        lm2=LM2MemoryConfig(n_slots=3, chunk_size=chunk) if block_type == "lm2" else None,
        n_persistent=n_persistent,
    )
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TransformerBlockConfig)}
    fields["sequence_mixer"] = mixer
    return MirasBlockConfig(**fields)


def build(config: TransformerBlockConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return config.build(d_model=D, block_idx=1, n_layers=4)


def run_pieces(block: torch.nn.Module, x: torch.Tensor, bounds: List[int]) -> torch.Tensor:
    edges = [0] + bounds + [x.shape[1]]
    return torch.cat([block(x[:, a:b]) for a, b in zip(edges[:-1], edges[1:])], dim=1)


# ---------------------------------------------------------------------------------------------- build
def test_registered_in_olmo_core_registry():
    assert SequenceMixerConfig.get_registered_class("miras_attention") is MirasAttentionConfig


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_shapes_names_and_param_count(block_type: str):
    plain = build(base_block_config())
    cfg = miras_block_config(block_type, n_persistent=2)
    block = build(cfg)
    x = torch.randn(3, 11, D)
    assert block(x).shape == (3, 11, D)
    base_names = {n for n, _ in plain.named_parameters()}
    names = {n for n, _ in block.named_parameters()}
    assert base_names <= names
    assert all(n.startswith("attention.miras.") for n in names - base_names)
    for n in base_names:
        assert dict(block.named_parameters())[n].shape == dict(plain.named_parameters())[n].shape
    assert cfg.num_params(D) == sum(p.numel() for p in block.parameters())
    assert isinstance(block.attention, MirasAttention)


# ---------------------------------------------------------------------------------------------- zero init
@pytest.mark.parametrize("name", ["reordered_norm", "default"])
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_zero_init_equals_plain_olmo_core_block(block_type: str, name: str):
    plain = build(base_block_config(name=name), seed=3)
    block = build(miras_block_config(block_type, name=name, n_persistent=2), seed=4)
    missing, unexpected = block.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".miras." in f".{k}" for k in missing)
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        assert torch.equal(block(x), plain(x))
        # OLMo-core's init path (Transformer.init_weights -> mixer.init_weights) keeps it exact.
        gen = torch.Generator().manual_seed(0)
        block.attention.init_weights(init_method=InitMethod.normal, d_model=D, block_idx=1, num_blocks=4, generator=gen)
        gen = torch.Generator().manual_seed(0)
        plain.attention.init_weights(init_method=InitMethod.normal, d_model=D, block_idx=1, num_blocks=4, generator=gen)
        assert torch.equal(block.attention.w_q.weight, plain.attention.w_q.weight)
        assert torch.equal(block(x), plain(x))
        with carry_memory_states(block):
            assert torch.allclose(run_pieces(block, x, [5, 6]), plain(x), atol=1e-5)
        activate_memory(block)
        assert not torch.allclose(block(x), plain(x), atol=1e-3)


# ---------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_causal(block_type: str):
    block = build(miras_block_config(block_type, n_persistent=2, window=None))
    activate_memory(block)
    x = torch.randn(2, 19, D)
    with torch.no_grad():
        y = block(x)
        for t in (0, 3, 4, 10):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
            y2 = block(x2)
            assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), t
            assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


# ---------------------------------------------------------------------------------------------- segments
SPLITS = [[5, 6, 13], [1, 2, 3, 4, 8], [7]]


@pytest.mark.parametrize(
    "block_type, window, name, n_kv_heads, n_persistent",
    [
        ("mal", 6, "reordered_norm", None, 0),
        ("mal", None, "default", 2, 2),
        ("mag", 6, "reordered_norm", 2, 2),
        ("mag", None, "default", None, 0),
        ("mac", 6, "reordered_norm", None, 4),
        ("mac", None, "default", 2, 0),
        ("lm2", 6, "default", None, 0),
        ("lm2", None, "reordered_norm", 2, 2),
        (None, 6, "reordered_norm", 2, 0),
        (None, None, "default", None, 3),  # persistent tokens on an attention-only layer
    ],
)
def test_segmented_equals_whole(block_type, window, name, n_kv_heads, n_persistent):
    """Any split (mid memory chunk, mid window, single tokens) gives the whole-sequence outputs."""
    cfg = miras_block_config(block_type, window=window, name=name, n_kv_heads=n_kv_heads, n_persistent=n_persistent)
    block = build(cfg)
    activate_memory(block)
    x = torch.randn(2, 23, D)
    with torch.no_grad():
        whole = block(x)  # stateless
        for bounds in SPLITS:
            with carry_memory_states(block):
                pieces = run_pieces(block, x, bounds)
                state = get_memory_states(block)["attention"]
            torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)
            assert state.position == 23
        with carry_memory_states(block):
            assert torch.equal(block(x), whole)  # a fresh stream's first call is the stateless call
    if window is not None:
        assert state.kv[0].shape[1] == window - 1  # only what the window can still see
    if block_type == "mac":
        assert state.readout_kv[0].shape[1] == 23 % 4  # the unfinished segment's read-outs
    if block_type == "lm2":
        assert state.lm2.pending.shape[1] == 23 % 4


def test_stateless_by_default_and_reset():
    block = build(miras_block_config("mag"))
    activate_memory(block)
    x = torch.randn(1, 9, D)
    with torch.no_grad():
        y = block(x)
        assert torch.equal(block(x), y)  # no state leaks between calls by default
        with carry_memory_states(block):
            a = block(x)
            b = block(x)  # continues the stream: differs
            assert not torch.allclose(a, b)
            reset_memory_states(block)
            assert torch.equal(block(x), a)
        assert get_memory_states(block)["attention"] is None  # context exit drops the state
        assert torch.equal(block(x), y)


def test_nested_contexts_keep_the_outer_stream():
    """A stateless side call (enabled=False) or a fresh inner stream leaves the outer stream as it
    was; an inner reset=False context continues it."""
    block = build(miras_block_config("mag"))
    activate_memory(block)
    x = torch.randn(1, 12, D)
    with torch.no_grad():
        whole = block(x)
        with carry_memory_states(block):
            first = block(x[:, :4])
            with carry_memory_states(block, enabled=False):
                assert torch.equal(block(x[:, :4]), first)  # stateless: sees nothing carried
            with carry_memory_states(block):
                assert torch.equal(block(x[:, :4]), first)  # a fresh stream of its own
            with carry_memory_states(block, reset=False):
                second = block(x[:, 4:8])  # continues the outer stream
            third = block(x[:, 8:])
        torch.testing.assert_close(torch.cat([first, second, third], dim=1), whole)
        assert get_memory_states(block)["attention"] is None


def test_get_set_states_branches_a_stream():
    block = build(miras_block_config("mac", n_persistent=2))
    activate_memory(block)
    x, a, b = torch.randn(1, 10, D), torch.randn(1, 5, D), torch.randn(1, 5, D)
    with torch.no_grad(), carry_memory_states(block):
        block(x)
        snapshot = get_memory_states(block)
        ya = block(a)
        set_memory_states(block, snapshot)
        yb = block(b)
        set_memory_states(block, snapshot)
        assert torch.equal(block(a), ya)
        assert not torch.allclose(ya, yb)
    with pytest.raises(KeyError, match="missing"):
        set_memory_states(block, {})


def test_detach_cuts_graph_and_batch_mismatch_is_reported():
    block = build(miras_block_config("mal"))
    activate_memory(block)
    x = torch.randn(2, 12, D)
    with carry_memory_states(block):
        block(x[:, :6])
        state: MirasBlockState = get_memory_states(block)["attention"]
        assert any(t.grad_fn is not None for t in state.tensors())
        detach_memory_states(block)
        assert all(t.grad_fn is None for t in get_memory_states(block)["attention"].tensors())
        block(x[:, 6:]).sum().backward()
        with pytest.raises(ValueError, match="batch size 2 but the input has 3"):
            block(torch.randn(3, 4, D))


def test_carried_state_never_aliases_parameters():
    """A call shorter than a chunk leaves the memory at its learned initial weights; the carried
    state must hold a copy, not a view an optimizer step would change."""
    block = build(miras_block_config("lm2", chunk=8))
    with torch.no_grad(), carry_memory_states(block):
        block(torch.randn(2, 3, D))
        state = get_memory_states(block)["attention"]
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        assert all(t.untyped_storage().data_ptr() not in params for t in state.tensors())


def test_max_kv_context_caps_full_attention_context():
    cfg = miras_block_config("mag", window=None)
    cfg.sequence_mixer.max_kv_context = 4
    block = build(cfg)
    with torch.no_grad(), carry_memory_states(block):
        block(torch.randn(1, 9, D))
        assert get_memory_states(block)["attention"].kv[0].shape[1] == 4
    uncapped = build(miras_block_config("mag", window=None))
    with torch.no_grad(), carry_memory_states(uncapped):
        uncapped(torch.randn(1, 9, D))
        uncapped(torch.randn(1, 2, D))
        assert get_memory_states(uncapped)["attention"].kv[0].shape[1] == 11  # a KV cache


def test_state_api_needs_stateful_mixers():
    plain = build(base_block_config())
    with pytest.raises(ValueError, match="no stateful miras mixers"):
        carry_memory_states(plain)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_state_dict_round_trip(block_type: str):
    cfg = miras_block_config(block_type, n_persistent=2)
    block = build(cfg, seed=0)
    activate_memory(block)
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    other = build(cfg, seed=1)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        assert torch.equal(other(x), block(x))


@pytest.mark.parametrize(
    "block_type, zeroed",
    [
        ("mal", ["memory.w_out.weight", "context_gate"]),
        ("mag", ["memory.w_out.weight", "context_gate"]),
        ("mac", ["context_gate"]),  # MAC's read-outs only reach the stream through context_gate
        ("lm2", ["lm2.w_o.weight", "context_gate"]),
    ],
)
def test_zero_init_is_not_a_dead_end(block_type: str, zeroed: List[str]):
    """The parameters that start at zero get a gradient on the first step."""
    block = build(miras_block_config(block_type, n_persistent=2))
    params = dict(block.named_parameters())
    for n in zeroed:
        assert params[f"attention.miras.{n}"].abs().sum() == 0
    block(torch.randn(2, 10, D)).pow(2).sum().backward()
    for n in zeroed:
        grad = params[f"attention.miras.{n}"].grad
        assert grad is not None and grad.abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_block_type():
    with pytest.raises(ValueError, match="unknown memory block type 'mem'; valid: mal, mag, mac, lm2"):
        cfg = miras_block_config("mag")
        build(cfg.replace(sequence_mixer=cfg.sequence_mixer.replace(memory_block="mem")))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_heads=5), "attention: d_model=32 is not divisible by n_heads=5"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(memory=None), "memory block 'mag' needs a NeuralMemoryConfig"),
        (
            dict(memory=NeuralMemoryConfig(d_model=48, n_heads=2)),
            "memory d_model=48 does not match the model's d_model=32",
        ),
        (dict(memory=NeuralMemoryConfig(d_model=32, n_heads=3)), "d_model=32 is not divisible by n_heads=3"),
        (
            dict(memory_block="lm2", memory=None, lm2=LM2MemoryConfig(n_heads=5)),
            "LM2 memory: d_model=32 is not divisible by n_heads=5",
        ),
        (dict(n_persistent=-1), "n_persistent must be an integer >= 0, got -1"),
        (dict(attention_sinks=True), "doesn't support attention_sinks"),
    ],
)
def test_bad_config_errors(change, match):
    cfg = miras_block_config("mag")
    cfg = cfg.replace(sequence_mixer=cfg.sequence_mixer.replace(**change))
    with pytest.raises((ValueError, OLMoConfigurationError), match=match):
        build(cfg)


def test_mal_needs_its_block():
    cfg = miras_block_config("mal")
    plain_block = TransformerBlockConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TransformerBlockConfig)}
    )
    with pytest.raises(OLMoConfigurationError, match="MAL mixer changes the residual stream"):
        build(plain_block)(torch.randn(1, 4, D))


def test_unsupported_base_block_and_doc_masking():
    cfg = miras_block_config("mag").replace(name=TransformerBlockType.peri_norm)
    with pytest.raises(OLMoConfigurationError, match="default, reordered_norm; got 'peri_norm'"):
        build(cfg)
    block = build(miras_block_config("mag"))
    with pytest.raises(ValueError, match="intra-document masking"):
        block(torch.randn(1, 8, D), cu_doc_lens=torch.tensor([0, 4, 8]), max_doc_len=4)


@torch.no_grad()
def test_mac_readouts_are_positioned_so_a_query_can_find_its_own():
    """A MAC read-out sits at its token's position: swapping two read-outs of the segment changes
    what the segment's last query reads (with position-free read-outs it could not — the query
    would see the same set — and a MAC recall model stayed at chance); swapping two read-outs of
    an earlier segment changes nothing for it (the segment mask)."""
    block = build(miras_block_config("mac", window=None, chunk=4))
    activate_memory(block)
    att = block.attention
    memory = att.miras.memory
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(0))
    forced = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1))

    def last_query_output(readout: torch.Tensor) -> torch.Tensor:
        original = memory.forward
        memory.forward = lambda h, state=None: (readout, original(h, state)[1])
        try:
            return block(x)[:, -1]
        finally:
            del memory.forward

    def swapped(i: int, j: int) -> torch.Tensor:
        r = forced.clone()
        r[:, [i, j]] = forced[:, [j, i]]
        return r

    ref = last_query_output(forced)
    # positions 8..11 are the last segment (segment_len = chunk = 4): both swapped read-outs are visible
    assert not torch.allclose(last_query_output(swapped(8, 9)), ref, atol=1e-4)
    # positions 0, 1: another segment, invisible to query 11
    torch.testing.assert_close(last_query_output(swapped(0, 1)), ref)
