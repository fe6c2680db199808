"""Generation with carried memory: segment-wise prefill + decoding equals the argmax of full
forward passes (OLMo-core loop, transformers' generate(), our loop on the HF model), capped
key/value context agrees across back ends, constant-size RoPE state, and the generate.py CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from olmo_core.distributed.checkpoint import save_model_and_optim_state

from olmo_miras_plugin.generation import (
    GenerationStats,
    HFStatefulLM,
    OLMoCoreStatefulLM,
    generate,
    stream,
)
from olmo_miras_plugin.hf import OlmoMirasForCausalLM, convert_to_hf, hf_config_from_miras, olmo_core_to_hf_state
from olmo_miras_plugin.hf.cli import generate_main
from olmo_miras_plugin.models import MirasMemoryConfig, MirasModelConfig, tiny_miras
from olmo_miras_plugin.tokenizer import ByteTokenizer, byte_tokenizer_config

from miras_test_utils import BLOCK_TYPES, activate_memory

torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spin-waits on a shared 2-core machine


def small(block_type: str, window: Optional[int] = 8, **kwargs) -> MirasModelConfig:
    memory = MirasMemoryConfig(block_type=block_type, layers=[0, 2], chunk_size=4)
    return tiny_miras(d_model=32, n_layers=4, n_heads=4, window=window, memory=memory, **kwargs)


def build(cfg: MirasModelConfig, seed: int = 1) -> torch.nn.Module:
    """OLMo-core model with the memory moved off its zero init (so it matters)."""
    model = cfg.build()
    model.init_weights(max_seq_len=64)
    return activate_memory(model, seed).eval()


def hf_of(cfg: MirasModelConfig, model: torch.nn.Module) -> OlmoMirasForCausalLM:
    hf_cfg = hf_config_from_miras(cfg)
    hf = OlmoMirasForCausalLM(hf_cfg)
    hf.load_state_dict(olmo_core_to_hf_state(hf_cfg, model.state_dict()), strict=True)
    return hf.eval()


def prompt(length: int = 30, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def argmax_loop(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: a full (stateless) forward pass over the whole sequence for every new token."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("window", [8, None], ids=["olmo3", "olmo2"])
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_greedy_generation_equals_argmax_of_full_forward_passes(block_type, window):
    """Prompt of 30 tokens (> the window of 8 and many memory chunks of 4) prefilled in segments of
    7, then 10 tokens decoded with the carried state: the same tokens as full forward passes, on
    OLMo-core, with transformers' generate() on the HF model, and with our loop on the HF model."""
    cfg = small(block_type, window)
    model = build(cfg)
    x = prompt()
    want = argmax_loop(model, x, 10)

    stats = GenerationStats()
    assert torch.equal(generate(model, x, 10, segment_len=7, stats=stats), want)
    assert stats.segments == [7, 7, 7, 7, 2] and stats.new_tokens == 10

    hf = hf_of(cfg, model)
    calls: List[int] = []
    hook = hf.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        got = hf.generate(x, max_new_tokens=10, do_sample=False, prefill_chunk_size=7, attention_mask=torch.ones_like(x))
    finally:
        hook.remove()
    assert torch.equal(got, want)
    assert calls == [7, 7, 7, 7, 2] + [1] * 9  # prefilled in segments, then one token per step
    assert torch.equal(generate(hf, x, 10, segment_len=7), want)


@torch.no_grad()
def test_hf_beam_search_and_batches_carry_memory_correctly():
    """Beam search reorders the cache every step: the memory states must follow their beams. Same
    result as recomputing everything without a cache."""
    cfg = small("mac")
    hf = hf_of(cfg, build(cfg))
    x = prompt(20, batch=2)
    for kwargs in (dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)):
        cached = hf.generate(x, max_new_tokens=6, do_sample=False, prefill_chunk_size=6, **kwargs)
        uncached = hf.generate(x, max_new_tokens=6, do_sample=False, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)


