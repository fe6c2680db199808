"""Hugging Face export of MIRAS models: logits equal to OLMo-core's (memory active), zero-init
equal to transformers' own Olmo2/Olmo3ForCausalLM, exact round trips, checkpoint directories,
remote code, and clear failures on bad input. All offline, tiny fp32 models."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

from olmo_core.distributed.checkpoint import load_model_and_optim_state, save_model_and_optim_state

from olmo_miras_plugin.hf import (
    CheckpointError,
    ConversionError,
    MirasCache,
    OlmoMirasConfig,
    OlmoMirasForCausalLM,
    convert_from_hf,
    convert_to_hf,
    hf_config_from_miras,
    load_miras_checkpoint,
    olmo_core_to_hf_state,
)
from olmo_miras_plugin.hf.cli import convert_from_hf_main, convert_to_hf_main
from olmo_miras_plugin.models import MirasMemoryConfig, MirasModelConfig, is_memory_param, tiny_miras
from olmo_miras_plugin.tokenizer import ByteTokenizer, byte_tokenizer_config

from miras_test_utils import activate_memory

torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spin-waits on a shared 2-core machine

REPO = Path(__file__).resolve().parents[1]

# (block type, sliding window (None: OLMo2 base), persistent tokens, kv heads): every block type on
# both bases; MAL/MAG/LM2 once through transformers' own attention and once with persistent tokens.
CASES = [
    ("mal", 8, 0, None),
    ("mal", None, 2, 2),
    ("mag", 8, 0, 2),
    ("mag", None, 0, None),
    ("mac", 8, None, 2),
    ("mac", None, None, None),
    ("lm2", 8, 2, None),
    ("lm2", None, 0, 2),
]
CASE_IDS = [f"{b}-{'olmo3' if w else 'olmo2'}-p{p}-kv{kv}" for b, w, p, kv in CASES]


def small(block_type: str, window: Optional[int] = 8, n_persistent: Optional[int] = None, n_kv_heads=None) -> MirasModelConfig:
    memory = MirasMemoryConfig(block_type=block_type, layers=[0, 2], chunk_size=4, n_persistent=n_persistent)
    return tiny_miras(d_model=32, n_layers=4, n_heads=4, n_kv_heads=n_kv_heads, window=window, memory=memory)


def build(cfg: MirasModelConfig, *, active: bool = True, seed: int = 1) -> torch.nn.Module:
    """The OLMo-core model, with its memory weights moved off their zero init (``active``) so the
    memory branch changes the logits."""
    model = cfg.build()
    model.init_weights(max_seq_len=64)
    if active:
        activate_memory(model, seed)
    return model.eval()


def tokens(batch: int = 2, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_in_memory(cfg: MirasModelConfig, model: torch.nn.Module) -> OlmoMirasForCausalLM:
    hf_cfg = hf_config_from_miras(cfg)
    hf = OlmoMirasForCausalLM(hf_cfg)
    hf.load_state_dict(olmo_core_to_hf_state(hf_cfg, model.state_dict()), strict=True)
    return hf.eval()


def transformers_base(hf: OlmoMirasForCausalLM) -> torch.nn.Module:
    """transformers' own Olmo2/Olmo3ForCausalLM holding ``hf``'s base weights (strict)."""
    from transformers import Olmo2ForCausalLM, Olmo3ForCausalLM

    base_cfg = hf.config.to_base_config()
    cls = {"olmo2": Olmo2ForCausalLM, "olmo3": Olmo3ForCausalLM}[hf.config.base_model_type]
    assert base_cfg.model_type == hf.config.base_model_type
    plain = cls(base_cfg)
    plain.load_state_dict({k: v for k, v in hf.state_dict().items() if not is_memory_param(k)}, strict=True)
    return plain.eval()


def write_checkpoint(path: Path, cfg: MirasModelConfig, model: torch.nn.Module, tokenizer: bool = True) -> Path:
    """An OLMo-core checkpoint directory laid out as the trainer writes it."""
    save_model_and_optim_state(str(path / "model_and_optim"), model)
    experiment: Dict = {"run_name": "t", "model": cfg.as_config_dict()}
    if tokenizer:
        experiment["dataset"] = {"tokenizer": byte_tokenizer_config().as_config_dict(), "sequence_length": 128}
    (path / "config.json").write_text(json.dumps(experiment))
    return path


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("block_type, window, n_persistent, n_kv", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_hf_logits_equal_olmo_core_with_active_memory(tmp_path, block_type, window, n_persistent, n_kv):
    cfg = small(block_type, window, n_persistent, n_kv)
    model = build(cfg)
    convert_to_hf(model, tmp_path / "hf", config=cfg, validate=False)
    hf = OlmoMirasForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = tokens()
    want = model(x)
    got = hf(x).logits
    assert rel(got, want) <= 1e-5
    # The memory really takes part: without it (transformers' base model) the logits differ a lot.
    assert rel(transformers_base(hf)(x).logits, want) > 1e-2
    # The HF model carries its state too: pieces (inside chunks, segments, windows) = whole.
    cache, outs, s = MirasCache(config=hf.config), [], 0
    for n in (13, 1, 1, 7, 18):
        out = hf(x[:, s : s + n], cache=cache, use_cache=True)
        assert out.cache is cache
        outs.append(out.logits)
        s += n
    assert rel(torch.cat(outs, dim=1), want) <= 2e-5
    assert set(cache.memory_states) == {0, 2}


@pytest.mark.parametrize("block_type, window, n_persistent, n_kv", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_zero_init_memory_equals_transformers_olmo(block_type, window, n_persistent, n_kv):
    """A MIRAS model at its zero init is exactly its base: the HF model equals transformers'
    Olmo2ForCausalLM / Olmo3ForCausalLM with the same base weights (an independent check of the
    base conversion too) — built from converted weights, and built by HF from the config."""
    cfg = small(block_type, window, n_persistent, n_kv)
    model = build(cfg, active=False)
    hf = hf_in_memory(cfg, model)
    plain = transformers_base(hf)
    assert type(plain).__name__ == ("Olmo3ForCausalLM" if window else "Olmo2ForCausalLM")
    x = tokens()
    want = plain(x).logits
    assert rel(hf(x).logits, want) <= 1e-5
    assert rel(model(x), want) <= 1e-5
    # An HF model built from the config initialises its memory as OLMo-core does (zero output).
    fresh = OlmoMirasForCausalLM(hf.config).eval()
    missing, unexpected = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(is_memory_param(k) for k in missing)
    assert rel(fresh(x).logits, want) <= 1e-5


@torch.no_grad()
def test_hf_cache_refuses_another_batch_before_any_layer_and_never_aliases_weights():
    """Layer 0 has no memory here, so transformers' attention would run (and grow the KV cache)
    before a memory layer could notice the batch change; the model checks first. A state carried
    after a call shorter than a chunk must not be a view of the learned initial memory."""
    cfg = tiny_miras(d_model=32, n_layers=4, n_heads=4, window=8,
                     memory=MirasMemoryConfig(block_type="mag", layers=[1, 3], chunk_size=4))
    hf = hf_in_memory(cfg, build(cfg))
    x = tokens(2, 12)
    whole = hf(x).logits
    cache = MirasCache(config=hf.config)
    first = hf(x[:, :3], cache=cache, use_cache=True).logits
    params = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    carried = [t for st in cache.memory_states.values() for t in st.tensors()]
    assert carried and not any(t.untyped_storage().data_ptr() in params for t in carried)
    with pytest.raises(ValueError, match="the cache carries a batch of 2 but the input has 3 rows"):
        hf(tokens(3, 4), cache=cache, use_cache=True)
    rest = hf(x[:, 3:], cache=cache, use_cache=True).logits
    assert rel(torch.cat([first, rest], dim=1), whole) <= 1e-5


def test_memory_parameter_names():
    cfg = small("mac", n_persistent=2)
    model = build(cfg)
    hf_cfg = hf_config_from_miras(cfg)
    hf_state = olmo_core_to_hf_state(hf_cfg, model.state_dict())
    memory = sorted(k for k in hf_state if ".miras." in k)
    assert memory and all(k.startswith(("model.layers.0.miras.", "model.layers.2.miras.")) for k in memory)
    assert "model.layers.0.miras.memory.w_q.weight" in memory and "model.layers.2.miras.context_gate" in memory
    assert "model.layers.0.self_attn.q_proj.weight" in hf_state and "lm_head.weight" in hf_state
    assert sum(is_memory_param(k) for k in hf_state) == sum(is_memory_param(k) for k in model.state_dict())
    assert hf_cfg.base_model_type == "olmo3" and hf_cfg.sliding_window == 8
    assert hf_cfg.auto_map["AutoModelForCausalLM"] == "modeling_olmo_miras.OlmoMirasForCausalLM"


# ---------------------------------------------------------------------------------------------- round trips
@torch.no_grad()
def test_round_trip_olmo_core_hf_olmo_core_is_exact(tmp_path):
    for block_type, window in (("mal", 8), ("mag", None), ("mac", 8), ("lm2", 8)):
        cfg = small(block_type, window, n_persistent=2 if block_type == "mag" else None)
        model = build(cfg, seed=3)
        d = tmp_path / block_type
        convert_to_hf(model, d / "hf", config=cfg, validate=False)
        assert convert_from_hf_main([str(d / "hf"), str(d / "oc")]) == 0
        back = load_miras_checkpoint(d / "oc")
        original = model.state_dict()
        assert set(back.state) == set(original)
        for k, v in original.items():
            assert back.state[k].dtype == v.dtype and torch.equal(back.state[k], v), k
        assert back.config.as_config_dict() == cfg.as_config_dict()
        # The trainer's loader (OLMo-core's own) reads it too.
        fresh = cfg.build()
        load_model_and_optim_state(str(d / "oc" / "model_and_optim"), fresh)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in original.items())


def test_memory_caps_and_backprop_span_survive_the_round_trip(tmp_path):
    """``eta_max`` (which changes the η gate, so the logits) and ``backprop_span`` (training only)
    are kept by OLMo-core → HF → OLMo-core, and the HF model computes with the cap."""
    cfg = small("mal", 8)
    cfg.memory.eta_max, cfg.memory.backprop_span = 0.95, 8
    model = build(cfg, seed=3)
    with torch.no_grad():  # drive the η gate into its cap, so the cap changes the logits
        for name, p in model.named_parameters():
            if name.endswith("w_eta.bias"):
                p.fill_(6.0)
    convert_to_hf(model, tmp_path / "hf", config=cfg, validate=False)
    hf = OlmoMirasForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = tokens()
    with torch.no_grad():
        want = model(x)
        assert rel(hf(x).logits, want) <= 1e-5
        uncapped = small("mal", 8)
        plain = uncapped.build()
        plain.load_state_dict(model.state_dict())
        assert rel(plain.eval()(x), want) > 1e-4  # the cap is not a no-op here
    assert convert_from_hf_main([str(tmp_path / "hf"), str(tmp_path / "oc")]) == 0
    back = load_miras_checkpoint(tmp_path / "oc").config
    assert back.memory.eta_max == 0.95 and back.memory.backprop_span == 8
    assert back.as_config_dict() == cfg.as_config_dict()


def test_checkpoint_directory_to_hf_with_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    cfg = small("mac", window=8)
    model = build(cfg)
    ckpt = write_checkpoint(tmp_path / "step10", cfg, model)
    out = tmp_path / "hf"
    assert convert_to_hf_main([str(ckpt), str(out)]) == 0  # validates logits against OLMo-core
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert {"modeling_olmo_miras.py", "configuration_olmo_miras.py"} <= files
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "olmo_miras" and raw["auto_map"]["AutoConfig"].startswith("configuration_olmo_miras.")
    assert raw["miras_tokenizer"] == "olmo-miras/bytes" and raw["eos_token_id"] == 256
    assert raw["max_position_embeddings"] == 128
    assert json.loads((out / "generation_config.json").read_text())["prefill_chunk_size"] == 128
    tok, ref = AutoTokenizer.from_pretrained(str(out)), ByteTokenizer()
    for text in ("hello world", "é e\u0301 中文 🙂\n\tx"):
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text)
        assert tok.decode(ref.encode(text)) == text
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (256, 257, 258)
    # The model_and_optim directory itself works as the checkpoint too (config.json one level up).
    assert load_miras_checkpoint(ckpt / "model_and_optim").state.keys() == model.state_dict().keys()


def test_trust_remote_code_in_a_fresh_process(tmp_path):
    """What users do: a process that never imported olmo_miras_plugin.hf loads the directory's own
    code through auto_map."""
    cfg = small("mag", window=8)
    model = build(cfg)
    out = tmp_path / "hf"
    convert_to_hf(model, out, config=cfg, validate=False)
    x = tokens(1, 24)
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules."), type(m).__module__
        assert "olmo_miras_plugin.hf" not in sys.modules
        e = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            got = m(e["x"]).logits
        err = float((got - e["logits"]).abs().max() / e["logits"].abs().max())
        assert err <= 1e-5, err
        print("OK", err)
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------- failures
def _one_checkpoint(tmp_path: Path) -> Path:
    cfg = small("mag", window=8)
    return write_checkpoint(tmp_path / "step1", cfg, build(cfg))


def test_not_a_miras_model_fails_clearly(tmp_path, capsys):
    cfg = small("mag")
    plain = cfg.base.build()
    save_model_and_optim_state(str(tmp_path / "base" / "model_and_optim"), plain)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model": cfg.base.as_config_dict()}))
    with pytest.raises(ConversionError, match="not a MIRAS model: the model is a plain OLMo-core TransformerConfig"):
        convert_to_hf(tmp_path / "base", tmp_path / "out")
    assert convert_to_hf_main([str(tmp_path / "base"), str(tmp_path / "out2")]) == 2
    assert "error: " in capsys.readouterr().err
    with pytest.raises(ConversionError, match="not a MIRAS model: config is a TransformerConfig"):
        convert_to_hf(plain, tmp_path / "out3", config=cfg.base)
    # A MIRAS config whose checkpoint holds only base weights: named, with the reason.
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model": cfg.as_config_dict()}))
    with pytest.raises(ConversionError, match="memory parameter.*a base OLMo checkpoint"):
        convert_to_hf(tmp_path / "base", tmp_path / "out4")


def test_incomplete_or_corrupted_checkpoints_fail_clearly(tmp_path):
    ckpt = _one_checkpoint(tmp_path)
    mo = ckpt / "model_and_optim"
    with pytest.raises(CheckpointError, match="doesn't exist"):
        load_miras_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not an OLMo-core checkpoint"):
        load_miras_checkpoint(tmp_path)

    data = sorted(mo.glob("*.distcp"))
    blob = data[0].read_bytes()
    data[0].write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint: data file .*{data[0].name} is truncated"):
        load_miras_checkpoint(ckpt)
    data[0].unlink()
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint: data file .*{data[0].name} is missing"):
        load_miras_checkpoint(ckpt)

    meta = (mo / ".metadata").read_bytes()
    (mo / ".metadata").write_bytes(meta[: len(meta) // 3])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_miras_checkpoint(ckpt)
    (mo / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="not an OLMo-core checkpoint"):
        load_miras_checkpoint(ckpt)

    ckpt2 = _one_checkpoint(tmp_path / "b")
    (ckpt2 / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_miras_checkpoint(ckpt2)


def test_checkpoint_metadata_is_never_unpickled_freely(tmp_path):
    """A .metadata pickle that would run code is refused before anything runs."""
    ckpt = _one_checkpoint(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "model_and_optim" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refusing to read checkpoint metadata: .*os.system|posix.system"):
        load_miras_checkpoint(ckpt)
    assert not marker.exists()


def test_hf_side_failures(tmp_path):
    cfg = small("lm2")
    model = build(cfg)
    out = tmp_path / "hf"
    convert_to_hf(model, out, config=cfg, validate=False)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_to_hf(model, out, config=cfg, validate=False)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "olmo3"}))
    with pytest.raises(ConversionError, match="not a MIRAS model: .*'olmo3'.*--pretrained.format=hf"):
        convert_from_hf(plain, tmp_path / "oc")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((out / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match="pytorch_model.bin are pickle files, which are never loaded"):
        convert_from_hf(pickled, tmp_path / "oc")

    raw = json.loads((out / "config.json").read_text())
    raw["miras_config"]["memory"]["_CLASS_"] = "os.system"
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match="refusing config class 'os.system'"):
        convert_from_hf(out, tmp_path / "oc")
    with pytest.raises(ValueError, match="refusing config class"):
        OlmoMirasConfig.from_pretrained(str(out)).miras_model_config()

    with pytest.raises(ValueError, match="padding"):
        hf = hf_in_memory(cfg, model)
        hf(tokens(2, 6), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))


def test_non_positive_sizes_are_refused_before_anything_is_written(tmp_path, capsys):
    """A size <= 0 would be exported and only fail in generate() ("split_size be non-negative");
    0 is not a "default" either: refused by the API and the CLI, naming the value."""
    cfg = small("mag")
    model = build(cfg)
    for name in ("max_position_embeddings", "prefill_chunk_size"):
        for bad in (0, -3):
            with pytest.raises(ValueError, match=f"{name} must be a positive integer .*got {bad}"):
                convert_to_hf(model, tmp_path / "out", config=cfg, validate=False, **{name: bad})
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive integer"):
        hf_config_from_miras(cfg, max_position_embeddings=-1)
    assert not (tmp_path / "out").exists()
    for flag in ("--prefill-chunk-size", "--max-position-embeddings"):
        for bad in ("0", "-3"):
            with pytest.raises(SystemExit) as e:
                convert_to_hf_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), flag, bad])
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {flag}: must be an integer >= 1, got {bad}" in err and "Traceback" not in err


def test_output_path_that_is_a_file_fails_clearly(tmp_path, capsys):
    cfg = small("mal")
    model = build(cfg)
    hf_dir = tmp_path / "hf"
    convert_to_hf(model, hf_dir, config=cfg, validate=False)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"output {afile} exists and is not a directory"):
            convert_to_hf(model, afile, config=cfg, validate=False, overwrite=overwrite)
        with pytest.raises(FileExistsError, match=f"output {afile} exists and is not a directory"):
            convert_from_hf(hf_dir, afile, overwrite=overwrite)
        flags = ["--overwrite"] if overwrite else []
        ckpt = write_checkpoint(tmp_path / f"step{int(overwrite)}", cfg, model)
        for main, src in ((convert_to_hf_main, ckpt), (convert_from_hf_main, hf_dir)):
            assert main([str(src), str(afile), *flags]) == 2
            err = capsys.readouterr().err
            assert f"error: output {afile} exists and is not a directory" in err and "Traceback" not in err
    assert afile.read_text() == "keep me"


def test_hf_settings_survive_hf_olmo_core_hf(tmp_path):
    """max_position_embeddings and prefill_chunk_size are HF-only: convert_from_hf records them in
    config.json ("hf") so that exporting the checkpoint again gives them back (none stays none)."""
    cfg = small("mag")
    model = build(cfg)
    convert_to_hf(model, tmp_path / "hf", config=cfg, max_position_embeddings=96, prefill_chunk_size=24, validate=False)
    convert_from_hf(tmp_path / "hf", tmp_path / "oc")
    assert json.loads((tmp_path / "oc" / "config.json").read_text())["hf"] == {
        "max_position_embeddings": 96,
        "prefill_chunk_size": 24,
    }
    assert convert_to_hf_main([str(tmp_path / "oc"), str(tmp_path / "hf2"), "--no-validate"]) == 0
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["max_position_embeddings"] == 96
    assert json.loads((tmp_path / "hf2" / "generation_config.json").read_text())["prefill_chunk_size"] == 24
    # Explicit values still win.
    convert_to_hf(tmp_path / "oc", tmp_path / "hf3", prefill_chunk_size=8, max_position_embeddings=40, validate=False)
    assert json.loads((tmp_path / "hf3" / "config.json").read_text())["max_position_embeddings"] == 40
    assert json.loads((tmp_path / "hf3" / "generation_config.json").read_text())["prefill_chunk_size"] == 8
    # An export without a prefill_chunk_size gets none back.
    convert_to_hf(model, tmp_path / "plain", config=cfg, validate=False)
    convert_from_hf(tmp_path / "plain", tmp_path / "plain_oc")
    convert_to_hf(tmp_path / "plain_oc", tmp_path / "plain2", validate=False)
    assert "prefill_chunk_size" not in json.loads((tmp_path / "plain2" / "generation_config.json").read_text())
    assert json.loads((tmp_path / "plain2" / "config.json").read_text())["max_position_embeddings"] == 65536


def test_text_outputs_are_written_atomically(tmp_path, monkeypatch):
    from olmo_miras_plugin.atomic_files import write_text_atomic as _write_text_atomic

    target = tmp_path / "config.json"
    target.write_text("old")

    def interrupted(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        _write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    monkeypatch.undo()
    _write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
