"""Tokenize local text / JSON Lines / Parquet corpora into OLMo-core token files.

Why this exists: OLMo-core's numpy datasets (:class:`~olmo_core.data.NumpyFSLDatasetConfig` and
friends) read pre-tokenized token files and nothing else, and the tiny default experiment must run
offline. This module writes exactly the format those datasets read:

* Each token file is a raw, header-less array of token ids (``np.memmap`` layout, native byte
  order, i.e. little-endian on x86-64/ARM64) named ``*.npy`` by OLMo-core/Dolma convention -- it
  is *not* an ``np.save`` file.
* The dtype is ``uint16`` if every id fits (``vocab_size <= 65536``), else ``uint32``.
* Each document is ``[BOS] tokens [EOS]`` when the recorded tokenizer config has a
  ``bos_token_id`` and ``tokens [EOS]`` otherwise (a Hugging Face tokenizer gets a BOS only if it
  adds one itself and it differs from EOS, unless ``add_bos`` says otherwise), which is how OLMo-core finds document boundaries
  (:func:`olmo_core.data.utils.get_document_lengths`: with a BOS id a boundary is an EOS followed
  by a BOS).
* Next to each ``part-XXXXX.npy`` a ``part-XXXXX.csv.gz`` lists ``start,end`` token offsets of
  every document (end exclusive), the metadata file OLMo-core reads when it is told not to infer
  boundaries from the array (``use_array_if_local=False``) or the file is remote.
* ``manifest.json`` (written last) records dtype, tokenizer config, settings, per-file counts and
  a fingerprint of the inputs; its presence marks a complete run and lets reruns reuse outputs.

Every file is written to a temporary name and renamed into place, so a killed run never leaves a
half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import numpy as np
from olmo_core.config import Config
from olmo_core.data import NumpyDatasetDType, NumpyFSLDatasetConfig, TokenizerConfig

from ..atomic_files import fsync_replace as _fsync_replace  # the shard writer's rename (tests stop a run there)
from ..atomic_files import tmp_path_for, write_text_atomic
from ..tokenizer import ByteTokenizer, byte_tokenizer_config

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

__all__ = [
    "BYTE_TOKENIZER",
    "DEFAULT_MAX_TOKENS_PER_FILE",
    "DEFAULT_STDLIB_MAX_BYTES",
    "MANIFEST_NAME",
    "PrepareDataConfig",
    "PrepareDataError",
    "PreparedData",
    "SplitInfo",
    "TokenFileInfo",
    "dtype_for_vocab_size",
    "load_prepared_data",
    "prepare_data",
    "prepare_stdlib_corpus",
    "prepare_stdlib_data",
    "resolve_input_files",
    "stdlib_source_files",
]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

BYTE_TOKENIZER = "bytes"
"""Tokenizer spec selecting :class:`~olmo_miras_plugin.tokenizer.ByteTokenizer`."""

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".prepare.lock"
STDLIB_MARKER_NAME = ".stdlib-cache"
"""Present while ``output_dir`` is a cache of :func:`prepare_stdlib_data` (so an interrupted
stdlib run, which leaves no manifest, can still be recognized and replaced)."""
SOURCE_FILES = "files"
SOURCE_STDLIB = "stdlib"
MANIFEST_FORMAT = "olmo-miras-token-files"
MANIFEST_VERSION = 1

DEFAULT_MAX_TOKENS_PER_FILE = 2**28
"""256Mi tokens (512 MiB at uint16): OLMo-core drops each file's remainder, so fewer, larger files
waste less."""

DEFAULT_STDLIB_MAX_BYTES = 4 * 2**20
"""A few MiB of stdlib source: enough for the tiny experiment, tokenized in about a second."""

SPLITS: Tuple[str, str] = ("train", "validation")

TEXT_EXTENSIONS: Tuple[str, ...] = (
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org",
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".cu", ".rs", ".go",
    ".java", ".kt", ".scala", ".js", ".ts", ".jsx", ".tsx", ".rb", ".php", ".pl", ".lua",
    ".sh", ".bash", ".zsh", ".sql", ".r", ".jl", ".hs", ".ml", ".swift", ".m",
    ".html", ".htm", ".xml", ".css", ".csv", ".tsv", ".toml", ".yaml", ".yml", ".ini", ".cfg",
)  # fmt: skip
JSONL_EXTENSIONS: Tuple[str, ...] = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_EXTENSIONS: Tuple[str, ...] = (".parquet",)

_AUTO_NUM_PROC_MIN_BYTES = 32 * 2**20
"""Below this many input bytes a worker pool costs more than it saves."""
_MAP_BATCH_SIZE = 256
_WRITE_BATCH_SIZE = 8192
_SKIP_DIR_NAMES = frozenset({"__pycache__", "site-packages", "dist-packages"})


class PrepareDataError(ValueError):
    """A bad input or setting; the message names the offending value."""


def dtype_for_vocab_size(vocab_size: int) -> Type[np.unsignedinteger]:
    """``uint16`` if every token id in ``[0, vocab_size)`` fits, else ``uint32``."""
    if vocab_size <= 0:
        raise PrepareDataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size - 1 <= np.iinfo(np.uint16).max:
        return np.uint16
    if vocab_size - 1 <= np.iinfo(np.uint32).max:
        return np.uint32
    raise PrepareDataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


# --------------------------------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------------------------------


@dataclass
class PrepareDataConfig(Config):
    """Settings for :func:`prepare_data`.

    Documents: one per text file, one per JSON Lines record, one per Parquet row. Their order is
    the order of ``inputs``; a directory or glob expands in sorted path order.
    """

    inputs: List[str]
    """Files, directories (searched recursively) or glob patterns (``**`` allowed)."""
    output_dir: str
    tokenizer: str = BYTE_TOKENIZER
    """``"bytes"`` for the byte tokenizer, or a local Hugging Face tokenizer directory."""
    text_field: str = "text"
    """The field holding the document text in JSON Lines / Parquet inputs."""
    validation_fraction: float = 0.0
    """Fraction of documents (not tokens) held out into the ``validation`` split."""
    seed: int = 0
    """Seed of the train/validation assignment, so the split is reproducible."""
    max_tokens_per_file: int = DEFAULT_MAX_TOKENS_PER_FILE
    """Upper bound on tokens per output file. Files break between documents; only a document
    longer than this is split over several files."""
    num_proc: Optional[int] = None
    """Worker processes for ``datasets.map``; ``None`` picks 1 for small corpora, else all cores."""
    add_bos: Optional[bool] = None
    """Prefix documents with BOS. ``None``: the byte tokenizer does; a Hugging Face tokenizer does
    iff it adds its BOS itself (``tok("a")`` starts with it) and the BOS differs from EOS. Without
    BOS the BOS id is dropped from the recorded tokenizer config so OLMo-core splits documents on
    EOS alone. ``True`` fails if the tokenizer has no BOS or its BOS equals its EOS."""
    extra_text_extensions: List[str] = field(default_factory=list)
    """More extensions (e.g. ``".log"``) to read as plain text."""
    treat_unknown_as_text: bool = False
    """Read files with any unrecognized extension (or none) as plain text instead of failing."""
    overwrite: bool = False
    """Replace outputs in ``output_dir`` made with other settings (same settings are reused)."""
    show_progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise PrepareDataError("no inputs given: pass at least one file, directory or glob")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise PrepareDataError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.max_tokens_per_file <= 0:
            raise PrepareDataError(
                f"max_tokens_per_file must be positive, got {self.max_tokens_per_file}"
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise PrepareDataError(f"num_proc must be >= 1, got {self.num_proc}")
        if not self.text_field:
            raise PrepareDataError("text_field must be a non-empty field name")
        for ext in self.extra_text_extensions:
            if not ext.startswith("."):
                raise PrepareDataError(f"text extension {ext!r} must start with '.', e.g. '.log'")


@dataclass
class TokenFileInfo:
    """One token file and its document-offsets metadata file."""

    path: str
    metadata_path: str
    num_tokens: int
    num_documents: int
    """Document spans in this file (a document split over files counts in each)."""


@dataclass
class SplitInfo:
    name: str
    files: List[TokenFileInfo] = field(default_factory=list)
    num_documents: int = 0

    @property
    def paths(self) -> List[str]:
        return [f.path for f in self.files]

    @property
    def num_tokens(self) -> int:
        return sum(f.num_tokens for f in self.files)


@dataclass
class PreparedData:
    """What :func:`prepare_data` wrote (or found already written) in ``output_dir``."""

    output_dir: str
    dtype: str
    """``"uint16"`` or ``"uint32"``."""
    tokenizer: TokenizerConfig
    """The tokenizer config the files were written for; give exactly this to OLMo-core."""
    splits: Dict[str, SplitInfo]
    num_input_files: int
    num_skipped_empty: int
    """Documents dropped because they tokenized to nothing."""
    num_split_documents: int
    """Documents longer than ``max_tokens_per_file``, hence split over files."""
    fingerprint: str
    reused: bool = False
    """True when matching outputs already existed and nothing was written."""

    @property
    def train_paths(self) -> List[str]:
        return self.splits["train"].paths

    @property
    def validation_paths(self) -> List[str]:
        split = self.splits.get("validation")
        return [] if split is None else split.paths

    @property
    def numpy_dtype(self) -> Type[np.unsignedinteger]:
        return getattr(np, self.dtype)

    @property
    def dataset_dtype(self) -> NumpyDatasetDType:
        return NumpyDatasetDType(self.dtype)

    def dataset_config(
        self,
        split: str = "train",
        *,
        sequence_length: int,
        work_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> NumpyFSLDatasetConfig:
        """An OLMo-core FSL dataset config over one split, with matching tokenizer and dtype."""
        if split not in self.splits or not self.splits[split].files:
            raise PrepareDataError(f"split {split!r} has no files in {self.output_dir}")
        return NumpyFSLDatasetConfig(
            paths=self.splits[split].paths,
            tokenizer=self.tokenizer,
            dtype=self.dataset_dtype,
            sequence_length=sequence_length,
            work_dir=work_dir,
            **kwargs,
        )

    def summary(self) -> str:
        tok = self.tokenizer
        lines = [
            f"{'Reused' if self.reused else 'Wrote'} token files in {self.output_dir} "
            f"(dtype {self.dtype}, tokenizer {tok.identifier}, vocab {tok.vocab_size}, "
            f"eos {tok.eos_token_id}, bos {tok.bos_token_id})",
            f"  input files: {self.num_input_files:,d}; documents: "
            f"{sum(s.num_documents for s in self.splits.values()):,d} "
            f"(skipped empty: {self.num_skipped_empty:,d}, split over files: "
            f"{self.num_split_documents:,d})",
        ]
        num_files = 0
        for name, split in self.splits.items():
            num_files += len(split.files)
            lines.append(
                f"  {name + ':':<12} {split.num_documents:>10,d} documents "
                f"{split.num_tokens:>14,d} tokens {len(split.files):>5,d} files"
            )
        lines.append(
            f"  files {'present' if self.reused else 'written'}: {num_files} token files, "
            f"{num_files} metadata files, {MANIFEST_NAME}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Input discovery
# --------------------------------------------------------------------------------------------------


def _kind_of(
    path: Path, text_extensions: Sequence[str], treat_unknown_as_text: bool
) -> Optional[str]:
    name = path.name.lower()
    if any(name.endswith(ext) for ext in JSONL_EXTENSIONS):
        return "jsonl"
    if any(name.endswith(ext) for ext in PARQUET_EXTENSIONS):
        return "parquet"
    if path.suffix.lower() in text_extensions or treat_unknown_as_text:
        return "text"
    return None


def resolve_input_files(
    inputs: Sequence[PathLike],
    *,
    extra_text_extensions: Sequence[str] = (),
    treat_unknown_as_text: bool = False,
    exclude_dirs: Sequence[PathLike] = (),
) -> List[Tuple[Path, str]]:
    """Expand files / directories / globs into ``(path, kind)`` pairs, ``kind`` in
    ``{"text", "jsonl", "parquet"}``, in a deterministic order without duplicates.

    A named file or glob match with an unknown extension is an error (so nothing is silently
    dropped); inside a directory such files, hidden entries and ``__pycache__`` are skipped.
    """
    text_exts = tuple(e.lower() for e in (*TEXT_EXTENSIONS, *extra_text_extensions))
    excluded = [Path(d).resolve() for d in exclude_dirs]
    out: List[Tuple[Path, str]] = []
    seen: set = set()

    def add(path: Path, *, strict: bool) -> bool:
        kind = _kind_of(path, text_exts, treat_unknown_as_text)
        if kind is None:
            if strict:
                raise PrepareDataError(
                    f"unknown file extension {path.suffix or '(none)'!r} for input '{path}': "
                    f"supported are plain text ({', '.join(TEXT_EXTENSIONS[:8])}, ...), "
                    f"JSON Lines ({', '.join(JSONL_EXTENSIONS)}) and Parquet (.parquet); "
                    "add text extensions with extra_text_extensions / --text-ext, or set "
                    "treat_unknown_as_text / --treat-unknown-as-text"
                )
            return False
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append((path, kind))
        return True

    def walk(directory: Path) -> int:
        found = 0
        for root, dirs, files in os.walk(directory):
            root_path = Path(root)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and d not in _SKIP_DIR_NAMES
                and (root_path / d).resolve() not in excluded
            )
            for name in sorted(files):
                if not name.startswith("."):
                    found += add(root_path / name, strict=False)
        return found

    for raw in inputs:
        spec = str(raw)
        path = Path(spec).expanduser()
        if path.is_dir():
            if walk(path) == 0:
                raise PrepareDataError(
                    f"no input files matched in directory '{spec}' (no files with a supported "
                    "extension; see extra_text_extensions / treat_unknown_as_text)"
                )
        elif path.is_file():
            add(path, strict=True)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise PrepareDataError(f"no input files matched pattern '{spec}'")
            for f in files:
                add(f, strict=True)
        else:
            raise PrepareDataError(f"input path does not exist: '{spec}'")
    if not out:
        raise PrepareDataError(f"no input files matched {list(map(str, inputs))}")
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizers (picklable, so `datasets.map(num_proc=...)` can ship them to workers)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ByteEncoder:
    """Same ids as :meth:`ByteTokenizer.encode` (UTF-8 bytes), without building Python lists."""

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


@lru_cache(maxsize=4)
def _load_hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclass(frozen=True)
class _HFEncoder:
    """Loads the tokenizer lazily by path in each worker instead of pickling it."""

    path: str

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        tok = _load_hf_tokenizer(self.path)
        ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(i, dtype=np.int64) for i in ids]


_Encoder = Union[_ByteEncoder, _HFEncoder]


def _is_tokenizer_file(name: str) -> bool:
    """Files that define a HF tokenizer (not model weights, which may be huge to hash)."""
    return name == "config.json" or name.startswith(
        ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece")
    ) or name.endswith((".model", ".tiktoken"))


def _resolve_tokenizer(spec: str, add_bos: Optional[bool]) -> Tuple[_Encoder, TokenizerConfig, str]:
    """Returns the encoder, the OLMo-core tokenizer config the data will match, and a
    fingerprint of the tokenizer (so a changed tokenizer invalidates cached outputs)."""
    if spec == BYTE_TOKENIZER:
        config = byte_tokenizer_config()
        encoder: _Encoder = _ByteEncoder()
        fingerprint = f"{ByteTokenizer.identifier}:{ByteTokenizer.vocab_size}"
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise PrepareDataError(
                f"tokenizer must be {BYTE_TOKENIZER!r} or a local Hugging Face tokenizer "
                f"directory; '{spec}' is not a directory"
            )
        path = path.resolve()
        try:
            tok = _load_hf_tokenizer(str(path))
        except Exception as e:
            raise PrepareDataError(
                f"could not load a Hugging Face tokenizer from '{spec}': {e}"
            ) from e
        if tok.eos_token_id is None:
            raise PrepareDataError(
                f"tokenizer '{spec}' has no eos_token; documents need an EOS separator"
            )
        config = TokenizerConfig(
            vocab_size=len(tok),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            identifier=str(path),
        )
        encoder = _HFEncoder(str(path))
        if add_bos is None:
            add_bos = _hf_adds_bos(tok)
        digest = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file() and _is_tokenizer_file(p.name)):
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        fingerprint = f"hf:{path}:{digest.hexdigest()}"

    if add_bos is True and config.bos_token_id is None:
        raise PrepareDataError(f"add_bos=True but tokenizer '{spec}' has no BOS token")
    if add_bos is True and config.bos_token_id == config.eos_token_id:
        raise PrepareDataError(
            f"add_bos=True but tokenizer '{spec}' has BOS id {config.bos_token_id} equal to its "
            "EOS id, so document boundaries would be ambiguous; use add_bos=None/False"
        )
    if add_bos is False:
        config = dataclasses.replace(config, bos_token_id=None)
    return encoder, config, fingerprint


def _hf_adds_bos(tok: Any) -> bool:
    """Whether a Hugging Face tokenizer puts its own BOS (distinct from EOS) in front of text."""
    bos = tok.bos_token_id
    if bos is None or bos == tok.eos_token_id:
        return False
    try:
        ids = tok("a", add_special_tokens=True)["input_ids"]
    except Exception:  # pragma: no cover - exotic tokenizer; be conservative
        return False
    return len(ids) > 0 and ids[0] == bos


# --------------------------------------------------------------------------------------------------
# datasets map functions (module level so they pickle)
# --------------------------------------------------------------------------------------------------


def _read_text_files(batch: Dict[str, List[str]]) -> Dict[str, List[str]]:
    texts = []
    for p in batch["path"]:
        try:
            with open(p, "r", encoding="utf-8", newline="") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise PrepareDataError(f"input '{p}' is not valid UTF-8 text: {e}") from None
    return {"text": texts}


def _tokenize_table(
    table: "pa.Table",
    *,
    encoder: _Encoder,
    bos_token_id: Optional[int],
    eos_token_id: int,
    vocab_size: int,
    dtype_name: str,
) -> "pa.Table":
    """Text rows -> ``[BOS] ids [EOS]`` rows in the output dtype; empty documents are dropped."""
    import pyarrow as pa

    pieces = [p for p in encoder.encode_batch(table.column("text").to_pylist()) if len(p) > 0]
    for p in pieces:
        if p.dtype != np.uint8 and (int(p.max()) >= vocab_size or int(p.min()) < 0):
            raise PrepareDataError(
                f"tokenizer produced id {int(p.max())} outside its vocab size {vocab_size}"
            )
    head = 0 if bos_token_id is None else 1
    lengths = np.fromiter((len(p) + head + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=getattr(np, dtype_name))
    if bos_token_id is not None:
        values[offsets[:-1]] = bos_token_id
    values[offsets[1:] - 1] = eos_token_id
    for p, start in zip(pieces, offsets[:-1] + head):
        values[start : start + len(p)] = p
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table({"input_ids": ids})


# --------------------------------------------------------------------------------------------------
# Loading documents with Hugging Face datasets
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if enabled:
        enable_progress_bars()
    else:
        disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            disable_progress_bars()
        else:
            enable_progress_bars()


def _check_text_column(ds: "datasets.Dataset", path: Path, field_name: str, what: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if field_name not in ds.column_names:
        raise PrepareDataError(
            f"{what} field {field_name!r} missing in '{path}' (fields present: "
            f"{', '.join(ds.column_names) or 'none'}); choose one with text_field / --text-field"
        )
    col = ds.data.column(field_name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        if pa.types.is_null(col.type):
            raise PrepareDataError(
                f"{what} field {field_name!r} is null in every record of '{path}'"
            )
        raise PrepareDataError(
            f"{what} field {field_name!r} in '{path}' has type {col.type}, expected strings"
        )
    nulls = pc.is_null(col)
    if pc.any(nulls).as_py():
        first = pc.index(nulls, True).as_py()
        raise PrepareDataError(
            f"{what} field {field_name!r} missing or null in record {first + 1} (1-based) "
            f"of '{path}'"
        )


def _load_documents(
    files: Sequence[Tuple[Path, str]],
    config: PrepareDataConfig,
    cache_dir: str,
    num_proc: Optional[int],
) -> "datasets.Dataset":
    """One ``text`` column, one row per document, in input order."""
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features({"text": datasets.Value("string")})
    parts: List[datasets.Dataset] = []

    # Group runs of consecutive text files so each run is one parallel map.
    i = 0
    while i < len(files):
        path, kind = files[i]
        if kind == "text":
            j = i
            while j < len(files) and files[j][1] == "text":
                j += 1
            paths = datasets.Dataset.from_dict({"path": [str(p) for p, _ in files[i:j]]})
            parts.append(
                paths.map(
                    _read_text_files,
                    batched=True,
                    batch_size=64,
                    num_proc=num_proc if num_proc and j - i > 64 else None,
                    remove_columns=["path"],
                    features=features,
                    desc="Reading text files",
                )
            )
            i = j
            continue

        i += 1
        if path.stat().st_size == 0:
            continue
        field_name = config.text_field
        if kind == "parquet":
            try:
                names = pq.read_schema(path).names
            except Exception as e:
                raise PrepareDataError(f"could not read '{path}' as Parquet: {e}") from e
            if field_name not in names:
                raise PrepareDataError(
                    f"parquet column {field_name!r} missing in '{path}' (columns present: "
                    f"{', '.join(names) or 'none'}); choose one with text_field / --text-field"
                )
            builder_kwargs: Dict[str, Any] = {"columns": [field_name]}
            builder, what = "parquet", "parquet column"
        else:
            builder_kwargs, builder, what = {}, "json", "jsonl"
        try:
            ds = datasets.load_dataset(
                builder,
                data_files=[str(path)],
                split="train",
                cache_dir=cache_dir,
                **builder_kwargs,
            )
        except Exception as e:
            raise PrepareDataError(f"could not read '{path}' as {kind}: {e}") from e
        assert isinstance(ds, datasets.Dataset)
        if len(ds) == 0:
            continue
        _check_text_column(ds, path, field_name, what)
        ds = ds.select_columns([field_name])
        if field_name != "text":
            ds = ds.rename_column(field_name, "text")
        parts.append(ds if ds.features == features else ds.cast(features))

    if not parts:
        return datasets.Dataset.from_dict({"text": []}, features=features)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class _ShardWriter:
    """Streams documents of one split into ``part-XXXXX.npy`` files of at most ``max_tokens``.

    A file is closed before a document that would not fit, so documents stay whole; only a document
    longer than ``max_tokens`` is split, filling files to the brim.
    """

    def __init__(self, directory: Path, dtype: Type[np.unsignedinteger], max_tokens: int):
        self.directory = directory
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.files: List[TokenFileInfo] = []
        self.num_documents = 0
        self.num_split_documents = 0
        self._fh: Optional[io.BufferedWriter] = None
        self._tmp: Optional[Path] = None
        self._cur_tokens = 0
        self._cur_spans: List[np.ndarray] = []

    def _open(self) -> io.BufferedWriter:
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._tmp = tmp_path_for(self.directory / f"part-{len(self.files):05d}.npy")
            self._fh = open(self._tmp, "wb")
        return self._fh

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents: ``tokens`` is their concatenation, ``lengths`` their sizes."""
        if len(lengths) == 0:
            return
        self.num_documents += len(lengths)
        self.num_split_documents += int((lengths > self.max_tokens).sum())
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        t, d = 0, 0  # token position, index of the document containing it
        while t < total:
            room = self.max_tokens - self._cur_tokens
            if room == 0:
                self._finish()
                continue
            remaining = int(ends[d]) - t
            if remaining <= room:
                j = int(np.searchsorted(ends, t + room, side="right"))  # docs d..j-1 fit
                new_t = int(ends[j - 1])
                spans = np.concatenate([[remaining], lengths[d + 1 : j]])
                self._write(tokens[t:new_t], spans)
                t, d = new_t, j
            elif self._cur_tokens > 0 and remaining <= self.max_tokens:
                self._finish()  # fits whole in a fresh file
            else:
                self._write(tokens[t : t + room], np.array([room]))
                t += room

    def _write(self, tokens: np.ndarray, spans: np.ndarray) -> None:
        np.ascontiguousarray(tokens, dtype=self.dtype).tofile(self._open())
        self._cur_tokens += len(tokens)
        self._cur_spans.append(np.asarray(spans, dtype=np.int64))

    def _finish(self) -> None:
        if self._fh is None or self._cur_tokens == 0:
            return
        assert self._tmp is not None
        final = self.directory / f"part-{len(self.files):05d}.npy"
        meta = final.with_name(final.name[: -len(".npy")] + ".csv.gz")
        self._fh.close()
        self._fh = None

        # The same "start,end" lines as olmo_core.data.utils.write_document_indices (gzip mtime 0
        # so identical inputs give identical bytes).
        spans = np.concatenate(self._cur_spans)
        ends = np.cumsum(spans)
        starts = ends - spans
        body = "".join(f"{s},{e}\n" for s, e in zip(starts.tolist(), ends.tolist()))
        meta_tmp = tmp_path_for(meta)
        try:
            with open(meta_tmp, "wb") as raw, gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, mtime=0
            ) as gz:
                gz.write(body.encode())
            _fsync_replace(meta_tmp, meta)
        finally:
            meta_tmp.unlink(missing_ok=True)
        _fsync_replace(self._tmp, final)
        self._tmp = None

        self.files.append(
            TokenFileInfo(
                path=str(final),
                metadata_path=str(meta),
                num_tokens=self._cur_tokens,
                num_documents=len(spans),
            )
        )
        self._cur_tokens = 0
        self._cur_spans = []

    def close(self) -> None:
        self._finish()

    def manifest_entry(self, output_dir: Path) -> Dict[str, Any]:
        return {
            "num_documents": self.num_documents,
            "num_tokens": sum(f.num_tokens for f in self.files),
            "files": [
                {
                    "path": os.path.relpath(f.path, output_dir),
                    "metadata_path": os.path.relpath(f.metadata_path, output_dir),
                    "num_tokens": f.num_tokens,
                    "num_documents": f.num_documents,
                }
                for f in self.files
            ],
        }

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _validation_mask(num_documents: int, fraction: float, seed: int) -> np.ndarray:
    """Deterministic document-level split: exactly ``round(n * fraction)`` (at least 1 if the
    fraction is positive) documents, chosen by ``seed``."""
    mask = np.zeros(num_documents, dtype=bool)
    if fraction <= 0:
        return mask
    num_val = max(1, int(round(num_documents * fraction)))
    if num_val >= num_documents:
        raise PrepareDataError(
            f"validation_fraction {fraction} leaves no training documents out of {num_documents}; "
            "lower it or add data"
        )
    mask[np.random.default_rng(seed).choice(num_documents, size=num_val, replace=False)] = True
    return mask


