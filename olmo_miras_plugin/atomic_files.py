"""Files written whole or not at all: a temporary file next to the target, fsync'd, then
``os.replace``. An interrupted run leaves the old file (or none), never half a file, and no
temporary behind."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Union

__all__ = ["tmp_path_for", "fsync_replace", "write_text_atomic"]


def tmp_path_for(path: Path) -> Path:
    """A fresh temporary name next to ``path``; hidden, and never ending in the target's suffix, so
    globs for finished files (``*.npy``, ``*.json``) can't pick it up."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


def fsync_replace(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk, then move it over ``final`` in one step."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_text_atomic(path: Union[str, Path], text: str, *, make_parents: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (``make_parents``: create missing folders first)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        tmp.write_text(text)
        fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
