"""A torch.distributed.checkpoint (DCP) drop-in: existing dcp.save / dcp.load code gets shardckpt's data path
(byte-plane zstd frames, crc32c on every frame, parallel per-rank files) and its atomic manifest-last commit
by passing one argument:

    dcp.save(state, storage_writer=shardckpt.dcp.Writer("ckpt/step-100"))
    dcp.load(state, storage_reader=shardckpt.dcp.Reader("ckpt/step-100"))

What lands on storage is an ordinary shardckpt checkpoint (manifest.json + data/<save_id>/r*.bin/.index.json,
docs/FORMAT.md), so shardckpt.load / load_full and every CLI command read it too. DCP's own metadata (its
version, planner_data, storage_meta, how BYTE_IO objects are stored) travels as JSON in the manifest's
user_metadata["dcp"]; nothing on the load path is pickle except what DCP's planner itself does with BYTE_IO
payloads. docs/FORMAT-dcp.md is the spec.

Call sequence (DCP drives it; "coordinator" is DCP's coordinator rank):
  save  0. all ranks: reset(checkpoint_id)   1. all: set_up_storage_writer
        2. all: prepare_local_plan (coordinator: a path that already holds a committed checkpoint is refused
           with overwrite=False, else marked for replacement)
        3. coordinator: prepare_global_plan (a fresh save_id for the save, each plan told its rank)
        4. all: write_data (encode + write this rank's data file and index under data/<save_id>/, durable on
           return; an older checkpoint's data/<old save_id>/ is never touched)
        5. coordinator: finish (check every rank's summary, then shardckpt.lifecycle.commit.commit_manifest: manifest.json
           created, or atomically replaced when overwriting; the replaced checkpoint's data is deleted only
           after the new manifest is durable)
  load  0. all: reset   1. all: read_metadata (manifest + every index, validated and crc-checked)
        2. all: set_up_storage_reader   3-4. plans pass through   5. all: read_data (only the needed frames)

Why one module of ~440 lines: DCP's StorageWriter and StorageReader are one contract (docs/FORMAT-dcp.md)
and share its record encoding; each class is the half of it DCP calls on one side.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import time
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, \
    WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from shardckpt.native import kernels as _ext
from shardckpt.lifecycle import commit
from shardckpt.lifecycle import deleter
from shardckpt.loading.load import read_chunks
from shardckpt.format.metadata import read_manifest
from shardckpt.format.codec import choose
from shardckpt.errors import CheckpointExistsError, FormatError, SaveError, UnsupportedValueError
from shardckpt.format.records import DEFAULT_FRAME_SIZE, MANIFEST_NAME, build_manifest, dtype_name
from shardckpt.plan.save_plan import WriteItem
from shardckpt.loading.reader import ReadStats, Target, plan_reads, run_reads
from shardckpt.storage import Storage, storage_for
from shardckpt.format.tree import decode_value, encode_value
from shardckpt.saving.writer import write_rank

DCP_FORMAT = "shardckpt-dcp"
DCP_FORMAT_VERSION = "1.1"
META_KEY = "dcp"  # user_metadata key holding the DCP record
# Python types a BYTE_IO value keeps through the typed JSON, which stores them as tuple / bytes (FORMAT-dcp.md,
# "py_types"); restored by Reader without unpickling anything.
PY_TYPES = {"torch.Size": torch.Size, "bytearray": bytearray}


def _ready(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class Writer(StorageWriter):
    """DCP StorageWriter writing a shardckpt checkpoint. One instance per rank, like FileSystemWriter.

    Args:
        path: checkpoint directory or fsspec URL (dcp.save's checkpoint_id overrides it when given).
        codec: "auto" (byte-plane zstd for floats), "zstd", "zstd-byteplane" or "raw".
        frame_size: raw bytes per independently decodable frame.
        storage_options: passed to fsspec for URLs.
        overwrite: what a save into a path that holds a committed checkpoint does. True (FileSystemWriter's
            default): replace it safely: the new data goes beside the old, manifest.json is replaced
            atomically (Storage.replace), and the old checkpoint's data is deleted only once the new manifest
            is durable, so a crash at any point leaves one of the two checkpoints loadable. False: refuse
            with CheckpointExistsError.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, codec: str = "auto",
                 frame_size: int = DEFAULT_FRAME_SIZE, storage_options: dict | None = None,
                 overwrite: bool = True):
        super().__init__()
        if frame_size <= 0 or frame_size % 8:
            raise ValueError("frame_size must be a positive multiple of 8")
        self.path = None if path is None else os.fspath(path)
        self.codec, self.frame_size, self.storage_options = codec, frame_size, storage_options
        self.overwrite = overwrite
        self.is_coordinator, self.rank = True, 0
        self.save_id = uuid.uuid4().hex  # as FileSystemWriter: known before the save (storage_meta())
        self._used = False      # self.save_id named a save's data already: the next save needs a new one
        self._replace = False   # coordinator: this save replaces a committed checkpoint

    def _storage(self) -> Storage:
        if self.path is None:
            raise ValueError("no checkpoint path: pass one to Writer() or dcp.save(checkpoint_id=...)")
        return storage_for(self.path, self.storage_options)

    @property
    def checkpoint_id(self):
        return self.path

    def reset(self, checkpoint_id=None) -> None:
        """All ranks, before each save that names a checkpoint_id (DCP skips it otherwise)."""
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id, self._used, self._replace = uuid.uuid4().hex, False, False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """All ranks: learn this instance's role."""
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0
        if kwargs.get("use_collectives", True) is False:
            raise UnsupportedValueError("shardckpt.integrations.dcp.Writer needs DCP's collectives (use_collectives=True): "
                                        "the manifest is one commit for all ranks")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """All ranks: refuse dtypes the format lacks. Coordinator: a committed checkpoint at the path is
        refused (overwrite=False) or will be replaced at commit (overwrite=True)."""
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                dtype_name(item.tensor_data.properties.dtype)
        if self.is_coordinator:
            storage = self._storage()
            self._replace = storage.exists(MANIFEST_NAME)
            if self._replace and not self.overwrite:
                raise CheckpointExistsError("a committed checkpoint already exists here and overwrite=False; "
                                            "save to a new path or pass overwrite=True", file=storage.url)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator only: one save_id for the whole save (a fresh one for each save of this instance, so
        a save never writes into the data directory of the checkpoint it replaces); each plan learns its
        rank (= its file)."""
        if self._used:
            self.save_id = uuid.uuid4().hex
        self._used = True
        return [dataclasses.replace(p, storage_data={"save_id": self.save_id, "rank": i})
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        """All ranks: encode this rank's tensors into its data file (frames + crc32c) and write its index;
        BYTE_IO objects travel to the coordinator in the WriteResults (they end up in the manifest)."""
        info = plan.storage_data
        save_id, rank = info["save_id"], info["rank"]
        self.save_id, self._used = save_id, True
        items, sources, results = [], [], []
        for wi in plan.items:
            if wi.type == WriteItemType.BYTE_IO:
                data = planner.resolve_data(wi)
                value, kind, marks = _encode_bytes(data.getvalue(), wi.index.fqn)
                results.append(WriteResult(wi.index, len(data.getbuffer()),
                                           {"rank": rank, "value": (value, kind), "py_types": marks}))
                continue
            td = wi.tensor_data
            t = planner.resolve_data(wi).detach()
            sizes = tuple(td.chunk.sizes)
            if tuple(t.shape) != sizes:
                raise SaveError(f"planner resolved a tensor of shape {tuple(t.shape)} for a chunk of {sizes}",
                                key=wi.index.fqn, rank=rank)
            if t.device.type != "cpu" or not t.is_contiguous():
                t = t.to("cpu", memory_format=torch.contiguous_format).contiguous()
            items.append(WriteItem(wi.index.fqn, tuple(td.chunk.offsets), sizes, choose(self.codec, t.dtype), t))
            sources.append(t)
            results.append(WriteResult(wi.index, t.numel() * t.element_size(), {"rank": rank}))
        files = write_rank(self._storage(), save_id, rank, items, sources, self.frame_size)
        if files is not None:
            first = next(r for r in results if "value" not in r.storage_data)
            first.storage_data["files"] = vars(files)
        return _ready(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator only: check the ranks' summaries against DCP's metadata, then commit manifest.json
        through shardckpt.lifecycle.commit (create-only, or an atomic replace when overwriting). Until this returns
        the checkpoint does not exist for any reader; on any failure the typed error says whether anything
        was committed, and a replaced checkpoint stays loadable."""
        storage = self._storage()
        save_id = self.save_id
        files, values, value_kinds, py_types, written = [], {}, {}, {}, 0
        for rank_results in results:
            for r in rank_results:
                sd = r.storage_data
                if "value" in sd:
                    values[r.index.fqn], value_kinds[r.index.fqn] = sd["value"]
                    if sd.get("py_types"):
                        py_types[r.index.fqn] = sd["py_types"]
                if "files" in sd:
                    files.append(commit.file_entry(save_id, sd["rank"], sd["files"]))
                    written += sd["files"]["elements"]
        tensors, tree_items, total = {}, [], 0
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                tensors[fqn] = {"dtype": dtype_name(md.properties.dtype), "shape": list(md.size), "layout": None}
                total += math.prod(md.size)
                tree_items.append([fqn, {"t": "tensor", "key": fqn}])
            elif fqn in values:
                tree_items.append([fqn, {"t": "value", "key": fqn}])
        problem = commit.check_written(written, total, "DCP's metadata holds")
        if problem:
            deleter.drop_uncommitted(storage, save_id)  # no manifest was written: nothing refers to it
            raise SaveError(f"{problem}; nothing committed", file=storage.url)
        record = {"format": DCP_FORMAT, "format_version": DCP_FORMAT_VERSION, "dcp_version": metadata.version,
                  "values": value_kinds, "planner_data": _encode_optional(metadata.planner_data),
                  "storage_meta": _storage_meta_json(self.storage_meta())}
        if py_types:
            record["py_types"] = py_types
        world = max([len(results)] + [f["rank"] + 1 for f in files])
        manifest = build_manifest(save_id=save_id, created=time.time(), world_size=world,
                                  frame_size=self.frame_size, tree={"t": "dict", "items": tree_items},
                                  tensors=tensors, values=values, files=sorted(files, key=lambda f: f["rank"]),
                                  user_metadata={META_KEY: record}, backend=_ext.BACKEND)
        outcome = commit.commit_manifest(storage, manifest, save_id, has_files=bool(files),
                                         replace=self._replace, cleanup=True)
        if not outcome.committed and self._replace and outcome.exists:
            # the manifest read back is the checkpoint this save was replacing: it is intact, not a rival's
            outcome = dataclasses.replace(outcome, exists=False,
                                          message=f"{outcome.message}; the previous checkpoint is kept")
        commit.raise_for(outcome, storage)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _encode_bytes(payload: bytes, fqn: str) -> tuple[dict, str, list]:
    """A BYTE_IO payload (torch.save of a Python object, made by this process) as a manifest value: the
    object itself as typed JSON when it is JSON-like ("value"), else the raw bytes ("torch_save"). The list
    marks where a PY_TYPES value sits in the object (its typed JSON keeps only tuple / bytes)."""
    try:
        obj = torch.load(io.BytesIO(payload), weights_only=True)
        return encode_value(obj, fqn), "value", _type_marks(obj)
    except Exception:
        return encode_value(payload, fqn), "torch_save", []


