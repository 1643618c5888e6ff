"""Storage on any fsspec URL: s3://, gs://, az://, memory://, file://, ... Object stores have no rename and no
directories, so this backend never moves files: data files are uploaded in place (S3: parallel multipart
upload, complete on close), and the manifest is committed by one create-only PUT.

How commit() is made atomic and create-only, per filesystem:
  s3 (s3fs)     one PutObject with `If-None-Match: *`; the store rejects it with 412 if the key exists and
                readers see either no object or the whole one. A retried PUT whose first attempt did land
                reports CheckpointExistsError although the manifest is ours: the caller may read it back.
  memory://     exists() then one write, under a process-wide lock: the memory filesystem is process-local,
                so the lock makes it exact.
  file://       delegated to LocalStorage.commit (temp file, fsync, link(2), fsync dir).
  others        exists() then one whole-object write. Atomic for readers (a single upload), but two
                concurrent committers can both succeed, the later winning: the race is small (the commit is
                the coordinator's last step, once per save) and documented here, not hidden.

Listings are never cached (use_listings_cache=False is forced): ranks on other hosts write and delete the files
this process lists and polls, and a stale exists() on a manifest would hide or fake a commit.
"""
from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import datetime
import os
import posixpath
import threading
from typing import Sequence

import fsspec
from fsspec.spec import AbstractBufferedFile

from ..errors import CheckpointError, CheckpointExistsError, StorageError
from .base import FileWriter, ReadRange, Storage

MANIFEST_NAME = "manifest.json"  # deleted first by delete_tree (see docs/FORMAT.md)
MIN_PART_SIZE = 5 << 20          # S3 rejects smaller parts (except the last)
MAX_PART_SIZE = 5 << 30          # ... and larger ones
MAX_PARTS = 10_000               # ... and more of them
DEFAULT_PART_SIZE = 8 << 20
DEFAULT_UPLOAD_CONCURRENCY = 8   # parts in flight per writer: memory <= (this + 1) * part size
_COALESCE_GAP = 1 << 20          # read the hole between two ranges rather than issue another request
_MAX_REQUEST = 32 << 20          # split bigger reads so one large range is still fetched in parallel
_MAX_BATCH = 256 << 20           # bytes fetched per cat_ranges call: bounds memory beyond `dest`

_memory_commit_lock = threading.Lock()


def _error(exc: BaseException, what: str, url: str) -> StorageError:
    """A StorageError naming the file, with the backend's own message (and its cause's, e.g. botocore's)."""
    if isinstance(exc, StorageError):
        return exc
    detail = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in detail:
        detail = f"{detail} ({cause})"
    err = StorageError(f"{what} failed: {type(exc).__name__}: {detail}", file=url)
    err.errno = getattr(exc, "errno", None)
    return err


def _check_open(state: str, url: str) -> None:
    if state != "open":
        raise StorageError(f"the writer is {state}: the file was not written", file=url)


def _is_precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs/botocore error is HTTP 412 (the create-only PUT found an existing key)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                return True
    return isinstance(exc, FileExistsError)


def _s3_options(options: dict) -> dict:
    """s3fs options with botocore's request checksums set to "when_required" on a plain-http endpoint,
    unless the caller chose.

    Over http botocore signs every request body with its SHA-256, which the store checks, and botocore >= 1.36
    adds a CRC32 of the body on top ("when_supported"), computed in Python on s3fs's event-loop thread: a
    second pass over every part that checks nothing more. Turning it off takes ~25% off the client's CPU time
    per uploaded byte (measured: 0.26 -> 0.20 s per 104 MB). Over https botocore's default is already the
    cheaper one (an unsigned body with a CRC32 trailer; without the checksum it would sign the body), so it is
    left alone, as is anything the caller set (options or AWS_REQUEST_CHECKSUM_CALCULATION) and an unsigned
    payload (then the CRC32 is the only check)."""
    config = dict(options.get("config_kwargs") or {})
    signing = (config.get("s3") or {}).get("payload_signing_enabled", True)
    if "request_checksum_calculation" in config or signing is False or \
            "AWS_REQUEST_CHECKSUM_CALCULATION" in os.environ or not _plain_http(options):
        return options
    try:
        from botocore.config import Config
    except ImportError:
        return options
    if "request_checksum_calculation" not in getattr(Config, "OPTION_DEFAULTS", {}):
        return options  # an older botocore: it computes no such checksum
    config["request_checksum_calculation"] = "when_required"
    return {**options, "config_kwargs": config}


