"""MemoryDiagnosticsCallback's grad norm under data parallelism, and HFPretrainedWeightsCallback's
errors for bad Hugging Face checkpoints."""

from __future__ import annotations

import os
import tempfile
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.multiprocessing as mp

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.train.common import ReduceType
from olmo_core.train.utils import reduce_metrics
from olmo_miras_plugin.models import MirasMemoryConfig, tiny_miras
from olmo_miras_plugin.train.callbacks import HFPretrainedWeightsCallback, MemoryDiagnosticsCallback

from miras_test_utils import save_tiny_hf_olmo2


# ------------------------------------------------------------------------------ grad norm
def _model():
    torch.manual_seed(0)
    return tiny_miras(
        d_model=64, n_layers=2, n_heads=2, window=None, memory=MirasMemoryConfig(layers=[1], chunk_size=16)
    )


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1 + rank))


def _reported_grad_norm(model) -> float:
    """Runs the callback like the trainer does and reduces its metrics like the trainer does."""
    metrics: Dict[int, Dict[str, torch.Tensor]] = {1: OrderedDict()}
    rtypes: Dict[str, Any] = {}

    def record(name, value, reduce_type=None):
        metrics[1][name] = torch.as_tensor(value).float()
        rtypes[name] = reduce_type

    trainer = types.SimpleNamespace(
        global_step=1, train_module=types.SimpleNamespace(model=model), record_metric=record
    )
    cb = MemoryDiagnosticsCallback(surprise=False)
    cb.trainer = trainer
    cb.pre_train()
    cb.pre_step({})
    cb.pre_optim_step()
    cb.close()
    return reduce_metrics(metrics, rtypes, torch.device("cpu"))[1]["memory/layer1/grad_norm"]


def _memory_grads(model) -> List[torch.Tensor]:
    return [p.grad for p in model.blocks["1"].attention.miras.memory.parameters() if p.grad is not None]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}

    # DDP: every rank holds the same (averaged) full gradients.
    model = _model().build(init_device="cpu")
    model(_batch(rank)).float().logsumexp(-1).mean().backward()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    results["ddp"] = _reported_grad_norm(model)
    # Reference on one process from the full gradients: plain norm over all memory grads.
    results["ddp_ref"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in _memory_grads(model)])).item()

    # FSDP2: each rank holds a shard of the (averaged) gradients.
    mesh = init_device_mesh("cpu", (world,))
    model = _model().build(init_device="cpu")
    model.apply_fsdp(dp_mesh=mesh)
    model(_batch(rank)).float().logsumexp(-1).mean().backward()
    grads = _memory_grads(model)
    assert grads and all(hasattr(g, "full_tensor") for g in grads)
    results["fsdp"] = _reported_grad_norm(model)
    full = [g.full_tensor() for g in grads]  # collective: gather before the rank-0 reference
    results["fsdp_ref"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in full])).item()
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_grad_norm_two_ranks_ddp_and_fsdp_match_full_gradient_norm(tmp_path: Path) -> None:
    """Under DDP (replicated grads) and FSDP (sharded grads) the reported memory grad norm is the
    norm of the full gradients, not sqrt(#ranks) times it."""
    world = 2
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(world, init_file, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert r["ddp"] == pytest.approx(r["ddp_ref"], rel=1e-5), (rank, r)
        assert r["fsdp"] == pytest.approx(r["fsdp_ref"], rel=1e-5), (rank, r)
        assert r["ddp_ref"] > 0 and r["fsdp_ref"] > 0


def test_grad_norm_single_process() -> None:
    model = _model().build(init_device="cpu")
    model(_batch(0)).float().logsumexp(-1).mean().backward()
    expected = torch.cat([g.flatten() for g in _memory_grads(model)]).norm().item()
    assert _reported_grad_norm(model) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ HF weights
def _save_hf(path: Path, layers: int = 4, generation_config: bool = True) -> Path:
    pytest.importorskip("transformers")
    save_tiny_hf_olmo2(path, n_layers=layers)
    if not generation_config:
        os.remove(path / "generation_config.json")
    return path


def _load(path: str, tmp_path: Path):
    model = tiny_miras(window=None, memory=MirasMemoryConfig(layers=[1], chunk_size=32), freeze_base=True).build(
        init_device="cpu"
    )
    cb = HFPretrainedWeightsCallback(path=path)
    cb.trainer = types.SimpleNamespace(
        checkpoint_loaded=False,
        train_module=types.SimpleNamespace(model=model),
        dp_process_group=None,
        work_dir=str(tmp_path / "work"),
    )
    cb.pre_train()
    return model


def test_hf_pretrained_more_layers_than_model(tmp_path: Path) -> None:
    path = _save_hf(tmp_path / "hf6", layers=6)
    with pytest.raises(OLMoConfigurationError) as e:
        _load(str(path), tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "blocks.4." in msg and "blocks.5." not in msg.split("e.g.")[0]
    assert "checkpoint: 6 layer(s), model: 4 layer(s)" in msg


def test_hf_pretrained_fewer_layers_than_model(tmp_path: Path) -> None:
    path = _save_hf(tmp_path / "hf2", layers=2)
    with pytest.raises(OLMoConfigurationError, match=r"lacks \d+ base parameter.*blocks\.2\..*checkpoint: 2 layer"):
        _load(str(path), tmp_path)


def test_hf_pretrained_without_generation_config(tmp_path: Path) -> None:
    path = _save_hf(tmp_path / "nogen", generation_config=False)
    with pytest.raises(OLMoConfigurationError, match="generation_config.json") as e:
        _load(str(path), tmp_path)
    assert str(path) in str(e.value)


def test_hf_pretrained_missing_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OLMoConfigurationError, match="not an existing directory") as e:
        _load(str(tmp_path / "nope"), tmp_path)
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OLMoConfigurationError, match="has no config.json"):
        _load(str(tmp_path / "empty"), tmp_path)
    # A relative path whose parent exists but which doesn't: looks like a hub id, is a local typo.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    with pytest.raises(OLMoConfigurationError, match="'ckpts/olmo2-1b' is not an existing directory"):
        _load("ckpts/olmo2-1b", tmp_path)


def test_hf_pretrained_unreachable_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import olmo_core.nn.hf.checkpoint as ck

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ck, "repo_exists", lambda *a, **k: False)  # offline / no such repo
    with pytest.raises(OLMoConfigurationError, match="'someone/no-such-model' is neither an existing local"):
        _load("someone/no-such-model", tmp_path)


def test_hf_pretrained_loads_matching_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = _save_hf(tmp_path / "ok")
    model = _load(str(path), tmp_path)
    hf = transformers.Olmo2ForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
