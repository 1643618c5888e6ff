"""Storage on any fsspec URL: s3://, gs://, az://, memory://, file://, ... Object stores have no rename and no
directories, so this backend never moves files: data files are uploaded in place (S3: parallel multipart
upload, complete on close, in s3.py; other writers in fsspec_writers.py), and the manifest is committed by
one create-only write (create_only.py says how on each store, and on which ones two concurrent committers
cannot both win).

Listings are never cached (use_listings_cache=False is forced): ranks on other hosts write and delete the files
this process lists and polls, and a stale exists() on a manifest would hide or fake a commit.
"""
from __future__ import annotations

import bisect
import datetime
import posixpath
from typing import Sequence

import fsspec

from shardckpt.errors import CheckpointExistsError, StorageError
from shardckpt.storage.base import FileWriter, ReadRange, Storage, storage_error
from shardckpt.storage.create_only import create_only, store_kind
from shardckpt.storage.fsspec_writers import BufferedWriter, StreamWriter
from shardckpt.storage.local import LocalStorage, fsync_dir
from shardckpt.storage.s3 import (DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY, MAX_PART_SIZE, MIN_PART_SIZE,
    S3MultipartWriter, is_invalid_range, s3_options)

MANIFEST_NAME = "manifest.json"  # deleted first by delete_tree (see docs/FORMAT.md)
_COALESCE_GAP = 1 << 20          # read the hole between two ranges rather than issue another request
_MAX_REQUEST = 32 << 20          # split bigger reads so one large range is still fetched in parallel
_MAX_BATCH = 256 << 20           # bytes fetched per cat_ranges call: bounds memory beyond `dest`