def _plain_http(options: dict) -> bool:
    """Whether s3fs with these options talks to its endpoint over plain http (AWS's own is https)."""
    if options.get("use_ssl") is False:
        return True
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url") or \
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return str(endpoint).lower().startswith("http://")


def _is_local(fs) -> bool:
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


class _PartBuffers:
    """Part buffers kept between uploads and between saves: a fresh 8 MiB buffer costs its page faults and
    zeroing on every part of every save (~10% of a rank's CPU time in an S3 save, measured), a kept one
    nothing. A buffer comes back only after its upload is done; at most KEEP are kept per process (one
    writer's worth: 72 MiB at the default part size and concurrency)."""
    KEEP = DEFAULT_UPLOAD_CONCURRENCY + 1
    _lock = threading.Lock()
    _free: list[bytearray] = []

    @classmethod
    def take(cls, size: int) -> bytearray | None:
        with cls._lock:
            for i, buf in enumerate(cls._free):
                if len(buf) == size:
                    return cls._free.pop(i)
        return None

    @classmethod
    def give(cls, buf: bytearray) -> None:
        with cls._lock:
            if len(cls._free) < cls.KEEP:
                cls._free.append(buf)


class _S3MultipartWriter(FileWriter):
    """Writes one S3 object: fills a part buffer, then uploads parts concurrently on s3fs's event loop
    (at most `concurrency` in flight, so memory stays bounded); close() uploads the last part and completes
    the upload. A file smaller than one part is a single PutObject. A full part goes out as its buffer itself
    (botocore hashes and sends a bytearray as it is), and the buffer is reused (_PartBuffers) once its upload
    is done: no bytes() copy of each part, no fresh buffer to fault in per part."""

    def __init__(self, fs, path: str, url: str, part_size: int, concurrency: int):
        self.fs, self.url = fs, url
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size, self.concurrency = part_size, concurrency
        self._buf = bytearray()
        self._fill = 0  # bytes of _buf in use
        self._size = 0
        self._upload_id: str | None = None
        self._inflight: list[tuple[int, concurrent.futures.Future, bytes | bytearray]] = []
        self._etags: dict[int, str] = {}
        self._next_part = 1
        self._state = "open"  # -> "closed" (complete) or "aborted"

    def _current_part_size(self) -> int:
        # Grow parts every 1000 so a file never needs more than MAX_PARTS (8 MiB parts alone cap it at 80 GB).
        return min(MAX_PART_SIZE, self.part_size << ((self._next_part - 1) // 1000))

    def _submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def write(self, data) -> None:
        """Buffer `data`; every full part is handed to the event loop, waiting only while `concurrency` parts
        are in flight. A failure aborts the upload. Called by the owning rank, one thread at a time."""
        _check_open(self._state, self.url)
        view = memoryview(data).cast("B")
        n = view.nbytes
        try:
            while view:
                part = self._current_part_size()
                if self._fill == 0 and len(self._buf) != part:
                    self._buf = _PartBuffers.take(part) or bytearray()
                take = min(part - self._fill, view.nbytes)
                # In place in a kept part buffer; appended to a new one (which then grows to a part).
                self._buf[self._fill:self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                if self._fill == part:
                    self._upload_part()
        except Exception as e:
            self.abort()
            raise _error(e, "upload", self.url) from e
        self._size += n

    def _upload_part(self) -> None:
        if self._upload_id is None:
            resp = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = resp["UploadId"]
        while len(self._inflight) >= self.concurrency:
            self._reap_oldest()
        # A full buffer is the request body as it is (it is not touched again until its upload is done);
        # only a short last part is copied out.
        body = self._buf if self._fill == len(self._buf) else bytes(memoryview(self._buf)[:self._fill])
        number = self._next_part
        self._next_part += 1
        if number > MAX_PARTS:
            raise StorageError(f"file needs more than {MAX_PARTS} upload parts", file=self.url)
        fut = self._submit(self.fs._call_s3("upload_part", Bucket=self.bucket, Key=self.key,
                                            UploadId=self._upload_id, PartNumber=number, Body=body))
        self._inflight.append((number, fut, body))
        if body is self._buf:
            self._buf, self._fill = bytearray(), 0
        else:
            self._keep_buffer()

    def _reap_oldest(self) -> None:
        number, fut, body = self._inflight.pop(0)
        self._etags[number] = fut.result()["ETag"]
        if isinstance(body, bytearray):
            _PartBuffers.give(body)

    def _keep_buffer(self) -> None:
        """Give the current part buffer (not in any request) back for reuse."""
        if len(self._buf) == self._current_part_size():
            _PartBuffers.give(self._buf)
        self._buf, self._fill = bytearray(), 0

    def close(self) -> int:
        """Upload the last part and complete the upload (or PUT a small file whole): the object exists,
        complete, when this returns. Called by the owning rank once its last write is done."""
        if self._state == "closed":
            return self._size
        _check_open(self._state, self.url)
        try:
            if self._upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                                Body=bytes(memoryview(self._buf)[:self._fill]))
                self._keep_buffer()
            else:
                if self._fill:
                    self._upload_part()
                while self._inflight:
                    self._reap_oldest()
                self._keep_buffer()
                parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
                self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except Exception as e:
            self.abort()
            raise _error(e, "upload", self.url) from e
        self._state = "closed"
        return self._size

    def abort(self) -> None:
        """Cancel parts in flight and abort the multipart upload; never raises. Called on any failure."""
        if self._state == "closed":
            return
        self._state = "aborted"
        self._keep_buffer()  # bodies in flight are dropped, never kept: a cancelled request may still send
        for _, fut, _ in self._inflight:
            fut.cancel()
        for _, fut, _ in self._inflight:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 -- best effort
                pass
        self._inflight.clear()
        if self._upload_id is not None:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload_id)
            except BaseException:  # noqa: BLE001 -- best effort; a bucket lifecycle rule reaps leftovers
                pass
            self._upload_id = None


class _BufferedWriter(FileWriter):
    """memory://: collect the bytes, store them in one write on close (the file appears complete or not at all)."""

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url
        self._buf = bytearray()
        self._state = "open"
        self._size = 0

    def write(self, data) -> None:
        """Append to the in-memory buffer. Called by the owning rank."""
        _check_open(self._state, self.url)
        self._buf += memoryview(data).cast("B")

    def close(self) -> int:
        """Store the whole file in one write. Called by the owning rank after its last write."""
        if self._state == "closed":
            return self._size
        _check_open(self._state, self.url)
        try:
            self.fs.pipe_file(self.path, bytes(self._buf))
        except Exception as e:
            self.abort()
            raise _error(e, "write", self.url) from e
        self._size, self._buf, self._state = len(self._buf), bytearray(), "closed"
        return self._size

    def abort(self) -> None:
        """Drop the buffer; nothing was stored. Never raises."""
        if self._state != "closed":
            self._state, self._buf = "aborted", bytearray()


class _StreamWriter(FileWriter):
    """Any other filesystem: its own buffered writer (gcsfs resumable upload, adlfs blocks, local file)."""

    def __init__(self, fs, path: str, url: str, block_size: int):
        self.fs, self.path, self.url = fs, path, url
        self._size = 0
        self._state = "open"
        try:
            if _is_local(fs):
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._f = fs.open(path, "wb", block_size=block_size)
        except Exception as e:
            raise _error(e, "open for write", url) from e

    def write(self, data) -> None:
        """Append through the filesystem's file object (it uploads a block whenever one fills). Called by
        the owning rank."""
        _check_open(self._state, self.url)
        view = memoryview(data).cast("B")
        try:
            self._f.write(view)
        except Exception as e:
            self.abort()
            raise _error(e, "write", self.url) from e
        self._size += view.nbytes

    def close(self) -> int:
        """Flush and finish the upload (fsync for a local file). Called by the owning rank after its last
        write."""
        if self._state == "closed":
            return self._size
        _check_open(self._state, self.url)
        try:
            if _is_local(self.fs):
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
        except Exception as e:
            self.abort()
            raise _error(e, "close", self.url) from e
        self._state = "closed"
        return self._size

    def abort(self) -> None:
        """Discard the upload and remove whatever reached the store; never raises."""
        if self._state != "open":
            return
        self._state = "aborted"
        f = self._f
        if isinstance(f, AbstractBufferedFile):
            try:
                f.discard()  # e.g. cancel a resumable upload
            except BaseException:  # noqa: BLE001 -- best effort
                pass
            f.closed = True  # discarded: a later close() must not upload what was buffered
        else:
            try:
                f.close()
            except BaseException:  # noqa: BLE001 -- best effort
                pass
        try:
            self.fs.rm_file(self.path)
        except BaseException:  # noqa: BLE001 -- best effort
            pass


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
                options = _s3_options(options)
            try:
                _fs, _root = fsspec.core.url_to_fs(url, **options)
            except Exception as e:
                raise _error(e, "open filesystem", url) from e
        self.fs = _fs
        self.root = _root.rstrip("/") if _root not in ("/", "") else _root
        self._s3 = hasattr(_fs, "_call_s3") and hasattr(_fs, "split_path")
        self._memory = "memory" in _protocols(_fs)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

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
        if self._s3:
            return _S3MultipartWriter(self.fs, path, url, self.part_size, self.upload_concurrency)
        if self._memory:
            return _BufferedWriter(self.fs, path, url)
        return _StreamWriter(self.fs, path, url, self.part_size)

    def commit(self, relpath: str, data: bytes) -> None:
        """Create `relpath` with `data` if and only if it does not exist (see the module docstring for how,
        per filesystem). Raises CheckpointExistsError if it exists. Called by the coordinator once per save,
        as its very last step: this is the commit point."""
        path, url = self._path(relpath), self._url(relpath)
        data = bytes(data)
        if _is_local(self.fs):
            from .local import LocalStorage
            LocalStorage(posixpath.dirname(path)).commit(posixpath.basename(path), data)
            return
        try:
            if self._s3:
                bucket, key, _ = self.fs.split_path(path)
                try:
                    self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                except Exception as e:
                    if _is_precondition_failed(e):
                        raise CheckpointExistsError("a committed manifest already exists", file=url) from None
                    raise
            elif self._memory:
                with _memory_commit_lock:
                    if self.fs.exists(path):
                        raise CheckpointExistsError("a committed manifest already exists", file=url)
                    self.fs.pipe_file(path, data)
            else:
                # No conditional write in fsspec's generic API: racy between two committers (module docstring).
                if self.fs.exists(path):
                    raise CheckpointExistsError("a committed manifest already exists", file=url)
                self.fs.pipe_file(path, data)
        except CheckpointError:
            raise
        except Exception as e:
            raise _error(e, "commit", url) from e

    def read_file(self, relpath: str) -> bytes:
        """Read a whole file in one request. Raises FileNotFoundError if absent. Called by every loader for
        the manifest and index files (and by the manager to find committed checkpoints)."""
        url = self._url(relpath)
        try:
            return bytes(self.fs.cat_file(self._path(relpath)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None
        except Exception as e:
            raise _error(e, "read", url) from e

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
                raise _error(e, "read", url) from e
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
            raise _error(e, "exists", self._url(relpath)) from e

    def size(self, relpath: str) -> int:
        """Size of a file in bytes; FileNotFoundError if absent. Called by the CLI (verify, ls) and loaders."""
        url = self._url(relpath)
        try:
            return int(self.fs.size(self._path(relpath)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None
        except Exception as e:
            raise _error(e, "size", url) from e

    def list_dir(self, relpath: str = "") -> list[str]:
        """Names of entries directly below a directory; [] if absent. Called by the manager (steps) and CLI."""
        path = self._path(relpath)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as e:
            raise _error(e, "list", self._url(relpath)) from e
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
            raise _error(e, "list", self._url(relpath)) from e
        strip = path.rstrip("/")
        return sorted(self._rel(p) for p in found if p.rstrip("/") != strip and not p.endswith("/"))

    def mtime(self, relpath: str) -> float | None:
        """Last modification time from fs.info() (each filesystem names it differently), or None if absent
        or not given (S3 directory prefixes have none). Called by gc (shardckpt.gc) to spare fresh saves."""
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
            raise _error(e, "delete", self._url(relpath)) from e

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
            if not self._s3 and self.fs.exists(path):
                self.fs.rm(path, recursive=True)  # empty directories (local, memory pseudo-dirs)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise _error(e, "delete", url) from e

    def sync_dir(self, relpath: str = "") -> None:
        """Nothing to do on object stores (an object is durable when its PUT returns); fsyncs a local dir."""
        if _is_local(self.fs):
            path = self._path(relpath)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise _error(e, "fsync", self._url(relpath)) from e


def _check_blob(blob, start: int, end: int, url: str) -> None:
    """Raise StorageError unless `blob` is the full answer to a request for bytes [start, end)."""
    if isinstance(blob, BaseException):
        if _is_invalid_range(blob):
            raise StorageError(f"file is truncated: wanted bytes [{start}, {end}) but it ends before {start}",
                               file=url) from blob
        raise _error(blob, "read", url) from blob
    if len(blob) != end - start:
        raise StorageError(f"file is truncated: wanted bytes [{start}, {end}), got {len(blob)}", file=url)


def _is_invalid_range(exc: BaseException) -> bool:
    """S3 answers 416 InvalidRange when a range starts at or past the end of the object."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            if response.get("Error", {}).get("Code") == "InvalidRange" or \
                    response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                return True
    return "InvalidRange" in str(exc)