def _type_marks(obj, path: tuple = (), depth: int = 0) -> list:
    """[[*path, type name], ...] for every torch.Size / bytearray inside a JSON-like object; a path is the
    list indexes and dict keys leading to it ([] for the object itself)."""
    if depth > 64:
        return []
    if isinstance(obj, torch.Size):
        return [[*path, "torch.Size"]]
    if isinstance(obj, bytearray):
        return [[*path, "bytearray"]]
    if isinstance(obj, (list, tuple)):
        return [m for i, x in enumerate(obj) for m in _type_marks(x, (*path, i), depth + 1)]
    if isinstance(obj, dict):
        return [m for k, x in obj.items() for m in _type_marks(x, (*path, k), depth + 1)]
    return []


def _restore_types(obj, marks: list, fqn: str):
    """Inverse of _type_marks on a decoded value: the marked tuples become torch.Size and the marked bytes
    bytearray. A mark that does not fit the value (wrong path or payload) is a FormatError."""
    for mark in marks:
        if type(mark) is not list or not mark or mark[-1] not in PY_TYPES:
            raise FormatError(f"py_types entry {mark!r:.80} is not [path..., type]", key=fqn)
        obj = _retype(obj, mark[:-1], mark[-1], fqn)
    return obj


def _retype(obj, path: list, name: str, fqn: str):
    if path:
        k = path[0]
        if isinstance(obj, (list, tuple)) and type(k) is int and 0 <= k < len(obj):
            items = list(obj)
            items[k] = _retype(items[k], path[1:], name, fqn)
            return tuple(items) if isinstance(obj, tuple) else items
        if isinstance(obj, dict) and k in obj:
            return {**obj, k: _retype(obj[k], path[1:], name, fqn)}
        raise FormatError(f"py_types path {path!r:.80} does not lead into the value", key=fqn)
    if name == "torch.Size" and type(obj) is tuple and all(type(x) is int and x >= 0 for x in obj):
        return torch.Size(obj)
    if name == "bytearray" and type(obj) is bytes:
        return bytearray(obj)
    raise FormatError(f"py_types says {name}, but the value is a {type(obj).__name__}", key=fqn)


