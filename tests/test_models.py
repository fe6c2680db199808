"""Memory model configs on OLMo-core's OLMo2/OLMo3 presets: architecture and weight compatibility
with the plain OLMo-core model, whole-model streaming, training, config serialisation, errors."""

from __future__ import annotations

import json
import logging
from typing import List

import pytest
import torch

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import Attention
from olmo_core.nn.transformer import TransformerConfig

from olmo_miras_plugin.blocks import MirasAttention, carry_memory_states, detach_memory_states
from olmo_miras_plugin.memory import MemoryArchitectureConfig, NeuralMemoryConfig
from olmo_miras_plugin.models import (
    MirasMemoryConfig,
    MirasModelConfig,
    is_memory_param,
    load_base_state_dict,
    miras_from_preset,
    olmo2_1B_miras,
    olmo3_7B_miras,
    olmo3_32B_miras,
    parameter_report,
    tiny_miras,
)

from miras_test_utils import BLOCK_TYPES, activate_memory

torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spin-waits on a shared 2-core machine


def small(block_type: str = "mag", window=8, **memory_kwargs) -> MirasModelConfig:
    memory_kwargs.setdefault("layers", [0, 2])
    memory_kwargs.setdefault("chunk_size", 4)
    memory = MirasMemoryConfig(block_type=block_type, **memory_kwargs)
    return tiny_miras(d_model=32, n_layers=4, n_heads=4, window=window, memory=memory)


