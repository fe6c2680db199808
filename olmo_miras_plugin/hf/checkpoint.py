"""Reading OLMo-core distributed checkpoints on one CPU process without unpickling untrusted data.

OLMo-core's own readers (``load_model_and_optim_state``, ``unshard_checkpoint``) go through
``RemoteFileSystemReader``, which reads every tensor with ``torch.load(weights_only=False)`` and
the ``.metadata`` file with a plain ``pickle.load``: loading a checkpoint someone handed you would
run whatever code it contains. Here:

- ``.metadata`` (a pickle by design of ``torch.distributed.checkpoint``) is read by an unpickler
  that only resolves the handful of classes checkpoint metadata is made of (torch's DCP metadata
  dataclasses, ``torch.Size``, dtypes), and nothing else;
- tensors are read by torch's own ``FileSystemReader`` (``torch.load(weights_only=True)``), the
  same bytes OLMo-core's writer produced (OLMo-core's ``_StorageInfo`` entries map to torch's);
- before reading, the files the metadata points at are checked to exist and be long enough, so a
  truncated or half-copied checkpoint fails with a message naming the file, not deep in torch.

Only ``model.*`` keys are read (no optimizer state), straight into tensors allocated from the
metadata: the result is the unsharded OLMo-core model state dict, whatever the saving topology.
"""

from __future__ import annotations

import collections
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Set

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as _torch_fs
import torch.distributed.checkpoint.metadata as _dcp_metadata
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

__all__ = ["CheckpointError", "read_checkpoint_metadata", "read_model_state", "model_keys"]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or not what it was expected to be."""


_METADATA_CLASSES = {
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only what DCP metadata is made of; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and name in _METADATA_CLASSES:
            return getattr(_dcp_metadata, name)
        if name == "_StorageInfo" and module in (
            "torch.distributed.checkpoint.filesystem",
            "olmo_core.distributed.checkpoint.filesystem",
        ):
            return _torch_fs._StorageInfo  # same fields; torch's has an optional extra one
        if module == "torch":
            if name == "Size":
                return torch.Size
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never needs")


class _SafeReader(FileSystemReader):
    """torch's ``FileSystemReader`` (tensors via ``torch.load(weights_only=True)``) with the
    restricted metadata unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_checkpoint_metadata(self.path)


def read_checkpoint_metadata(dir: os.PathLike | str) -> Metadata:
    """The ``.metadata`` of a DCP checkpoint directory, read safely (see the module docstring)."""
    path = Path(dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"not an OLMo-core checkpoint: {path} doesn't exist")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to read checkpoint metadata: {e}") from e
    except Exception as e:  # truncated / garbage
        raise CheckpointError(f"{path} is corrupted (can't be read as checkpoint metadata: {e})") from e
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{path} is not torch.distributed.checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = _dcp_metadata.StorageMeta()
    return metadata


def model_keys(metadata: Metadata) -> Dict[str, TensorStorageMetadata]:
    """``{parameter name: its metadata}`` of the model tensors (``model.`` prefix removed)."""
    return {
        k[len("model.") :]: v
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }


def _check_storage_files(dir: Path, metadata: Metadata, keys: Set[str]) -> None:
    """Every byte range the wanted tensors live in must exist (clear error for partial copies)."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{dir}/.metadata has no storage index (corrupted checkpoint)")
    needed: Dict[str, int] = {}
    for index, info in storage.items():
        if getattr(index, "fqn", None) not in keys:
            continue
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"{dir}/.metadata points at an invalid data file {rel!r}")
        end = int(info.offset) + int(info.length)
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        path = dir / rel
        if not path.is_file():
            raise CheckpointError(f"incomplete checkpoint: data file {path} is missing")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(f"incomplete checkpoint: data file {path} is truncated ({size} bytes, needs {end})")


def read_model_state(dir: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """The unsharded model state dict of an OLMo-core ``model_and_optim`` directory, on CPU."""
    dir = Path(dir)
    metadata = read_checkpoint_metadata(dir)
    keys = model_keys(metadata)
    if not keys:
        raise CheckpointError(f"{dir} holds no model tensors (keys 'model.*')")
    _check_storage_files(dir, metadata, {f"model.{k}" for k in keys})
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in keys.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"model": state}, storage_reader=_SafeReader(dir), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"can't read the model tensors of {dir} (corrupted checkpoint?): {e}") from e
    return state
