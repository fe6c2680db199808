"""Byte-level tokenizer for the offline tiny default and the synthetic evaluations.

Why bytes: every machine can tokenize any text with it, with no download and no vocabulary file,
so the tiny experiment, the data tools and the long-context tasks all run offline.
Token ids 0..255 are raw UTF-8 bytes; the special tokens follow.
"""

from __future__ import annotations

from typing import Iterable, List

from olmo_core.data import TokenizerConfig

__all__ = ["ByteTokenizer", "byte_tokenizer_config"]


class ByteTokenizer:
    """UTF-8 byte tokenizer with EOS / PAD / BOS ids after the 256 byte values."""

    eos_token_id: int = 256
    pad_token_id: int = 257
    bos_token_id: int = 258
    vocab_size: int = 259
    identifier: str = "olmo-miras/bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        if add_special_tokens:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend(f"<|{i}|>".encode())
            elif i >= self.vocab_size or i < 0:
                raise ValueError(f"token id {i} is outside the byte tokenizer's range [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")


def byte_tokenizer_config() -> TokenizerConfig:
    """OLMo-core :class:`TokenizerConfig` describing :class:`ByteTokenizer`."""
    tok = ByteTokenizer()
    return TokenizerConfig(
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        identifier=tok.identifier,
    )
