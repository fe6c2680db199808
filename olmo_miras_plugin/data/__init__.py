"""Data preparation: local corpora -> OLMo-core token files (see :mod:`.prepare`)."""

from .prepare import (
    BYTE_TOKENIZER,
    DEFAULT_MAX_TOKENS_PER_FILE,
    DEFAULT_STDLIB_MAX_BYTES,
    MANIFEST_NAME,
    PrepareDataConfig,
    PrepareDataError,
    PreparedData,
    SplitInfo,
    TokenFileInfo,
    dtype_for_vocab_size,
    load_prepared_data,
    prepare_data,
    prepare_stdlib_corpus,
    prepare_stdlib_data,
    resolve_input_files,
    stdlib_source_files,
)

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
