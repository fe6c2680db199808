"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Set, Tuple

import torch

from olmo_miras_plugin.blocks import MemoryBlockType
from olmo_miras_plugin.models import is_memory_param

BLOCK_TYPES = [b.value for b in MemoryBlockType]  # every memory block type the tests sweep


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def activate_memory(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every memory parameter off its zero init (context gates to 0.7, the rest by N(0, 0.3²)
    noise) so the memory branch visibly changes the output; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_memory_param(name):
            if "context_gate" in name:
                p.fill_(0.7)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def patch_triton_interpreter_for_numpy() -> None:
    """triton 3.6's interpreter does ``int(array_of_shape_1)`` for ``range(n)`` over a kernel
    argument; NumPy ≥ 2.4 refuses that. Make it take the single element instead."""
    import numpy as np

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


_INTERPRETER_TIMEOUT_S = 900
# Interpreter suites started ahead of their test (tests/conftest.py): abspath -> Future[(rc, output)].
_interpreted_runs: Dict[str, "Future[Tuple[int, str]]"] = {}
_interpreter_pool: Optional[ThreadPoolExecutor] = None
_running: Set[subprocess.Popen] = set()


def _run_interpreter_subprocess(test_file: str) -> Tuple[int, str]:
    """Rerun ``test_file``'s non-GPU tests with ``TRITON_INTERPRET=1`` (Triton reads it at first
    import, and setting it for the whole session would also interpret inductor's kernels on a GPU
    machine). One torch thread: the interpreter is single-threaded Python, and it runs beside the
    main session."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _running.add(proc)
    try:
        out, _ = proc.communicate(timeout=_INTERPRETER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -9, f"{out}\n(killed: the interpreter suite ran past {_INTERPRETER_TIMEOUT_S} s)"
    finally:
        _running.discard(proc)
    return proc.returncode, out


def start_interpreted_in_background(test_files: List[str]) -> None:
    """Start the interpreter suites now, one after another in a background thread, so they overlap
    the rest of the session (~5 of CI's ~11 minutes on 2 cores); :func:`run_interpreted` then
    waits for its file's result."""
    global _interpreter_pool
    if _interpreter_pool is None:
        _interpreter_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton-interpret")
    for f in test_files:
        key = os.path.abspath(f)
        if key not in _interpreted_runs:
            _interpreted_runs[key] = _interpreter_pool.submit(_run_interpreter_subprocess, key)


def stop_interpreted() -> None:
    """Cancel suites not started and kill running ones (end of session, e.g. after ``-x``)."""
    for fut in _interpreted_runs.values():
        fut.cancel()
    for proc in list(_running):
        proc.kill()
    if _interpreter_pool is not None:
        _interpreter_pool.shutdown(wait=True)


def run_interpreted(test_file: str) -> None:
    """The result of ``test_file``'s interpreter suite (started in the background by the session,
    or run here); fail with its output unless all its tests passed."""
    fut = _interpreted_runs.get(os.path.abspath(test_file))
    rc, out = fut.result() if fut is not None else _run_interpreter_subprocess(test_file)
    assert rc == 0, out
    assert " passed" in out and " failed" not in out, out


def interpreter_harness(test_file: str, interpreted: bool):
    """For a Triton test module: the marker of its interpreter-only tests and the test that reruns
    them in a ``TRITON_INTERPRET=1`` subprocess (:func:`run_interpreted`), bound in the module as
    ``interpreted, test_interpreted_suite = interpreter_harness(__file__, INTERPRETED)``; inside
    that subprocess it also patches the interpreter for NumPy ≥ 2.4."""
    import pytest

    if interpreted:
        patch_triton_interpreter_for_numpy()

    @pytest.mark.skipif(interpreted, reason="this is the subprocess")
    def test_interpreted_suite():
        run_interpreted(test_file)

    return pytest.mark.skipif(not interpreted, reason="runs in the TRITON_INTERPRET=1 subprocess"), test_interpreted_suite


def save_tiny_hf_olmo2(path, n_layers: int = 4, seed: int = 0):
    """A tiny random transformers ``Olmo2ForCausalLM`` saved to ``path`` (byte vocabulary, the
    byte tokenizer's special ids): a local stand-in for a pretrained OLMo 2 on the hub."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.Olmo2ForCausalLM(
        transformers.Olmo2Config(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=259,
            rope_theta=500_000,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            eos_token_id=256,
            pad_token_id=257,
            bos_token_id=258,
        )
    )
    hf.save_pretrained(path)
    return hf
