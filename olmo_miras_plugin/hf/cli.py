"""What ``scripts/convert_to_hf.py``, ``scripts/convert_from_hf.py`` and ``scripts/generate.py`` run.

Errors the user can fix (not a MIRAS model, incomplete checkpoint, existing output, no
tokenizer) print one ``error:`` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

from ..argtypes import float_at_least, int_at_least
from ..atomic_files import write_text_atomic

__all__ = ["convert_to_hf_main", "convert_from_hf_main", "generate_main", "load_any_model", "load_tokenizer"]

log = logging.getLogger("olmo_miras_plugin.hf")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("olmo_core", "olmo_miras_plugin.models", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _user_errors() -> Tuple[type, ...]:
    from .checkpoint import CheckpointError
    from .convert import ConversionError

    # OSError: also what transformers raises for an HF directory without weights.
    return (CheckpointError, ConversionError, OSError, ValueError)


def _fail(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _check_device(spec: str) -> torch.device:
    """``--device``, checked before anything is loaded; ``ValueError`` naming the value otherwise."""
    from ..eval.harness import resolve_device

    valid = "expected auto, cpu, cuda or cuda:N"
    try:
        requested = None if spec == "auto" else torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: {valid}") from None
    if requested is not None and requested.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec!r}: {valid}")
    try:
        device = resolve_device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: CUDA is not available on this machine (use --device cpu)") from None
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= n:
        raise ValueError(f"--device {spec!r}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    return device


# ---------------------------------------------------------------------------------------------- convert
def convert_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description="OLMo-core MIRAS checkpoint -> Hugging Face model directory "
        "(load with AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)).",
    )
    p.add_argument("checkpoint", help="OLMo-core checkpoint: a stepN directory (or its model_and_optim/)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the weights (default: keep the checkpoint's)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json to include (default: the checkpoint's)")
    p.add_argument("--max-position-embeddings", type=int_at_least(1), help="default: the training sequence length")
    p.add_argument("--prefill-chunk-size", type=int_at_least(1), help="generate()'s default prompt segment length")
    p.add_argument("--no-validate", action="store_true", help="skip the HF vs OLMo-core logits comparison")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    args = p.parse_args(argv)
    _setup_logging()
    from .convert import convert_to_hf

    try:
        t0 = time.perf_counter()
        cfg = convert_to_hf(
            args.checkpoint,
            args.out_dir,
            dtype=_DTYPES[args.dtype] if args.dtype else None,
            tokenizer=args.tokenizer,
            max_position_embeddings=args.max_position_embeddings,
            prefill_chunk_size=args.prefill_chunk_size,
            validate=not args.no_validate,
            overwrite=args.overwrite,
        )
    except _user_errors() as e:
        return _fail(e)
    mc = cfg.miras_model_config()
    print(
        f"wrote {args.out_dir}: {cfg.base_model_type} base, {mc.memory.resolved_block_type().value} memory at "
        f"layers {mc.memory_layers()} ({time.perf_counter() - t0:.1f}s)"
    )
    return 0


def convert_from_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_from_hf.py",
        description="Hugging Face olmo-miras model directory -> OLMo-core checkpoint "
        "(train from it with --pretrained.path=OUT).",
    )
    p.add_argument("hf_dir", help="HF directory written by convert_to_hf.py (model_type olmo_miras)")
    p.add_argument("out", help="output checkpoint directory (model_and_optim/ + config.json)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    args = p.parse_args(argv)
    _setup_logging()
    from .convert import convert_from_hf

    try:
        cfg = convert_from_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    except _user_errors() as e:
        return _fail(e)
    print(f"wrote {args.out}: OLMo-core checkpoint of a {cfg.memory.resolved_block_type().value} MIRAS model")
    return 0


# ---------------------------------------------------------------------------------------------- loading
def _is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "olmo_miras"
    except ValueError:
        return False


def load_any_model(
    path: str, *, device: str = "cpu", dtype: Optional[torch.dtype] = None
) -> Tuple[torch.nn.Module, str, Any]:
    """``(model, kind, info)``: an HF olmo-miras directory (``kind="hf"``, info: its config) or an
    OLMo-core checkpoint directory (``kind="olmo_core"``, info: the ``LoadedCheckpoint``)."""
    p = Path(path)
    if _is_hf_dir(p):
        from .modeling_olmo_miras import OlmoMirasForCausalLM

        model = OlmoMirasForCausalLM.from_pretrained(str(p), dtype=dtype or torch.float32).to(device).eval()
        return model, "hf", model.config
    from .convert import load_olmo_core_model

    model, ckpt = load_olmo_core_model(p, device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model, "olmo_core", ckpt


class _Tokenizer:
    """``encode`` / ``decode`` / ``eos_token_id`` over the byte tokenizer or an HF fast tokenizer."""

    def __init__(self, tok: Any, name: str):
        self.tok, self.name = tok, name
        self.is_bytes = name == "bytes"
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> List[int]:
        if self.is_bytes:
            return self.tok.encode(text)
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec: Optional[str], model_path: str, kind: str, info: Any, vocab_size: int) -> _Tokenizer:
    """``--tokenizer bytes`` / ``--tokenizer DIR``, else the model's own (tokenizer files next to it,
    or the byte tokenizer it was trained with)."""
    from ..tokenizer import ByteTokenizer

    def hf_tok(d: Path) -> _Tokenizer:
        from transformers import PreTrainedTokenizerFast

        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        return _Tokenizer(PreTrainedTokenizerFast.from_pretrained(str(d)), str(d))

    if spec == "bytes":
        return _Tokenizer(ByteTokenizer(), "bytes")
    if spec is not None:
        return hf_tok(Path(spec))
    ident = getattr(info, "miras_tokenizer", None) if kind == "hf" else (info.tokenizer_config() or {}).get("identifier")
    if ident == ByteTokenizer.identifier:
        # The exported tokenizer.json is equivalent; the byte tokenizer splits a stream exactly anywhere.
        return _Tokenizer(ByteTokenizer(), "bytes")
    p = Path(model_path)
    candidates = [p] if kind == "hf" else [p / "tokenizer", p, p.parent / "tokenizer"]
    for d in candidates:
        if (d / "tokenizer.json").is_file():
            return hf_tok(d)
    if ident is None and vocab_size == ByteTokenizer.vocab_size:
        return _Tokenizer(ByteTokenizer(), "bytes")
    raise FileNotFoundError(f"no tokenizer found for {model_path} (trained with {ident!r}); pass --tokenizer DIR")


def _iter_text_tokens(path: Path, tok: _Tokenizer, block_bytes: int = 1 << 18) -> Iterator[Tuple[List[int], int]]:
    """``(token ids, bytes consumed)`` of a text file, a block at a time (constant memory). The
    byte tokenizer is exact on any split; other tokenizers get blocks cut at line ends."""
    with open(path, "rb") as f:
        if tok.is_bytes:
            while block := f.read(block_bytes):
                yield list(block), len(block)
            return
        rest = b""
        while True:
            block = f.read(block_bytes)
            data = rest + block
            if not block:
                if data:
                    yield tok.encode(data.decode("utf-8", errors="replace")), len(data)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            rest = data[cut:]
            yield tok.encode(data[:cut].decode("utf-8", errors="replace")), cut


def _segments(chunks: Iterator[List[int]], segment_len: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Re-cut token blocks into ``(1, segment_len)`` tensors (the last one shorter)."""
    rest = torch.empty(0, dtype=torch.long)
    for ids in chunks:
        block = torch.cat([rest, torch.tensor(ids, dtype=torch.long)])
        n_full = block.shape[0] // segment_len
        for i in range(n_full):
            yield block[i * segment_len : (i + 1) * segment_len].unsqueeze(0).to(device)
        rest = block[n_full * segment_len :].clone()
    if rest.numel():
        yield rest.unsqueeze(0).to(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _default_kv_cap(model: torch.nn.Module, kind: str) -> int:
    """The largest sliding window of the model (what its windowed layers see anyway), else 4096."""
    windows: List[int] = []
    if kind == "hf":
        sw = getattr(model.config, "sliding_window", None)
        if sw and "sliding_attention" in model.config.resolved_layer_types():
            windows.append(int(sw))
    else:
        windows = [m.window_size for m in model.modules() if isinstance(getattr(m, "window_size", None), int)]
    return max(windows) if windows else 4096


# ---------------------------------------------------------------------------------------------- generate
def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    from ..models import INFERENCE_IMPL_CHOICES, set_memory_impl

    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Stream a long text through a MIRAS model segment by segment (memory carried, constant "
        "memory), then generate a continuation or answer a question.",
    )
    p.add_argument("model", help="OLMo-core checkpoint directory or HF olmo-miras directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="text file to read first (any length)")
    src.add_argument("--prompt", help="prompt text")
    p.add_argument("--question", help="appended after the input as '\\n\\nQuestion: ...\\nAnswer:'")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--segment-len", type=int, default=512, help="tokens per prefill call")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument(
        "--max-kv-context",
        type=int_at_least(0),
        help="full-attention layers carry at most this many past keys/values (default: the sliding window, or 4096)",
    )
    cap.add_argument("--exact", action="store_true", help="no cap: exact, but memory grows with the input")
    p.add_argument("--temperature", type=float_at_least(0), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int_at_least(1), help="sample from the K most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="model dtype (default: float32)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine 1 can be much faster)")
    p.add_argument("--tokenizer", help="'bytes' or a directory with tokenizer.json (default: the model's)")
    p.add_argument("--memory-impl", default="auto", choices=INFERENCE_IMPL_CHOICES,
                   help="memory layers' impl (auto: triton on CUDA where a kernel applies, else the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stats-json", help="also write the statistics to this JSON file")
    args = p.parse_args(argv)
    _setup_logging(quiet=True)

    from tqdm import tqdm

    from ..generation import GenerationStats, decode, stateful_lm, stream

    if args.input is None and args.prompt is None and args.question is None:
        p.error("give --input FILE, --prompt TEXT and/or --question TEXT")
    if args.segment_len <= 0 or args.max_new_tokens < 0:
        p.error("--segment-len must be > 0 and --max-new-tokens >= 0")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        device = _check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    # Checked now, not after all the reading and generating.
    stats_path = Path(args.stats_json) if args.stats_json else None
    if stats_path is not None and stats_path.is_dir():
        p.error(f"--stats-json {stats_path}: is a directory")
    if stats_path is not None and not stats_path.parent.is_dir():
        p.error(f"--stats-json {stats_path}: directory {stats_path.parent} doesn't exist")
    if args.input is not None and not Path(args.input).is_file():
        return _fail(FileNotFoundError(f"--input {args.input}: no such file"))
    try:
        t_load = time.perf_counter()
        model, kind, info = load_any_model(args.model, device=str(device), dtype=_DTYPES[args.dtype] if args.dtype else None)
        vocab = int(model.config.vocab_size) if kind == "hf" else int(model.vocab_size)
        tok = load_tokenizer(args.tokenizer, args.model, kind, info, vocab)
        set_memory_impl(model, args.memory_impl, device)
        t_load = time.perf_counter() - t_load
    except _user_errors() as e:
        return _fail(e)
    kv_cap = None if args.exact else (args.max_kv_context if args.max_kv_context is not None else _default_kv_cap(model, kind))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_loaded = _rss_bytes()

    question = None
    if args.question is not None:
        question = f"\n\nQuestion: {args.question}\nAnswer:" if args.input or args.prompt else f"Question: {args.question}\nAnswer:"

    def prompt_chunks() -> Iterator[Tuple[List[int], int]]:
        if args.input is not None:
            yield from _iter_text_tokens(Path(args.input), tok)
        for text in (args.prompt, question):
            if text is not None:
                yield tok.encode(text), len(text.encode())

    total = (Path(args.input).stat().st_size if args.input else 0) + sum(
        len(t.encode()) for t in (args.prompt, question) if t is not None
    )
    # Progress in bytes of text read (= tokens for the byte tokenizer), with tokens/s alongside.
    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc="reading", disable=args.no_progress, file=sys.stderr)
    stats = GenerationStats()
    lm = stateful_lm(model, max_kv_context=kv_cap)
    pending = [0]

    def chunk_tokens() -> Iterator[List[int]]:
        for ids, n_bytes in prompt_chunks():
            pending[0] += n_bytes
            yield ids

    def on_segment(n_tok: int) -> None:
        step = n_tok if tok.is_bytes else pending[0]
        pending[0] -= step
        bar.update(step)
        bar.set_postfix(tokens=stats.prompt_tokens, tok_s=f"{stats.prefill_tokens_per_second:.0f}", refresh=False)

    try:
        try:
            logits = stream(lm, _segments(chunk_tokens(), args.segment_len, device), stats=stats, on_segment=on_segment)
        finally:
            bar.close()
        if logits is None:
            return _fail(ValueError("the input is empty"))
        gen_bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generating", disable=args.no_progress, file=sys.stderr)
        generator = torch.Generator().manual_seed(args.seed)
        new = decode(
            lm,
            logits,
            args.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=generator,
            stats=stats,
            on_token=lambda _: gen_bar.update(1),
        )
        gen_bar.close()
    finally:
        lm.close()

    text = tok.decode(new[0].tolist())
    print(text)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()
    report = {
        "model": args.model,
        "format": kind,
        "device": str(device),
        "tokenizer": tok.name,
        "prompt_tokens": stats.prompt_tokens,
        "segments": len(stats.segments),
        "segment_len": args.segment_len,
        "max_kv_context": kv_cap,
        "new_tokens": stats.new_tokens,
        "load_seconds": round(t_load, 3),
        "prefill_seconds": round(stats.prefill_seconds, 3),
        "prefill_tokens_per_second": round(stats.prefill_tokens_per_second, 1),
        "decode_seconds": round(stats.decode_seconds, 3),
        "decode_tokens_per_second": round(stats.decode_tokens_per_second, 1),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "rss_after_load_bytes": int(rss_loaded),
    }
    mib = 1 << 20
    print(
        f"[{kind}] read {stats.prompt_tokens:,} tokens in {len(stats.segments)} segments "
        f"({report['prefill_tokens_per_second']:,.0f} tok/s), generated {stats.new_tokens} tokens "
        f"({report['decode_tokens_per_second']:,.1f} tok/s); peak memory {peak / mib:,.1f} MiB "
        f"({report['peak_memory_kind']}; RSS after loading {rss_loaded / mib:,.1f} MiB); "
        f"kv cap {kv_cap if kv_cap is not None else 'none (exact)'}",
        file=sys.stderr,
    )
    if stats_path is not None:
        write_text_atomic(stats_path, json.dumps(report, indent=2) + "\n")
    return 0