def _write_splits(
    tokenized: "datasets.Dataset",
    val_mask: np.ndarray,
    output_dir: Path,
    dtype: Type[np.unsignedinteger],
    max_tokens_per_file: int,
    show_progress: bool,
) -> Dict[str, _ShardWriter]:
    from tqdm.auto import tqdm

    writers = {name: _ShardWriter(output_dir / name, dtype, max_tokens_per_file) for name in SPLITS}
    doc = 0
    try:
        bar = tqdm(total=len(tokenized), desc="Writing token files", disable=not show_progress)
        with bar:
            for batch in tokenized.with_format("arrow").iter(batch_size=_WRITE_BATCH_SIZE):
                ids = batch.column("input_ids").combine_chunks()
                lengths = ids.value_lengths().to_numpy().astype(np.int64)
                values = ids.flatten().to_numpy()
                is_val = val_mask[doc : doc + len(lengths)]
                if not is_val.any():
                    writers["train"].add(values, lengths)
                else:
                    tok_is_val = np.repeat(is_val, lengths)
                    writers["train"].add(values[~tok_is_val], lengths[~is_val])
                    writers["validation"].add(values[tok_is_val], lengths[is_val])
                doc += len(lengths)
                bar.update(len(lengths))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return writers


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def _manifest_to_prepared(manifest: Dict[str, Any], output_dir: Path, reused: bool) -> PreparedData:
    splits: Dict[str, SplitInfo] = {}
    for name, s in manifest["splits"].items():
        splits[name] = SplitInfo(
            name=name,
            num_documents=s["num_documents"],
            files=[
                TokenFileInfo(
                    path=str(output_dir / f["path"]),
                    metadata_path=str(output_dir / f["metadata_path"]),
                    num_tokens=f["num_tokens"],
                    num_documents=f["num_documents"],
                )
                for f in s["files"]
            ],
        )
    return PreparedData(
        output_dir=str(output_dir),
        dtype=manifest["dtype"],
        tokenizer=TokenizerConfig(**manifest["tokenizer"]),
        splits=splits,
        num_input_files=manifest["num_input_files"],
        num_skipped_empty=manifest["num_skipped_empty"],
        num_split_documents=manifest["num_split_documents"],
        fingerprint=manifest["fingerprint"],
        reused=reused,
    )


