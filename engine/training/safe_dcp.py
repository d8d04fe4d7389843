"""Sharded checkpoints (``torch.distributed.checkpoint``, DCP) read without running pickled code.

torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle``, and its
``DefaultLoadPlanner`` loads the non-tensor entries of the shards with ``torch.load(weights_only=False)``:
a crafted folder runs any command it names. ``SafeReader`` unpickles ``.metadata`` with
``MetadataUnpickler``, which admits only the classes DCP's metadata is made of, and ``SafePlanner`` /
``SafeEmptyPlanner`` load the entries with ``weights_only=True`` (torch already loads tensor entries
so). A refused file raises ``UnsafePickleError`` naming it and the class.
"""

from __future__ import annotations

import builtins
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from .safe_load import UnsafePickleError, refused

__all__ = ["MetadataUnpickler", "SafeReader", "SafePlanner", "read_metadata", "load_sharded", "dcp_failure"]

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name ("torch.strided")
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "torch": {"Size", "device"},
    "collections": {"OrderedDict"},
}  # fmt: skip
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool"}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata``: DCP's metadata classes, plain data and dtypes; nothing else."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return OrderedDict if module == "collections" else getattr(__import__(module, fromlist=[name]), name)
        raise UnsafePickleError(f"it names {module}.{name}, which is not allowed (it could run code)")


class SafeReader(FileSystemReader):
    """torch's ``FileSystemReader`` with ``.metadata`` read by ``MetadataUnpickler``; it keeps the file
    it reads, so that a refused entry names its shard."""

    reading: Path | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"refusing {path}: {e}") from None
        except (OSError, RecursionError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
            raise ValueError(f"{path} is not a sharded checkpoint's metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise ValueError(f"{path} is not a sharded checkpoint's metadata (it holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file, sinfo):
        self.reading = Path(self.path) / sinfo.relative_path
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"refusing {self.reading}: {refused(e)}") from None


class _SafeBytes:
    def load_bytes(self, read_item, value) -> None:
        # DefaultLoadPlanner.load_bytes, with weights_only=True.
        obj = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafePlanner(_SafeBytes, DefaultLoadPlanner):
    """``DefaultLoadPlanner`` loading non-tensor entries with ``weights_only=True``."""


class SafeEmptyPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds a state dict from the metadata, loading with ``weights_only=True``."""


def dcp_failure(error: BaseException) -> BaseException:
    """The first process's own error inside DCP's ``CheckpointException`` (which gathers every rank's)."""
    if isinstance(error, CheckpointException) and error.failures:
        failure = next(iter(error.failures.values()))
        return failure[0] if isinstance(failure, tuple) else failure
    return error


def read_metadata(folder: str | Path) -> Metadata:
    """The ``Metadata`` of the DCP folder ``folder``, read safely."""
    return SafeReader(str(folder)).read_metadata()


def load_sharded(folder: str | Path, keys: set[str] | None = None, state: dict | None = None) -> dict:
    """Load a DCP folder safely: into ``state`` in place (a collective under a process group, resharded
    to its processes), or, without ``state``, entries ``keys`` as a new plain state dict in this process."""
    reader = SafeReader(str(folder))
    try:
        if state is None:
            state = {}
            no_dist = not (dist.is_available() and dist.is_initialized())
            _load_state_dict(state, reader, planner=SafeEmptyPlanner(keys=keys), no_dist=no_dist)
        else:
            dcp_load(state, storage_reader=reader, planner=SafePlanner())
    except CheckpointException as e:
        raise dcp_failure(e) from None
    return state
