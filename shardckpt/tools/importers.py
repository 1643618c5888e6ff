"""Moving tensors into shardckpt: torch.distributed.checkpoint (DCP) directories, torch.save files and
(sharded) safetensors. The CLI's `import` command calls import_checkpoint; one process, writing a new
checkpoint with shardckpt.save. Imports memory-map safetensors and torch.save files.

Nothing here unpickles untrusted data: safetensors headers are JSON validated before use; torch.save files
are read with weights_only=True; a DCP checkpoint's `.metadata` pickle goes through RestrictedUnpickler, which
only builds DCP's own metadata dataclasses, torch.Size, dtypes and paths (see DCP_ALLOWED), and its data
through DCP's FileSystemReader with a planner that unpickles BYTE_IO entries with weights_only=True.
"""
from __future__ import annotations

import json
import os
import pickle
import re

import torch

from shardckpt.api import save
from shardckpt.errors import CheckpointError, FormatError
from shardckpt.format.records import MANIFEST_NAME, Manifest
from shardckpt.tools.safetensors_layout import read_safetensors

# ------------------------------------------------------------------------------------------ safetensors in

def safetensors_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            obj = json.load(f)
        files = sorted(set(obj.get("weight_map", {}).values()))
        for name in files:
            if type(name) is not str or "/" in name or name.startswith("."):
                raise FormatError(f"weight_map names an odd file {name!r:.80}", file=index)
        return [os.path.join(src, n) for n in files]
    files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))
    if not files:
        raise FormatError("directory holds no .safetensors files", file=src)
    return files


# ------------------------------------------------------------------------------------------ DCP in

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file and nothing else: find_class resolves only the names in DCP_ALLOWED
    (DCP's metadata dataclasses and enums, torch.Size, torch dtypes, the layout helper torch.serialization
    uses, path classes, OrderedDict). Any other global raises, so a crafted file cannot call os.system &c."""

    def find_class(self, module, name):
        if (module, name) in DCP_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise FormatError(f"DCP metadata refers to {module}.{name}, which is not a DCP metadata type "
                          f"(refusing to unpickle it)")


DCP_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in
    ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch", "strided"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


def read_dcp_metadata(path: str):
    """DCP's Metadata of checkpoint directory `path`, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata
    if not os.path.isdir(path):
        raise FormatError("a DCP checkpoint is a directory (.metadata and *.distcp files)",
                          file=path) if os.path.exists(path) else FileNotFoundError(path)
    with open(os.path.join(path, ".metadata"), "rb") as f:
        try:
            md = RestrictedUnpickler(f).load()
        except FormatError as e:
            raise FormatError(e.message, file=os.path.join(path, ".metadata")) from None
        except Exception as e:  # truncated or not a pickle at all
            raise FormatError(f"not a DCP .metadata file ({type(e).__name__}: {e})",
                              file=os.path.join(path, ".metadata")) from None
    if not isinstance(md, Metadata):
        raise FormatError("not a DCP Metadata object", file=os.path.join(path, ".metadata"))
    return md


def load_dcp(path: str) -> dict:
    """A DCP checkpoint's state as a flat {fqn: tensor or object} dict (then nested back with DCP's own
    mapping when it saved one). Tensors are read by DCP's FileSystemReader (torch.load weights_only=True);
    BYTE_IO objects are unpickled with weights_only=True too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    md = read_dcp_metadata(path)

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md.storage_meta = md.storage_meta or StorageMeta()
            return md

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    state: dict = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            state[fqn] = None
        else:
            state[fqn] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
             no_dist=True)
    mapping = md.planner_data
    if isinstance(mapping, dict) and mapping and set(mapping) == set(state) and \
            all(isinstance(p, tuple) for p in mapping.values()):
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
        try:
            return unflatten_state_dict(state, mapping)
        except Exception:
            pass
    return state


# ------------------------------------------------------------------------------------------ import

def detect_source(src: str) -> str:
    """'dcp', 'safetensors', 'torch' or 'shardckpt' for a local path."""
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, ".metadata")):
            return "dcp"
        if os.path.exists(os.path.join(src, MANIFEST_NAME)):
            return "shardckpt"
        if safetensors_files(src):
            return "safetensors"
        raise FormatError("directory holds neither a DCP checkpoint (.metadata) nor safetensors files", file=src)
    if not os.path.exists(src):
        raise FileNotFoundError(src)
    if src.endswith(".safetensors"):
        return "safetensors"
    return "torch"


def import_checkpoint(src, dst, *, kind: str | None = None, codec: str = "auto", metadata: dict | None = None,
                      storage_options: dict | None = None) -> Manifest:
    """Convert a DCP directory, a torch.save file or safetensors file(s) (a file, or a folder with or without
    model.safetensors.index.json) at local path `src` into a new shardckpt checkpoint at `dst` (any URL).
    Plain values come along when they are JSON-like; others raise UnsupportedValueError."""
    src = os.fspath(src)
    kind = kind or detect_source(src)
    if kind == "dcp":
        state = load_dcp(src)
    elif kind == "safetensors":
        state, meta = {}, {}
        for f in safetensors_files(src):
            tensors, m = read_safetensors(f)
            dup = set(tensors) & set(state)
            if dup:
                raise FormatError(f"tensor {sorted(dup)[0]!r} appears in two safetensors files", file=f)
            state.update(tensors)
            meta.update(m)
    elif kind == "torch":
        state = load_torch_file(src)
        if isinstance(state, torch.Tensor):
            state = {"tensor": state}
    elif kind == "shardckpt":
        raise CheckpointError("the source is already a shardckpt checkpoint", file=src)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    info = {"imported_from": {"kind": kind, "source": os.path.abspath(src)}}
    return save(state, dst, codec=codec, metadata={**info, **(metadata or {})}, storage_options=storage_options)


def load_torch_file(src: str):
    """A torch.save file's object, loaded with weights_only=True (memory-mapped when it is a zip-format
    file). Raises FormatError naming the file when it is a directory, not a torch.save file, or holds an
    object weights_only refuses (the one global it names is quoted); FileNotFoundError when it is missing."""
    if os.path.isdir(src):
        raise FormatError("--kind torch reads one torch.save file, and this is a directory", file=src)
    try:
        return torch.load(src, map_location="cpu", weights_only=True, mmap=_is_zip(src))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        text = str(e)  # torch's message is a page of advice; the reason is after "WeightsUnpickler error:"
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
        why = " ".join((m.group(1) if m else text.strip().split("\n")[0] or type(e).__name__).split())
        raise FormatError(f"not a torch.save file that loads with weights_only=True (shardckpt never unpickles "
                          f"objects): {why[:300]}", file=src) from None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