def tokens(batch: int = 2, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "factory, n_layers, windows",
    [
        (olmo2_1B_miras, 18, [None] * 4),
        (olmo3_7B_miras, 32, [4096, 4096, 4096, None]),
        (olmo3_32B_miras, 64, [4096, 4096, 4096, None]),
    ],
)
def test_big_presets_keep_olmo_core_architecture(factory, n_layers: int, windows: List):
    cfg = factory(memory=MirasMemoryConfig(block_type="mag", every=4))
    assert cfg.memory_layers() == list(range(0, n_layers, 4))
    model, base = cfg.build(init_device="meta"), cfg.base.build(init_device="meta")
    base_shapes = {n: p.shape for n, p in base.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert {n: shapes[n] for n in base_shapes} == base_shapes  # same names, same shapes
    assert all(is_memory_param(n) for n in set(shapes) - set(base_shapes))
    assert cfg.num_params == sum(p.numel() for p in model.parameters())
    assert cfg.num_params == cfg.base.num_params + cfg.num_memory_params
    got = [b.attention.window_size for b in model.blocks.values()]
    assert got == [b.attention.window_size for b in base.blocks.values()]
    assert got[:4] == windows
    assert all(isinstance(b.attention, MirasAttention) for b in model.blocks.values())


@pytest.mark.parametrize("preset", ["titans", "moneta", "yaad", "memora"])
def test_param_count_matches_built_model_for_every_memory_preset(preset: str):
    for block_type in BLOCK_TYPES:
        cfg = small(block_type, preset=preset, depth=3, expansion=1.5)
        model = cfg.build()
        assert cfg.num_params == sum(p.numel() for p in model.parameters()), block_type
        if block_type != "lm2":
            assert model.blocks["0"].attention.miras.memory.config.preset == preset


def test_preset_by_name_and_unknown_preset():
    assert miras_from_preset("olmo2_1B_v2").base.n_layers == 16
    with pytest.raises(OLMoConfigurationError, match="unknown OLMo2/OLMo3 preset 'llama2_1B'"):
        miras_from_preset("llama2_1B")


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("window", [8, None])
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_zero_init_model_equals_plain_olmo_core(block_type: str, window):
    """Same init_seed: identical base weights; any base weights: identical logits."""
    cfg = small(block_type, window=window, n_persistent=2)
    plain = cfg.base.build()
    plain.init_weights(max_seq_len=64)
    model = cfg.build()
    model.init_weights(max_seq_len=64)
    plain_sd = plain.state_dict()
    for k, v in model.state_dict().items():
        if not is_memory_param(k):
            assert torch.equal(v, plain_sd[k]), k
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        other = TransformerConfig.from_dict(cfg.base.as_config_dict()).replace(init_seed=7).build()
        other.init_weights(max_seq_len=64)
        left_alone = load_base_state_dict(model, other.state_dict())
        assert left_alone and all(is_memory_param(k) for k in left_alone)
        assert torch.equal(model(x), other(x))
        with carry_memory_states(model):
            torch.testing.assert_close(torch.cat([model(x[:, :13]), model(x[:, 13:])], 1), other(x))


def test_load_base_state_dict_rejects_mismatches():
    model = small().build()
    sd = small().base.build().state_dict()
    bad = dict(sd)
    bad["blocks.0.attention.w_x.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="w_x"):
        load_base_state_dict(model, bad)
    del sd["blocks.1.feed_forward.w1.weight"]
    with pytest.raises(KeyError, match="lacks base parameters"):
        load_base_state_dict(model, sd)


# ---------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize(
    "block_type, window, n_kv_heads",
    [("mal", 8, None), ("mag", None, 2), ("mac", 8, 2), ("lm2", 8, None)],
)
def test_model_segments_equal_whole(block_type: str, window, n_kv_heads):
    cfg = small(block_type, window=window, n_persistent=2 if block_type != "mac" else None)
    if n_kv_heads is not None:
        cfg.base.block.sequence_mixer.n_kv_heads = n_kv_heads
    model = cfg.build()
    model.init_weights(max_seq_len=64)
    activate_memory(model)
    x = tokens(length=30)
    with torch.no_grad():
        whole = model(x)
        for bounds in ([7, 8, 21], list(range(1, 30))):  # pieces; one token at a time (generation)
            edges = [0] + bounds + [30]
            with carry_memory_states(model):
                pieces = torch.cat([model(x[:, a:b]) for a, b in zip(edges[:-1], edges[1:])], 1)
            torch.testing.assert_close(pieces, whole, atol=2e-5, rtol=1e-5)


def test_without_stream_attention_only_memory_layers_carry():
    cfg = small("mag")
    cfg.stream_attention = False
    model = cfg.build()
    kinds = [type(b.attention) for b in model.blocks.values()]
    assert kinds == [MirasAttention, Attention, MirasAttention, Attention]
    with torch.no_grad(), carry_memory_states(model):
        model(tokens(length=10))  # runs; plain layers see only the current call


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_adamw_steps_reduce_loss_segment_stateful(block_type: str):
    """A periodic byte pattern, read in two carried segments per step (truncated BPTT)."""
    torch.manual_seed(0)
    model = small(block_type, n_persistent=1).build()
    model.init_weights(max_seq_len=64)
    pattern = torch.randint(0, 259, (4, 6), generator=torch.Generator().manual_seed(3))
    seq = pattern.repeat(1, 6)[:, :33]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        total = 0.0
        with carry_memory_states(model):
            for a, b in ((0, 16), (16, 32)):
                loss = model(seq[:, a:b], labels=seq[:, a + 1 : b + 1]).loss / 2
                loss.backward()
                detach_memory_states(model)
                total += loss.item()
        opt.step()
        losses.append(total)
    assert losses[-1] < 0.7 * losses[0], losses
    zero_init = ("memory.w_out.weight", "lm2.w_o.weight", "context_gate")
    moved = [p for n, p in model.named_parameters() if n.endswith(zero_init)]
    assert moved and all(p.abs().sum() > 0 for p in moved)


# ---------------------------------------------------------------------------------------------- config
def test_config_serialises_and_takes_dotted_overrides():
    cfg = olmo3_7B_miras()
    data = json.loads(json.dumps(cfg.as_config_dict()))
    again = MirasModelConfig.from_dict(data)
    assert again == cfg
    merged = cfg.merge(["memory.preset=yaad", "memory.block_type=mac", "memory.layers=[1,3]", "freeze_base=true"])
    assert merged.memory.preset == "yaad" and merged.memory_layers() == [1, 3] and merged.freeze_base
    tc = merged.transformer_config()
    assert tc.block_overrides[1].sequence_mixer.memory.preset == "yaad"
    assert tc.block_overrides[1].sequence_mixer.memory_block == "mac"
    # The derived OLMo-core TransformerConfig round-trips through OLMo-core's own machinery too.
    tc_again = TransformerConfig.from_dict(json.loads(json.dumps(tc.as_config_dict())))
    assert tc_again.num_params == tc.num_params == merged.num_params


def test_overridden_tiny_model_builds_what_it_says():
    cfg = small().merge(["memory.preset=memora", "memory.block_type=mal", "memory.layers=[3]"])
    model = cfg.build()
    att = model.blocks["3"].attention
    assert att.memory_block == "mal" and att.miras.memory.config.preset == "memora"
    assert model.blocks["0"].attention.miras is None


def test_parameter_report_logged_and_freeze_base(caplog):
    cfg = small("lm2")
    cfg.freeze_base = True
    with caplog.at_level(logging.INFO, logger="olmo_miras_plugin.models"):
        model = cfg.build()
    report = parameter_report(model)
    assert report["trainable"] == report["memory"] == cfg.num_memory_params > 0
    assert report["base"] == cfg.base.num_params
    assert f"memory {report['memory']:,d}" in caplog.text and "base" in caplog.text


@pytest.mark.parametrize(
    "change, match",
    [
        (["memory.layers=[12]"], r"memory layer 12 out of range for a 4-layer model \(valid 0..3\)"),
        (["memory.layers=[-1]"], r"memory layer -1 out of range for a 4-layer model \(valid 0..3\)"),
        (["memory.layers=[1,1]"], r"memory layers listed more than once: \[1\]"),
        (["memory.layers=null", "memory.every=0"], "memory.every must be a positive integer, got 0"),
        (["memory.layers=null", "memory.every=2", "memory.offset=2"], r"memory.offset must be in 0..1"),
        (["memory.layers=[1]", "memory.every=0"], "memory.every must be a positive integer, got 0"),
        (["memory.block_type=titans"], "unknown memory block type 'titans'; valid: mal, mag, mac, lm2"),
        (["memory.preset=atlas"], "unknown memory preset 'atlas'; valid presets: titans, moneta, yaad, memora"),
        (["memory.n_heads=3"], "memory: d_model=32 is not divisible by n_heads=3"),
        (["memory.block_type=lm2", "memory.lm2.n_heads=5"], "LM2 memory: d_model=32 is not divisible by n_heads=5"),
        (["memory.alpha_init=1.5"], r"alpha_init must be in \(0, 1\)"),
        (["memory.max_grad_norm=0"], r"max_grad_norm must be > 0 \(math.inf: no clipping\), got 0"),
    ],
)
def test_bad_model_config_errors(change: List[str], match: str):
    with pytest.raises((ValueError, OLMoConfigurationError), match=match):
        small().merge(change).build()


def test_layers_override_every_and_say_so(caplog: pytest.LogCaptureFixture):
    cfg = small().merge(["memory.layers=[2]", "memory.every=2", "memory.offset=1"])
    with caplog.at_level("WARNING", logger="olmo_miras_plugin.models"):
        assert cfg.memory.resolve_layers(4) == [2]
    assert "memory.layers=[2] is set, so every=2 / offset=1 are not used" in caplog.text


def test_tiny_heads_must_divide():
    with pytest.raises(OLMoConfigurationError, match="d_model=30 is not divisible by n_heads=4"):
        tiny_miras(d_model=30, n_heads=4)


def test_memory_gate_inits_and_inner_clip_reach_every_memory_layer():
    """The gate-init and inner-clip fields set what the memory computes: the gates at step 0 (from
    the biases, before any training) and the optimizer's per-token clip, on every memory layer."""
    from olmo_miras_plugin.memory import NeuralMemory

    model = small("mag", theta_max=0.05, theta_init=0.02, eta_init=0.5, alpha_init=1e-3, max_grad_norm=float("inf")).build()
    model.init_weights(max_seq_len=64, device=torch.device("cpu"))
    mems = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert len(mems) == 2
    for m in mems:
        with torch.no_grad():
            theta = torch.sigmoid(m.w_theta.bias) * m.config.theta_max
            eta, alpha = torch.sigmoid(m.w_eta.bias) * m.config.eta_max, torch.sigmoid(m.w_alpha.bias)
        assert m.config.theta_max == 0.05
        torch.testing.assert_close(theta, torch.full_like(theta, 0.02))
        torch.testing.assert_close(eta, torch.full_like(eta, 0.5))
        torch.testing.assert_close(alpha, torch.full_like(alpha, 1e-3))
        assert m.rule.optimizer.max_grad_norm is None  # inf: no clipping
    default = [m for m in small("mag", max_grad_norm=0.5).build().modules() if isinstance(m, NeuralMemory)]
    assert all(m.rule.optimizer.max_grad_norm == 0.5 for m in default)


def test_set_memory_impl() -> None:
    """The inference CLIs' ``--memory-impl``: every memory layer switches; ``auto`` off CUDA and
    ``keep`` leave the checkpoint's choice; a bad name is refused with the valid ones."""
    from olmo_miras_plugin.memory import MemoryImpl, NeuralMemory
    from olmo_miras_plugin.models import set_memory_impl, tiny_miras

    model = tiny_miras(vocab_size=64).build(init_device="cpu")
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert layers and all(m.impl == MemoryImpl.chunked for m in layers)
    assert set_memory_impl(model, "auto", torch.device("cpu")) is None
    assert set_memory_impl(model, "keep") is None
    assert all(m.impl == MemoryImpl.chunked for m in layers)
    assert set_memory_impl(model, "triton") == "triton"
    assert all(m.impl == MemoryImpl.triton for m in layers)
    with pytest.raises(ValueError, match="unknown memory impl 'fast'; valid: auto, keep, reference"):
        set_memory_impl(model, "fast")


def test_auto_memory_impl_only_where_a_kernel_applies() -> None:
    """``auto`` on CUDA switches the layers whose rule a Triton kernel computes (titans, linear or
    MLP) and leaves the others (e.g. yaad's Huber objective) as they were."""
    pytest.importorskip("triton")
    from olmo_miras_plugin.memory import MemoryImpl, NeuralMemory
    from olmo_miras_plugin.memory.triton_scan import rule_supported
    from olmo_miras_plugin.models import set_memory_impl

    def layers(preset: str, depth: int = 2):
        cfg = NeuralMemoryConfig.from_preset(preset, d_model=32, n_heads=2, architecture=MemoryArchitectureConfig(depth=depth))
        return torch.nn.ModuleList([cfg.build()])

    cuda = torch.device("cuda")
    for preset, depth, supported in (("titans", 2, True), ("titans", 1, True), ("yaad", 2, False), ("memora", 2, False)):
        model = layers(preset, depth)
        (layer,) = [m for m in model.modules() if isinstance(m, NeuralMemory)]
        assert rule_supported(layer.rule) == supported, (preset, depth)
        assert set_memory_impl(model, "auto", cuda) == ("triton" if supported else None)
        assert layer.impl == (MemoryImpl.triton if supported else MemoryImpl.chunked)


def test_saved_configs_keep_the_preset_values_they_were_trained_with():
    """A config names its preset, not the preset's numbers: one saved before the presets' inner
    step changed (no ``preset_revision``) must still build the θ it was trained with, through
    every loader (checkpoint / HF conversion / HF config); new configs record the revision."""
    import json

    from olmo_miras_plugin.eval.harness import _build_from_config
    from olmo_miras_plugin.hf.configuration_olmo_miras import OlmoMirasConfig
    from olmo_miras_plugin.hf.convert import miras_config_from_dict
    from olmo_miras_plugin.memory import NeuralMemory
    from olmo_miras_plugin.models import PRESET_REVISION, upgrade_saved_config

    new = small("mag").as_config_dict()
    assert new["memory"]["preset_revision"] == PRESET_REVISION
    assert MirasModelConfig.from_dict(new).memory.neural_memory(64, 2).theta_max == 2e-3
    old = json.loads(json.dumps(new))
    del old["memory"]["preset_revision"]
    loaders = {
        "upgrade": lambda d: MirasModelConfig.from_dict(upgrade_saved_config(d)),
        "convert": lambda d: miras_config_from_dict(d, "test"),
        "hf": lambda d: OlmoMirasConfig(miras_config=d).miras_model_config(),
    }
    for name, load in loaders.items():
        mem = load(json.loads(json.dumps(old))).memory.neural_memory(64, 2)
        assert (mem.theta_init, mem.theta_max, mem.eta_init, mem.eta_max) == (0.01, 0.1, 0.9, 1.0), name
    model = _build_from_config(old, torch.device("cpu"), 64)
    thetas = {m.config.theta_max for m in model.modules() if isinstance(m, NeuralMemory)}
    assert thetas == {0.1}
    # Explicit values still win; yaad's revision-1 step; a bad revision is refused with the valid ones.
    old["memory"].update(theta_init=0.02, theta_max=0.05)
    assert MirasModelConfig.from_dict(upgrade_saved_config(old)).memory.neural_memory(64, 2).theta_max == 0.05
    yaad = MirasMemoryConfig(preset="yaad", preset_revision=1).neural_memory(64, 2)
    assert (yaad.theta_init, yaad.theta_max) == (0.1, 1.0)
    with pytest.raises(OLMoConfigurationError, match=r"preset_revision must be one of \[1, 2, 3\], got 7"):
        MirasMemoryConfig(preset_revision=7).neural_memory(64, 2)
    # The titans momentum: uncapped in revisions 1 and 2 (saved configs of those keep it), capped now.
    for revision, want in ((1, (0.9, 1.0)), (2, (0.9, 1.0)), (3, (0.8, 0.9))):
        mem = MirasMemoryConfig(preset_revision=revision).neural_memory(64, 2)
        assert (mem.eta_init, mem.eta_max) == want, revision
    assert MirasMemoryConfig(preset_revision=2).neural_memory(64, 2).theta_max == 2e-3
    assert MirasMemoryConfig(preset_revision=2, eta_max=0.95).neural_memory(64, 2).eta_max == 0.95