def _encode_optional(obj):
    if obj is None:
        return None
    try:
        return encode_value(obj, "planner_data")
    except UnsupportedValueError:
        return None  # a custom planner's private data; DCP's default planners need none on load


def _storage_meta_json(sm: StorageMeta | None):
    if sm is None:
        return None
    return {"checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "modules": list(sm.modules or [])}


class Reader(StorageReader):
    """DCP StorageReader over a shardckpt checkpoint (one written by Writer, or by shardckpt.save: its keys
    are then the flattened fqns and its plain values come back as BYTE_IO objects).

    Args:
        path: checkpoint directory or fsspec URL (dcp.load's checkpoint_id overrides it when given).
        storage_options: passed to fsspec for URLs.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, storage_options: dict | None = None):
        super().__init__()
        self.path = None if path is None else os.fspath(path)
        self.storage_options = storage_options
        self._storage = self._manifest = self._chunks = None
        self.stats = ReadStats()
        self.load_id = str(uuid.uuid4())  # as FileSystemReader: names this load in Metadata.storage_meta

    @property
    def checkpoint_id(self):
        return self.path

    def reset(self, checkpoint_id=None) -> None:
        """All ranks, before each load that names a checkpoint_id (DCP skips it otherwise)."""
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._storage = self._manifest = self._chunks = None
        self.stats = ReadStats()
        self.load_id = str(uuid.uuid4())

    def _open(self) -> None:
        if self._manifest is None:
            if self.path is None:
                raise ValueError("no checkpoint path: pass one to Reader() or dcp.load(checkpoint_id=...)")
            self._storage = storage_for(self.path, self.storage_options)
            self._manifest = read_manifest(self._storage)
            by_key = read_chunks(self._storage, self._manifest)
            self._chunks = {(k, tuple(c.offsets)): c for k, cs in by_key.items() for c in cs}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """All ranks: DCP's Metadata rebuilt from the manifest, the chunk indexes and the JSON DCP record."""
        self._open()
        m = self._manifest
        record = m.user_metadata.get(META_KEY) if isinstance(m.user_metadata.get(META_KEY), dict) else {}
        if record and (record.get("format") != DCP_FORMAT or
                       str(record.get("format_version", "")).split(".")[0] != DCP_FORMAT_VERSION.split(".")[0]):
            raise FormatError(f"user_metadata[{META_KEY!r}] is not a {DCP_FORMAT} {DCP_FORMAT_VERSION.split('.')[0]}.x "
                              f"record", file=self._storage.url)
        sdm: dict = {}
        chunks: dict[str, list] = {k: [] for k in m.tensors}
        for (k, off), c in self._chunks.items():
            chunks[k].append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(c.sizes)))
        for k, t in m.tensors.items():
            sdm[k] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), torch.Size(t.shape),
                                           sorted(chunks[k], key=lambda c: tuple(c.offsets)))
        for k in m.values:
            sdm[k] = BytesStorageMetadata()
        planner_data = record.get("planner_data")
        planner_data = decode_value(planner_data) if isinstance(planner_data, dict) and "t" in planner_data \
            else None
        sm = record.get("storage_meta") or {}
        storage_data = {MetadataIndex(k, off): c.file for (k, off), c in self._chunks.items()}
        return Metadata(state_dict_metadata=sdm, planner_data=planner_data, storage_data=storage_data,
                        storage_meta=StorageMeta(checkpoint_id=sm.get("checkpoint_id"), save_id=sm.get("save_id"),
                                                 modules=list(sm.get("modules") or []), load_id=self.load_id),
                        version=record.get("dcp_version"))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """All ranks: make sure the chunk table is here (DCP normally called read_metadata first)."""
        self._open()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        """All ranks: read the frames holding each requested box (in file order, in parallel, verified),
        copy into the planner's tensors, then commit them; BYTE_IO objects go to planner.load_bytes."""
        self._open()
        m = self._manifest
        record = m.user_metadata.get(META_KEY) if isinstance(m.user_metadata.get(META_KEY), dict) else {}
        kinds, py_types = record.get("values", {}), record.get("py_types", {})
        if not isinstance(py_types, dict):
            raise FormatError(f"user_metadata[{META_KEY!r}].py_types is not an object", file=self._storage.url)
        tasks, dests = [], []
        for req in plan.items:
            fqn = req.storage_index.fqn
            if req.type == LoadItemType.BYTE_IO:
                marks = py_types.get(fqn) or []
                if not isinstance(marks, list):
                    raise FormatError("py_types entry is not a list", key=fqn, file=self._storage.url)
                payload = _decode_bytes(m.values[fqn], kinds.get(fqn, "value"), marks, fqn)
                planner.load_bytes(req, io.BytesIO(payload))
                continue
            chunk = self._chunks.get((fqn, tuple(req.storage_index.offset)))
            if chunk is None:
                raise FormatError(f"no chunk at offsets {list(req.storage_index.offset)}", key=fqn,
                                  file=self._storage.url)
            dest = planner.resolve_tensor(req).detach()
            if tuple(dest.shape) != tuple(req.lengths):
                raise FormatError(f"planner resolved shape {tuple(dest.shape)} for a read of {tuple(req.lengths)}",
                                  key=fqn)
            offsets = tuple(o + s for o, s in zip(chunk.offsets, req.storage_offsets))
            target = Target(fqn, offsets, tuple(req.lengths), dest)
            if dest.numel() or not dest.dim():
                tasks += plan_reads([target], m, {fqn: [chunk]})
            dests.append((req, dest))
        tasks.sort(key=lambda t: (t.chunk.file, t.chunk.frames[0].offset if t.chunk.frames else 0, t.row_lo))
        run_reads(self._storage, m, tasks, self.stats)
        for req, dest in dests:
            planner.commit_tensor(req, dest)
        return _ready(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        try:
            return storage_for(checkpoint_id).exists(MANIFEST_NAME)
        except Exception:
            return False


def _decode_bytes(value: dict, kind: str, marks: list, fqn: str) -> bytes:
    """The BYTE_IO payload DCP's planner expects (a torch.save stream). JSON-like objects are re-serialised
    here from the validated manifest value, torch.Size / bytearray restored where `marks` say; "torch_save"
    payloads are handed over as stored."""
    obj = decode_value(value)
    if kind == "torch_save" and isinstance(obj, bytes):
        return obj
    obj = _restore_types(obj, marks, fqn)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
