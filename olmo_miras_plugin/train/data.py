"""The offline corpus of the tiny experiment as an OLMo-core dataset config.

Why a subclass: the token files of the stdlib corpus don't exist until
:func:`~olmo_miras_plugin.data.prepare_stdlib_data` writes them, so their paths can't be written
into the config. This config names the corpus instead (directory and size) and prepares it in
``build()`` (cached: a second build only checks the files), then builds OLMo-core's
``NumpyFSLDataset`` over the train split. A dry run never builds it, so it writes nothing.
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from olmo_core.data import NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.data.numpy_dataset import NumpyDatasetBase
from olmo_core.distributed.utils import barrier, get_fs_local_rank
from olmo_core.exceptions import OLMoConfigurationError

from ..data import DEFAULT_STDLIB_MAX_BYTES, load_prepared_data, prepare_stdlib_data
from ..tokenizer import byte_tokenizer_config

__all__ = ["StdlibFSLDatasetConfig"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StdlibFSLDatasetConfig(NumpyFSLDatasetConfig):
    """OLMo-core FSL dataset over the installed Python stdlib, tokenized byte-level on first use."""

    tokenizer: TokenizerConfig = field(default_factory=byte_tokenizer_config)
    data_dir: str = "runs/data/stdlib"
    """Where the token files go (reused when present and made with the same settings)."""
    max_bytes: Optional[int] = DEFAULT_STDLIB_MAX_BYTES
    """Size of the corpus in source bytes (≈ tokens)."""
    validation_fraction: float = 0.0
    split: str = "train"

    def validate(self) -> None:
        super().validate()
        if self.paths is not None or self.mix is not None:
            raise OLMoConfigurationError("StdlibFSLDatasetConfig finds its own files; don't set 'paths' or 'mix'")
        if self.tokenizer.vocab_size != byte_tokenizer_config().vocab_size:
            raise OLMoConfigurationError(
                f"the stdlib corpus is byte-level (vocab 259), got tokenizer vocab {self.tokenizer.vocab_size}"
            )

    def build(self) -> NumpyDatasetBase:
        self.validate()
        if get_fs_local_rank() == 0:
            prepared = prepare_stdlib_data(
                self.data_dir, max_bytes=self.max_bytes, validation_fraction=self.validation_fraction
            )
            log.info(prepared.summary())
        barrier()
        prepared = load_prepared_data(self.data_dir)
        if self.split not in prepared.splits or not prepared.splits[self.split].files:
            raise OLMoConfigurationError(f"stdlib corpus in '{self.data_dir}' has no '{self.split}' split")
        resolved = NumpyFSLDatasetConfig(
            **{
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(NumpyFSLDatasetConfig)},
                "paths": prepared.splits[self.split].paths,
                "dtype": prepared.dataset_dtype,
                "tokenizer": prepared.tokenizer,
            }
        )
        return resolved.build()