def _read_manifest(output_dir: Path) -> Optional[Dict[str, Any]]:
    path = output_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    version = (manifest.get("format"), manifest.get("format_version"))
    if version != (MANIFEST_FORMAT, MANIFEST_VERSION):
        return None
    return manifest


def _first_broken_file(prepared: PreparedData) -> Optional[str]:
    """The first listed token/metadata file that is missing or has the wrong size, else None."""
    item = np.dtype(prepared.dtype).itemsize
    for split in prepared.splits.values():
        for f in split.files:
            p, m = Path(f.path), Path(f.metadata_path)
            if not p.is_file() or p.stat().st_size != f.num_tokens * item:
                return str(p)
            if not m.is_file():
                return str(m)
    return None


def _files_intact(prepared: PreparedData) -> bool:
    return _first_broken_file(prepared) is None


def load_prepared_data(output_dir: PathLike) -> PreparedData:
    """Read the manifest of a finished :func:`prepare_data` run (e.g. from a training config)."""
    out = Path(output_dir)
    manifest = _read_manifest(out)
    if manifest is None:
        raise PrepareDataError(
            f"no valid {MANIFEST_NAME} in '{out}': run scripts/prepare_data.py first "
            "(a missing manifest also means an earlier run was interrupted)"
        )
    prepared = _manifest_to_prepared(manifest, out.resolve(), reused=True)
    if not _files_intact(prepared):
        raise PrepareDataError(
            f"token files listed in '{out / MANIFEST_NAME}' are missing or truncated"
        )
    return prepared