def test_generation_state_is_per_call_and_eos_stops():
    cfg = small("mag")
    model = build(cfg)
    x = prompt(batch=1)
    first = generate(model, x, 6, segment_len=5)
    assert torch.equal(generate(model, x, 6, segment_len=11), first)  # state reset, segmenting irrelevant
    # EOS = the last new token whose value did not come up earlier in the continuation: generation
    # must stop right after producing it (the first occurrence).
    new = first[0, x.shape[1] :].tolist()
    j = max(i for i, tok in enumerate(new) if tok not in new[:i])
    eos = new[j]
    out = generate(model, x, 6, segment_len=5, eos_token_id=eos)
    assert out.shape[1] == x.shape[1] + j + 1 and int(out[0, -1]) == eos
    assert torch.equal(out, first[:, : x.shape[1] + j + 1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = generate(model, x, 8, temperature=1.0, top_k=20, generator=g1)
    assert torch.equal(s1, generate(model, x, 8, temperature=1.0, top_k=20, generator=g2))


@pytest.mark.parametrize("block_type, window", [("mac", 8), ("mag", None)])
@torch.no_grad()
def test_capped_kv_context_agrees_across_back_ends(block_type, window):
    """Constant memory needs full-attention layers to carry at most max_kv_context keys/values; the
    OLMo-core and HF back ends apply the same rule (and it is an approximation: it changes the logits)."""
    cfg = small(block_type, window)
    model = build(cfg)
    hf = hf_of(cfg, model)
    x = prompt(60, batch=1, seed=5)
    oc, capped, exact = OLMoCoreStatefulLM(model, max_kv_context=5), HFStatefulLM(hf, max_kv_context=5), HFStatefulLM(hf)
    try:
        for s in range(0, 60, 6):
            a, b, c = (lm.feed(x[:, s : s + 6]) for lm in (oc, capped, exact))
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    finally:
        oc.close()
    assert float((b - c).abs().max()) > 1e-3
    # Only the full-attention layers are capped; sliding-window layers keep window - 1.
    sizes = [layer.keys.shape[-2] for layer in capped.cache.layers]
    assert sizes == ([7, 7, 7, 5] if window else [5, 5, 5, 5])


@torch.no_grad()
def test_olmo_core_streaming_keeps_no_growing_rope_table():
    """OLMo-core's RoPE would cache sin/cos for every position up to the current one; while
    generating, each call computes only its own rows, and the model is left as it was."""
    cfg = small("lm2")
    model = build(cfg)
    ropes = [m.rope for m in model.modules() if getattr(m, "rope", None) is not None]
    lm = OLMoCoreStatefulLM(model)
    stream(lm, (prompt(100, batch=1, seed=s) for s in range(30)))
    for rope in ropes:
        table = rope._cache.get("rope_pos_sin")
        assert table is None or table.shape[0] <= 100
    lm.close()
    assert all("forward" not in r.__dict__ for r in ropes)
    with pytest.raises(ValueError, match="stream_attention=True"):
        OLMoCoreStatefulLM(small("mag", stream_attention=False).build())


# ---------------------------------------------------------------------------------------------- CLI
def _checkpoint(tmp_path: Path, cfg: MirasModelConfig, model: torch.nn.Module) -> Path:
    ckpt = tmp_path / "step5"
    save_model_and_optim_state(str(ckpt / "model_and_optim"), model)
    experiment = {"model": cfg.as_config_dict(), "dataset": {"tokenizer": byte_tokenizer_config().as_config_dict()}}
    (ckpt / "config.json").write_text(json.dumps(experiment))
    return ckpt


def test_generate_cli_streams_a_long_file_from_checkpoint_and_hf_dir(tmp_path, capsys):
    cfg = small("mac", window=8)
    model = build(cfg)
    ckpt = _checkpoint(tmp_path, cfg, model)
    hf_dir = tmp_path / "hf"
    convert_to_hf(ckpt, hf_dir, validate=False)
    text = "The quick brown fox jumps over the lazy dog. " * 20  # 900 bytes >> window 8
    (tmp_path / "doc.txt").write_text(text)
    question = "What jumps?"
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(text + f"\n\nQuestion: {question}\nAnswer:")])
    want = generate(model, ids, 6, segment_len=64, eos_token_id=tok.eos_token_id, max_kv_context=8)
    want_text = tok.decode(want[0, ids.shape[1] :].tolist())

    outputs = []
    for source in (ckpt, hf_dir):
        stats_file = tmp_path / f"{source.name}.json"
        argv = [str(source), "--input", str(tmp_path / "doc.txt"), "--question", question, "--max-new-tokens", "6"]
        argv += ["--segment-len", "64", "--no-progress", "--stats-json", str(stats_file), "--threads", "1"]
        assert generate_main(argv) == 0
        out = capsys.readouterr()
        outputs.append(out.out.rstrip("\n"))
        stats = json.loads(stats_file.read_text())
        assert stats["format"] == ("olmo_core" if source == ckpt else "hf")
        assert stats["tokenizer"] == "bytes"  # the model was trained with it (both directories say so)
        assert stats["prompt_tokens"] == ids.shape[1]
        assert stats["segments"] == -(-ids.shape[1] // 64) and stats["max_kv_context"] == 8
        assert stats["new_tokens"] == len(want[0]) - ids.shape[1]
        assert stats["peak_memory_bytes"] > 0 and stats["prefill_tokens_per_second"] > 0
        assert "tok/s" in out.err and "peak memory" in out.err
        assert not list(tmp_path.glob(".*.tmp*"))  # written via a temporary file, none left behind
    assert outputs == [want_text, want_text]

    # The exported tokenizer.json gives the same answer.
    argv = [str(hf_dir), "--tokenizer", str(hf_dir), "--input", str(tmp_path / "doc.txt"), "--question", question]
    assert generate_main(argv + ["--max-new-tokens", "6", "--segment-len", "64", "--no-progress", "--threads", "1"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want_text

    assert generate_main([str(ckpt), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_generate_cli_rejects_bad_arguments_before_loading(tmp_path, capsys):
    """Each is refused up front (the model path doesn't even exist) with one line naming the value,
    never a traceback or a silent change (temperature -1 is not greedy, top-k 0 is not "all")."""
    missing_model = str(tmp_path / "no_model")
    cases = [
        (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
        (["--top-k", "0"], "argument --top-k: must be an integer >= 1, got 0"),
        (["--top-k", "-4"], "argument --top-k: must be an integer >= 1, got -4"),
        (["--max-kv-context", "-3"], "argument --max-kv-context: must be an integer >= 0, got -3"),
        (["--device", "foo"], "--device 'foo': expected auto, cpu, cuda or cuda:N"),
        (["--device", "mps"], "--device 'mps': expected auto, cpu, cuda or cuda:N"),
        (["--stats-json", str(tmp_path / "nonexistent" / "s.json")], f"directory {tmp_path / 'nonexistent'} doesn't exist"),
        (["--stats-json", str(tmp_path)], "is a directory"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device 'cuda': CUDA is not available on this machine"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            generate_main([missing_model, "--prompt", "hi", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_generate_cli_hf_dir_without_weights_is_a_user_error(tmp_path, capsys):
    cfg = small("mag")
    convert_to_hf(build(cfg), tmp_path / "hf", config=cfg, validate=False)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    assert generate_main([str(empty), "--prompt", "hi", "--tokenizer", "bytes", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "Traceback" not in err


def test_library_rejects_bad_sampling_and_cache_arguments():
    from olmo_miras_plugin.generation import decode, sample_next

    cfg = small("mag", window=None)
    model = build(cfg)
    hf = hf_of(cfg, model)
    logits = torch.randn(1, 259)
    for kwargs, message in (
        (dict(temperature=-1.0), "temperature must be a finite number >= 0 .*got -1.0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=1.0, top_k=0), "top_k must be None .*or an integer >= 1, got 0"),
        (dict(temperature=1.0, top_k=-4), "top_k must be None .*or an integer >= 1, got -4"),
        (dict(top_k=0), "top_k must be None"),
    ):
        with pytest.raises(ValueError, match=message):
            sample_next(logits, **kwargs)
        with pytest.raises(ValueError, match=message):
            decode(None, logits, 3, **kwargs)
        for m in (model, hf):
            with pytest.raises(ValueError, match=message):
                generate(m, prompt(5, batch=1), 3, **kwargs)
    assert sample_next(logits, temperature=0.0).shape == (1, 1)
    caps = {n: m.max_kv_context for n, m in model.named_modules() if hasattr(m, "max_kv_context")}
    for bad in (-3, 1.5):
        with pytest.raises(ValueError, match=f"max_kv_context must be None .*integer >= 0, got {bad}"):
            OLMoCoreStatefulLM(model, max_kv_context=bad)
        with pytest.raises(ValueError, match=f"max_kv_context must be None .*integer >= 0, got {bad}"):
            HFStatefulLM(hf, max_kv_context=bad)
        with pytest.raises(ValueError, match="max_kv_context must be None"):
            generate(model, prompt(5, batch=1), 3, max_kv_context=bad)
    # Nothing was left half-applied on the model.
    assert caps == {n: m.max_kv_context for n, m in model.named_modules() if hasattr(m, "max_kv_context")}
    assert torch.equal(generate(model, prompt(5, batch=1), 3, max_kv_context=0)[:, :5], prompt(5, batch=1))
