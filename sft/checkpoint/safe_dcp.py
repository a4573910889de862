"""Reading a torch.distributed.checkpoint (DCP) folder without running code from it.

torch's `FileSystemReader.read_metadata` unpickles `dcp/.metadata` with plain `pickle.load`, and
`DefaultLoadPlanner.load_bytes` reads every non-tensor entry (optimizer hyper-parameters) with
`torch.load(weights_only=False)`: both run whatever code a planted file was built to run.
`SafeReader` unpickles the metadata with an allowlist of DCP's own metadata classes (plus torch
dtypes/layouts/Size and pathlib paths); `SafePlanner` reads byte entries with `weights_only=True`.
Tensor entries are already read by torch with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

try:  # where DCP's per-file record lives (torch >= 2.2)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError:  # pragma: no cover - older torch
    _StorageInfo = None

# (module, name) -> the object a pickle may reference; nothing here runs code when called.
_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "BytesStorageMetadata",
    "TensorStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
ALLOWED: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n)
    for n in _METADATA_CLASSES
    if hasattr(dcp_metadata, n)
}
ALLOWED[("torch", "Size")] = torch.Size
ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # str -> torch.layout lookup
if _StorageInfo is not None:
    ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
for _cls in (Path, PosixPath, WindowsPath, PurePosixPath, PureWindowsPath):  # StorageMeta.checkpoint_id
    ALLOWED[("pathlib", _cls.__name__)] = _cls
    ALLOWED[("pathlib._local", _cls.__name__)] = _cls  # where Python 3.13 defines them


class UnsafeFileError(ValueError):
    """A file would run code if it were read the way it asks to be read: refused, never unpickled."""


def why(exc: BaseException) -> str:
    """The global a weights_only load refused (`pickle refers to io.open`), else the error's first line."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found:
        return f"pickle refers to {found.group(1).rstrip('.,')}"
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
    return lines[0][:200]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeFileError(f"refers to {module}.{name}, which DCP metadata never contains")


def load_metadata(path: Path) -> dcp_metadata.Metadata:
    """Unpickle a DCP `.metadata` file with the allowlist; raises UnsafeFileError on anything else."""
    with open(path, "rb") as f:
        try:
            meta = _MetadataUnpickler(f).load()
        except UnsafeFileError as exc:
            raise UnsafeFileError(f"{path}: {exc}; not read (it would run code)") from None
    if not isinstance(meta, dcp_metadata.Metadata):
        raise UnsafeFileError(f"{path}: holds a {type(meta).__name__}, not DCP metadata")
    return meta


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by `load_metadata` instead of `pickle.load`."""

    refused: UnsafeFileError | None = None  # DCP turns a metadata error into an AssertionError of text: kept here

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        try:
            meta = load_metadata(Path(self.path) / name)
        except UnsafeFileError as exc:
            self.refused = exc
            raise
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return meta


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor entries with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(f"DCP entry {read_item.dest_index.fqn}: not plain data ({why(exc)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict, folder: Path, **kwargs: Any) -> None:
    """`dcp.load(state)` from `folder` with no pickle executed; kwargs go to dcp.load (process_group, no_dist)."""
    reader = SafeReader(str(folder))
    try:
        dcp_load(state, storage_reader=reader, planner=SafePlanner(), **kwargs)
    except BaseException:  # CheckpointException is a BaseException
        if reader.refused is not None:
            raise reader.refused from None
        raise