def _existing_outputs(output_dir: Path) -> List[Path]:
    found: List[Path] = []
    manifest = output_dir / MANIFEST_NAME
    if manifest.exists():
        found.append(manifest)
    for name in SPLITS:
        d = output_dir / name
        if d.is_dir():
            found.extend(
                p
                for p in sorted(d.iterdir())
                if fnmatch.fnmatch(p.name, "part-*.npy")
                or fnmatch.fnmatch(p.name, "part-*.csv.gz")
                or fnmatch.fnmatch(p.name, ".part-*.tmp-*")
            )
    found.extend(sorted(output_dir.glob(f".{MANIFEST_NAME}.tmp-*")))
    found.extend(sorted(output_dir.glob(".prepare-tmp-*")))
    if (output_dir / STDLIB_MARKER_NAME).exists():
        found.append(output_dir / STDLIB_MARKER_NAME)
    return found


def _remove_outputs(paths: Sequence[Path]) -> None:
    # Manifest first: from then on the directory no longer claims to be complete.
    for p in sorted(paths, key=lambda p: p.name != MANIFEST_NAME):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for d in {p.parent for p in paths if p.parent.name in SPLITS}:
        with contextlib.suppress(OSError):
            d.rmdir()  # only if now empty


@contextlib.contextmanager
def _dir_lock(output_dir: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``output_dir`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(output_dir / LOCK_NAME, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def prepare_data(config: PrepareDataConfig) -> PreparedData:
    """Tokenize ``config.inputs`` into OLMo-core token files under ``config.output_dir``.

    Idempotent: if ``output_dir`` already holds a complete run with the same inputs (path, size,
    mtime) and settings, it is returned as is (``reused=True``).
    """
    return _prepare_data(config, source=SOURCE_FILES)


def _prepare_data(config: PrepareDataConfig, *, source: str) -> PreparedData:
    """:func:`prepare_data`; ``source`` is recorded in the manifest. With ``SOURCE_STDLIB`` the
    directory is a cache: an earlier stdlib run there is replaced, anything else is an error."""
    config.validate()
    output_dir = Path(config.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise PrepareDataError(f"output directory {str(output_dir)!r} is an existing file; give a directory")
    files = resolve_input_files(
        config.inputs,
        extra_text_extensions=config.extra_text_extensions,
        treat_unknown_as_text=config.treat_unknown_as_text,
        exclude_dirs=[output_dir],
    )
    encoder, tok_config, tok_fingerprint = _resolve_tokenizer(config.tokenizer, config.add_bos)
    dtype = dtype_for_vocab_size(tok_config.vocab_size)

    settings = {
        "tokenizer": tok_fingerprint,
        "tokenizer_config": tok_config.as_dict(),
        "dtype": np.dtype(dtype).name,
        "text_field": config.text_field,
        "validation_fraction": config.validation_fraction,
        "seed": config.seed,
        "max_tokens_per_file": config.max_tokens_per_file,
    }
    inputs_record = []
    for p, kind in files:
        st = p.stat()
        inputs_record.append([str(p.resolve()), kind, st.st_size, st.st_mtime_ns])
    fingerprint = hashlib.sha256(
        json.dumps({"settings": settings, "inputs": inputs_record}, sort_keys=True).encode()
    ).hexdigest()

    # One run per directory at a time (e.g. every rank of a launch calling prepare_stdlib_corpus):
    # the second waits, then finds the first one's outputs up to date.
    output_dir.mkdir(parents=True, exist_ok=True)
    with _dir_lock(output_dir):
        reusable = _reuse_or_clear(output_dir, fingerprint, config.overwrite, source)
        if reusable is not None:
            return reusable
        marker = output_dir / STDLIB_MARKER_NAME
        if source == SOURCE_STDLIB:
            write_text_atomic(marker, "written by olmo_miras_plugin.data.prepare_stdlib_data\n")
        else:
            marker.unlink(missing_ok=True)

        num_proc = config.num_proc
        if num_proc is None:
            total_bytes = sum(r[2] for r in inputs_record)
            num_proc = (os.cpu_count() or 1) if total_bytes >= _AUTO_NUM_PROC_MIN_BYTES else 1
        with _progress_bars(config.show_progress), tempfile.TemporaryDirectory(
            prefix=".prepare-tmp-", dir=output_dir
        ) as cache_dir:
            writers, num_raw, num_docs = _tokenize_and_write(
                files, config, encoder, tok_config, dtype, output_dir, cache_dir, num_proc
            )

        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "source": source,
            "fingerprint": fingerprint,
            "dtype": np.dtype(dtype).name,
            "tokenizer": tok_config.as_dict(),
            "document_layout": (
                "[BOS] tokens [EOS]" if tok_config.bos_token_id is not None else "tokens [EOS]"
            ),
            "file_layout": "raw token ids in native byte order (little-endian on x86-64/ARM64), "
            "no header, as np.memmap writes them; metadata csv.gz lines are 'start,end' token "
            "offsets (end exclusive)",
            "settings": settings,
            "num_input_files": len(files),
            "num_raw_documents": num_raw,
            "num_skipped_empty": num_raw - num_docs,
            "num_split_documents": sum(w.num_split_documents for w in writers.values()),
            "splits": {
                name: w.manifest_entry(output_dir)
                for name, w in writers.items()
                if name == "train" or w.files
            },
            "inputs": [r[0] for r in inputs_record],
        }
        write_text_atomic(output_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")

    prepared = _manifest_to_prepared(manifest, output_dir.resolve(), reused=False)
    if prepared.num_split_documents:
        log.warning(
            f"{prepared.num_split_documents} document(s) exceeded max_tokens_per_file="
            f"{config.max_tokens_per_file} and were split over files; their boundaries are "
            "exact only in the .csv.gz metadata"
        )
    return prepared


def _reuse_or_clear(
    output_dir: Path, fingerprint: str, overwrite: bool, source: str = SOURCE_FILES
) -> Optional[PreparedData]:
    """The existing run if it matches ``fingerprint``; else clear it (``overwrite``, or a stdlib
    run replacing an earlier stdlib run) or fail."""
    existing = _existing_outputs(output_dir)
    if not existing:
        return None
    manifest = _read_manifest(output_dir)
    broken: Optional[str] = None
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        prepared = _manifest_to_prepared(manifest, output_dir.resolve(), reused=True)
        broken = _first_broken_file(prepared)
        if broken is None:
            log.info(f"Token files in '{output_dir}' are up to date; reusing them")
            return prepared
    if broken is not None:
        reason = (
            f"are incomplete: '{broken}' listed in its {MANIFEST_NAME} is missing or truncated"
        )
    elif manifest is not None:
        reason = "were made with other inputs or settings"
    else:
        reason = "are from an incomplete or unrecognized run (no valid manifest)"
    if source == SOURCE_STDLIB:
        if not _is_stdlib_cache(output_dir, manifest):
            raise PrepareDataError(
                f"output directory '{output_dir}' already holds token files of another corpus "
                "or run, not a stdlib corpus cache; refusing to delete them. Pick another "
                f"output directory (-o / output_dir) or remove '{output_dir}' first"
            )
    elif not overwrite:
        raise PrepareDataError(
            f"output directory '{output_dir}' already holds token files that {reason}; "
            "pass overwrite=True / --overwrite to replace them"
        )
    log.info(f"Removing {len(existing)} old output file(s) from '{output_dir}' (they {reason})")
    _remove_outputs(existing)
    return None


def _is_stdlib_cache(output_dir: Path, manifest: Optional[Dict[str, Any]]) -> bool:
    """Whether ``output_dir`` holds (possibly unfinished) outputs of :func:`prepare_stdlib_data`."""
    if manifest is None:
        return (output_dir / STDLIB_MARKER_NAME).is_file()
    if "source" in manifest:
        return manifest["source"] == SOURCE_STDLIB
    # Manifests from before "source" was recorded: a stdlib run iff every input is stdlib source.
    inputs = manifest.get("inputs") or []
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return bool(inputs) and all(Path(p).is_relative_to(root) for p in inputs)


def _tokenize_and_write(
    files: Sequence[Tuple[Path, str]],
    config: PrepareDataConfig,
    encoder: _Encoder,
    tok_config: TokenizerConfig,
    dtype: Type[np.unsignedinteger],
    output_dir: Path,
    cache_dir: str,
    num_proc: int,
) -> Tuple[Dict[str, _ShardWriter], int, int]:
    """Load -> tokenize (parallel ``datasets.map``) -> split -> shard. Returns the writers and the
    document counts before and after dropping empty documents."""
    map_num_proc = num_proc if num_proc > 1 else None
    docs = _load_documents(files, config, cache_dir, map_num_proc)
    tokenized = docs.with_format("arrow").map(
        _tokenize_table,
        batched=True,
        batch_size=_MAP_BATCH_SIZE,
        num_proc=map_num_proc if map_num_proc and len(docs) > _MAP_BATCH_SIZE else None,
        remove_columns=docs.column_names,
        fn_kwargs=dict(
            encoder=encoder,
            bos_token_id=tok_config.bos_token_id,
            eos_token_id=tok_config.eos_token_id,
            vocab_size=tok_config.vocab_size,
            dtype_name=np.dtype(dtype).name,
        ),
        desc="Tokenizing",
    )
    if len(tokenized) == 0:
        raise PrepareDataError(
            f"empty corpus: the {len(files)} input file(s) contain no non-empty documents "
            f"(first input: '{files[0][0]}')"
        )
    val_mask = _validation_mask(len(tokenized), config.validation_fraction, config.seed)
    writers = _write_splits(
        tokenized, val_mask, output_dir, dtype, config.max_tokens_per_file, config.show_progress
    )
    return writers, len(docs), len(tokenized)


def stdlib_source_files(
    *,
    max_bytes: Optional[int] = None,
    max_files: Optional[int] = None,
    include_tests: bool = False,
) -> List[Path]:
    """The installed Python standard library's ``*.py`` files: a real corpus on every machine.

    Sorted by path relative to the stdlib root; third-party ``site-packages``, ``__pycache__``,
    non-UTF-8 files and (unless ``include_tests``) test directories are left out. Files are taken
    in that order, skipping any that would overflow ``max_bytes``, until ``max_files``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise PrepareDataError(f"Python stdlib directory '{root}' not found")
    skip = set(_SKIP_DIR_NAMES)
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    candidates: List[Tuple[str, Path]] = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                candidates.append((p.relative_to(root).as_posix(), p))
    candidates.sort()

    out: List[Path] = []
    total = 0
    for _, p in candidates:
        if max_files is not None and len(out) >= max_files:
            break
        size = p.stat().st_size
        if size == 0 or (max_bytes is not None and total + size > max_bytes):
            continue
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append(p)
        total += size
    return out


def prepare_stdlib_data(
    output_dir: PathLike,
    *,
    max_bytes: Optional[int] = DEFAULT_STDLIB_MAX_BYTES,
    max_files: Optional[int] = None,
    include_tests: bool = False,
    tokenizer: str = BYTE_TOKENIZER,
    validation_fraction: float = 0.0,
    seed: int = 0,
    max_tokens_per_file: int = DEFAULT_MAX_TOKENS_PER_FILE,
    num_proc: Optional[int] = None,
    show_progress: bool = False,
) -> PreparedData:
    """Token files of the stdlib corpus (:func:`stdlib_source_files`), cached in ``output_dir``:
    a second call with the same settings and Python install only checks and returns them, one with
    other settings replaces them. If ``output_dir`` holds outputs of any other run (not from this
    function) it raises :class:`PrepareDataError` instead of deleting them."""
    files = stdlib_source_files(
        max_bytes=max_bytes, max_files=max_files, include_tests=include_tests
    )
    if not files:
        raise PrepareDataError(
            f"empty corpus: no stdlib files fit max_bytes={max_bytes}, max_files={max_files}"
        )
    return _prepare_data(
        PrepareDataConfig(
            inputs=[str(p) for p in files],
            output_dir=str(output_dir),
            tokenizer=tokenizer,
            validation_fraction=validation_fraction,
            seed=seed,
            max_tokens_per_file=max_tokens_per_file,
            num_proc=num_proc,
            show_progress=show_progress,
        ),
        # The directory is this function's cache: an earlier stdlib run there is replaced, but
        # any other outputs (another corpus's) are an error, never deleted.
        source=SOURCE_STDLIB,
    )


def prepare_stdlib_corpus(
    output_dir: PathLike,
    *,
    max_bytes: Optional[int] = DEFAULT_STDLIB_MAX_BYTES,
    max_files: Optional[int] = None,
    include_tests: bool = False,
    tokenizer: str = BYTE_TOKENIZER,
    validation_fraction: float = 0.0,
    seed: int = 0,
    max_tokens_per_file: int = DEFAULT_MAX_TOKENS_PER_FILE,
    num_proc: Optional[int] = None,
    show_progress: bool = False,
) -> List[str]:
    """Like :func:`prepare_stdlib_data` but returns just the train token file paths.

    Validation paths, dtype and tokenizer config: ``load_prepared_data(output_dir)``.
    """
    return prepare_stdlib_data(
        output_dir,
        max_bytes=max_bytes,
        max_files=max_files,
        include_tests=include_tests,
        tokenizer=tokenizer,
        validation_fraction=validation_fraction,
        seed=seed,
        max_tokens_per_file=max_tokens_per_file,
        num_proc=num_proc,
        show_progress=show_progress,
    ).train_paths