class FsspecStorage(Storage):
    """Storage rooted at an fsspec URL. `storage_options` go to the filesystem (credentials, endpoint_url via
    client_kwargs, ...); anything not given comes from the usual environment (AWS_*, GOOGLE_*, ...).

    Args:
        url: e.g. "s3://bucket/run-1", "memory://ckpt", "gs://bucket/prefix".
        storage_options: keyword arguments for the fsspec filesystem.
        part_size: S3 multipart part size in bytes (>= 5 MiB); also the block size of other writers.
        upload_concurrency: parts in flight per S3 writer.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, part_size: int = DEFAULT_PART_SIZE,
                 upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY, _fs=None, _root: str | None = None):
        if part_size < MIN_PART_SIZE or part_size > MAX_PART_SIZE:
            raise ValueError(f"part_size must be in [{MIN_PART_SIZE}, {MAX_PART_SIZE}], got {part_size}")
        if upload_concurrency < 1:
            raise ValueError(f"upload_concurrency must be >= 1, got {upload_concurrency}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        if _fs is None:
            options = dict(self.storage_options)
            options["use_listings_cache"] = False
            if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
                options = s3_options(options)
            try:
                _fs, _root = fsspec.core.url_to_fs(url, **options)
            except Exception as e:
                raise storage_error(e, "open filesystem", url) from e
        self.fs = _fs
        self.root = _root.rstrip("/") if _root not in ("/", "") else _root
        self._kind = store_kind(_fs)  # "s3", "gcs", "azure", "memory", "local" or "other"

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    @property
    def settles_on_error(self) -> bool:
        """Storage.settles_on_error: in-process filesystems (file://, memory://) have nothing in flight
        after a call returned; a remote store's timed-out request may still land."""
        return self._kind in ("local", "memory")

    # paths ------------------------------------------------------------------------------------------------
    def _path(self, relpath: str) -> str:
        relpath = relpath.strip("/")
        if not relpath:
            return self.root
        return f"{self.root.rstrip('/')}/{relpath}"

    def _url(self, relpath: str) -> str:
        relpath = relpath.strip("/")
        return f"{self.url}/{relpath}" if relpath else self.url

    def _rel(self, path: str) -> str:
        """A filesystem path below the root, relative to the root."""
        root = self.root.rstrip("/")
        path = path.rstrip("/")
        if not root:
            return path.lstrip("/")
        return path[len(root):].lstrip("/") if path.startswith(root + "/") else path

    # Storage ----------------------------------------------------------------------------------------------
    def child(self, relpath: str) -> "FsspecStorage":
        """A Storage rooted at `relpath` sharing this filesystem (the manager's step-<N> directories)."""
        return FsspecStorage(self._url(relpath), self.storage_options, part_size=self.part_size,
                             upload_concurrency=self.upload_concurrency, _fs=self.fs, _root=self._path(relpath))

    def open_write(self, relpath: str) -> FileWriter:
        """Create or replace a file; the object appears complete on close(), never partial on S3/memory.
        Called by every rank for its own data files during a save (and by write_file for index files)."""
        path, url = self._path(relpath), self._url(relpath)
        if self._kind == "s3":
            return S3MultipartWriter(self.fs, path, url, self.part_size, self.upload_concurrency)
        if self._kind == "memory":
            return BufferedWriter(self.fs, path, url)
        return StreamWriter(self.fs, path, url, self.part_size, local=self._kind == "local")

    def commit(self, relpath: str, data: bytes) -> None:
        """Create `relpath` with `data` if and only if it does not exist: temp file and link(2) on a local
        filesystem (LocalStorage.commit), one create-only write elsewhere (create_only.py says how, per
        store). Raises CheckpointExistsError if it exists, StorageError if the store fails. Called by the
        coordinator once per save, as its very last step: this is the commit point."""
        path, url = self._path(relpath), self._url(relpath)
        data = bytes(data)
        if self._kind == "local":
            LocalStorage(posixpath.dirname(path)).commit(posixpath.basename(path), data)
            return
        try:
            create_only(self.fs, self._kind, path, data)
        except FileExistsError:
            raise CheckpointExistsError("a committed manifest already exists", file=url) from None
        except Exception as e:
            raise storage_error(e, "commit", url) from e

    def replace(self, relpath: str, data: bytes) -> None:
        """Put `data` at `relpath` over whatever is there: one whole-object write (a single PUT on object
        stores, which readers see whole or not at all; file:// goes through LocalStorage.replace). Called
        only by shardckpt.lifecycle.commit.commit_manifest, on the coordinator, when a save overwrites a checkpoint."""
        path, url = self._path(relpath), self._url(relpath)
        try:
            if self._kind == "local":
                LocalStorage(posixpath.dirname(path)).replace(posixpath.basename(path), bytes(data))
            else:
                self.fs.pipe_file(path, bytes(data))
        except StorageError:
            raise
        except Exception as e:
            raise storage_error(e, "replace", url) from e

    def read_file(self, relpath: str) -> bytes:
        """Read a whole file in one request. Raises FileNotFoundError if absent. Called by every loader for
        the manifest and index files (and by the manager to find committed checkpoints)."""
        url = self._url(relpath)
        try:
            return bytes(self.fs.cat_file(self._path(relpath)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None
        except Exception as e:
            raise storage_error(e, "read", url) from e

    def read_ranges(self, relpath: str, ranges: Sequence[ReadRange], dest) -> None:
        """Fill `dest` with byte ranges of one file. Nearby ranges are merged into one request and big ones
        split so they are still fetched in parallel; the requests go out in one cat_ranges call (one per
        _MAX_BATCH bytes, which bounds the memory held besides `dest`). Raises StorageError naming the file
        if it is missing or shorter than a range. Called by every loader for the frames it needs."""
        path, url = self._path(relpath), self._url(relpath)
        dest = memoryview(dest).cast("B")
        wanted = sorted((r for r in ranges if r.length > 0), key=lambda r: r.offset)
        for r in wanted:
            if r.offset < 0 or r.dest_offset < 0 or r.dest_offset + r.length > dest.nbytes:
                raise ValueError(f"range {r} does not fit a destination of {dest.nbytes} bytes")
        if not wanted:
            return
        # Merge ranges into segments [start, end), then split segments into requests of <= _MAX_REQUEST.
        segments: list[list[int]] = []
        for r in wanted:
            if segments and r.offset <= segments[-1][1] + _COALESCE_GAP:
                segments[-1][1] = max(segments[-1][1], r.offset + r.length)
            else:
                segments.append([r.offset, r.offset + r.length])
        requests = [(s, min(s + _MAX_REQUEST, end)) for start, end in segments
                    for s in range(start, end, _MAX_REQUEST)]
        # Which ranges each request serves (requests are sorted and disjoint; a range may span several).
        starts = [s for s, _ in requests]
        served: list[list[ReadRange]] = [[] for _ in requests]
        for r in wanted:
            i = bisect.bisect_right(starts, r.offset) - 1
            while i < len(requests) and requests[i][0] < r.offset + r.length:
                served[i].append(r)
                i += 1
        first = 0
        while first < len(requests):
            last, batch_bytes = first, 0
            while last < len(requests) and (last == first or batch_bytes < _MAX_BATCH):
                batch_bytes += requests[last][1] - requests[last][0]
                last += 1
            batch = requests[first:last]
            try:
                blobs = self.fs.cat_ranges([path] * len(batch), [s for s, _ in batch], [e for _, e in batch],
                                           on_error="return")
            except Exception as e:
                raise storage_error(e, "read", url) from e
            for i, ((start, end), blob) in enumerate(zip(batch, blobs), start=first):
                _check_blob(blob, start, end, url)
                view = memoryview(blob)
                for r in served[i]:
                    lo, hi = max(start, r.offset), min(end, r.offset + r.length)
                    out = r.dest_offset + lo - r.offset
                    dest[out:out + hi - lo] = view[lo - start:hi - start]
            first = last

    def exists(self, relpath: str) -> bool:
        """Whether a file (or a non-empty directory prefix) exists; always asks the store, never a cache.
        Called by the manager and loaders to find committed manifests."""
        try:
            return bool(self.fs.exists(self._path(relpath)))
        except Exception as e:
            raise storage_error(e, "exists", self._url(relpath)) from e

    def size(self, relpath: str) -> int:
        """Size of a file in bytes; FileNotFoundError if absent. Called by the CLI (verify, ls) and loaders."""
        url = self._url(relpath)
        try:
            return int(self.fs.size(self._path(relpath)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None
        except Exception as e:
            raise storage_error(e, "size", url) from e

    def list_dir(self, relpath: str = "") -> list[str]:
        """Names of entries directly below a directory; [] if absent. Called by the manager (steps) and CLI."""
        path = self._path(relpath)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as e:
            raise storage_error(e, "list", self._url(relpath)) from e
        strip = path.rstrip("/")
        names = {posixpath.basename(str(p).rstrip("/")) for p in entries if str(p).rstrip("/") != strip}
        return sorted(n for n in names if n)

    def list_files(self, relpath: str = "") -> list[str]:
        """Paths of every file below a directory, relative to this storage's root (like LocalStorage);
        [] if absent. Called by the manager and CLI (gc, verify)."""
        path = self._path(relpath)
        try:
            found = self.fs.find(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as e:
            raise storage_error(e, "list", self._url(relpath)) from e
        strip = path.rstrip("/")
        return sorted(self._rel(p) for p in found if p.rstrip("/") != strip and not p.endswith("/"))

    def mtime(self, relpath: str) -> float | None:
        """Last modification time from fs.info() (each filesystem names it differently), or None if absent
        or not given (S3 directory prefixes have none). Called by gc (shardckpt.deleter) to spare fresh saves."""
        try:
            info = self.fs.info(self._path(relpath))
        except Exception:
            return None
        for k in ("mtime", "LastModified", "last_modified", "updated", "created", "time_created"):
            v = info.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            if isinstance(v, datetime.datetime):
                return v.timestamp()
            if v is not None:
                try:
                    return datetime.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
        return None

    def delete(self, relpath: str) -> None:
        """Delete one file if present. Retention and gc only (coordinator)."""
        try:
            self.fs.rm_file(self._path(relpath))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise storage_error(e, "delete", self._url(relpath)) from e

    def delete_tree(self, relpath: str = "") -> None:
        """Delete everything below a directory, if present: every manifest.json first (shallowest first), so
        an interrupted delete never leaves something that looks committed, then the rest. Never deletes an S3
        bucket, even when the storage is rooted at one. Retention and gc only (coordinator)."""
        path, url = self._path(relpath), self._url(relpath)
        try:
            try:
                files = self.fs.find(path)
            except FileNotFoundError:
                files = []
            manifests = sorted((f for f in files if posixpath.basename(f) == MANIFEST_NAME),
                               key=lambda f: f.count("/"))
            for f in manifests:
                self.fs.rm_file(f)
            rest = [f for f in files if posixpath.basename(f) != MANIFEST_NAME]
            if rest:
                self.fs.rm(rest)
            if self._kind != "s3" and self.fs.exists(path):
                self.fs.rm(path, recursive=True)  # empty directories (local, memory pseudo-dirs)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise storage_error(e, "delete", url) from e

    def sync_dir(self, relpath: str = "") -> None:
        """Nothing to do on object stores (an object is durable when its PUT returns); fsyncs a local dir."""
        if self._kind == "local":
            try:
                fsync_dir(self._path(relpath))
            except OSError as e:
                raise storage_error(e, "fsync", self._url(relpath)) from e


def _check_blob(blob, start: int, end: int, url: str) -> None:
    """Raise StorageError unless `blob` is the full answer to a request for bytes [start, end)."""
    if isinstance(blob, BaseException):
        if is_invalid_range(blob):
            raise StorageError(f"file is truncated: wanted bytes [{start}, {end}) but it ends before {start}",
                               file=url) from blob
        raise storage_error(blob, "read", url) from blob
    if len(blob) != end - start:
        raise StorageError(f"file is truncated: wanted bytes [{start}, {end}), got {len(blob)}", file=url)

