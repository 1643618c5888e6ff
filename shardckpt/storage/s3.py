"""S3 specifics of FsspecStorage (s3fs): the multipart writer, the part buffers it reuses, the client options
FsspecStorage opens s3fs with, and how S3 reports a range past the end of an object.

Who calls what, and when:
  FsspecStorage.__init__     s3_options(storage_options), once per s3:// root
  FsspecStorage.open_write   S3MultipartWriter(...), every rank, once per data or index file of a save
  FsspecStorage.read_ranges  is_invalid_range(error), when a ranged GET fails
The create-only PUT of the manifest lives with the other stores' in create_only.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading

from shardckpt.errors import StorageError
from shardckpt.storage.base import FileWriter, check_open, storage_error

MIN_PART_SIZE = 5 << 20          # S3 rejects smaller parts (except the last)
MAX_PART_SIZE = 5 << 30          # ... and larger ones
MAX_PARTS = 10_000               # ... and more of them
DEFAULT_PART_SIZE = 8 << 20
DEFAULT_UPLOAD_CONCURRENCY = 8   # parts in flight per writer: memory <= (this + 1) * part size


def s3_options(options: dict) -> dict:
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


def is_invalid_range(exc: BaseException) -> bool:
    """S3 answers 416 InvalidRange when a range starts at or past the end of the object."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            if response.get("Error", {}).get("Code") == "InvalidRange" or \
                    response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                return True
    return "InvalidRange" in str(exc)


class PartBuffers:
    """Part buffers kept between uploads and between saves: a fresh 8 MiB buffer costs its page faults and
    zeroing on every part of every save (~10% of a rank's CPU time in an S3 save, measured), a kept one
    nothing. A buffer comes back only after its upload is done; at most KEEP are kept per process (one
    writer's worth: 72 MiB at the default part size and concurrency).

    Only whole part buffers are kept: take() hands out a buffer of exactly the part size asked for, so a short
    one (a file's last part) could never be taken again and would only hold a slot. Called by
    S3MultipartWriter: take() when it starts filling a part, give() when a part's upload is done or the
    writer is finished with its current buffer."""
    KEEP = DEFAULT_UPLOAD_CONCURRENCY + 1
    _lock = threading.Lock()
    _free: list[bytearray] = []

    @classmethod
    def take(cls, size: int) -> bytearray | None:
        """A kept buffer of exactly `size` bytes, or None (the caller then grows a fresh one)."""
        with cls._lock:
            for i, buf in enumerate(cls._free):
                if len(buf) == size:
                    return cls._free.pop(i)
        return None

    @classmethod
    def give(cls, buf: bytearray, part_size: int) -> None:
        """Keep `buf` if it is a whole buffer of a `part_size` part; drop it otherwise. With every slot
        taken, a buffer of another size (left by a writer with another part size) makes room for it."""
        if len(buf) != part_size:
            return
        with cls._lock:
            if len(cls._free) >= cls.KEEP:
                other = next((i for i, b in enumerate(cls._free) if len(b) != part_size), None)
                if other is None:
                    return
                del cls._free[other]
            cls._free.append(buf)


class S3MultipartWriter(FileWriter):
    """Writes one S3 object: fills a part buffer, then uploads parts concurrently on s3fs's event loop
    (at most `concurrency` in flight, so memory stays bounded); close() uploads the last part and completes
    the upload. A file smaller than one part is a single PutObject. A part goes out as its buffer itself
    (botocore hashes and sends a bytearray as it is), and a whole part buffer is reused (PartBuffers) once its
    upload is done: no bytes() copy of each part, no fresh buffer to fault in per part. Created by
    FsspecStorage.open_write; written and closed by the rank that owns the file, one thread at a time."""

    def __init__(self, fs, path: str, url: str, part_size: int, concurrency: int):
        self.fs, self.url = fs, url
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size, self.concurrency = part_size, concurrency
        self._buf = bytearray()
        self._buf_part = 0  # the part size _buf was taken or grown for
        self._fill = 0      # bytes of _buf in use
        self._size = 0
        self._upload_id: str | None = None
        # (part number, upload, body, the part size its buffer was made for)
        self._inflight: list[tuple[int, concurrent.futures.Future, bytes | bytearray, int]] = []
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
        are in flight. A failure aborts the upload and raises StorageError. Called by the owning rank, one
        thread at a time."""
        check_open(self._state, self.url)
        view = memoryview(data).cast("B")
        n = view.nbytes
        try:
            while view:
                part = self._current_part_size()
                if self._fill == 0 and len(self._buf) != part:
                    self._buf = PartBuffers.take(part) or bytearray()
                    self._buf_part = part
                take = min(part - self._fill, view.nbytes)
                # In place in a kept part buffer; appended to a new one (which then grows to a part).
                self._buf[self._fill:self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                if self._fill == part:
                    self._upload_part()
        except Exception as e:
            self.abort()
            raise storage_error(e, "upload", self.url) from e
        self._size += n

    def _upload_part(self) -> None:
        if self._upload_id is None:
            resp = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = resp["UploadId"]
        while len(self._inflight) >= self.concurrency:
            self._reap_oldest()
        # A buffer filled to its end is the request body as it is (it is not touched again until its upload
        # is done); only a last part that fills part of a kept buffer is copied out.
        body = self._buf if self._fill == len(self._buf) else bytes(memoryview(self._buf)[:self._fill])
        number = self._next_part
        self._next_part += 1
        if number > MAX_PARTS:
            raise StorageError(f"file needs more than {MAX_PARTS} upload parts", file=self.url)
        fut = self._submit(self.fs._call_s3("upload_part", Bucket=self.bucket, Key=self.key,
                                            UploadId=self._upload_id, PartNumber=number, Body=body))
        self._inflight.append((number, fut, body, self._buf_part))
        if body is self._buf:
            self._buf, self._fill = bytearray(), 0
        else:
            self._keep_buffer()

    def _reap_oldest(self) -> None:
        number, fut, body, part_size = self._inflight.pop(0)
        self._etags[number] = fut.result()["ETag"]
        if isinstance(body, bytearray):
            PartBuffers.give(body, part_size)  # a short last part is dropped there

    def _keep_buffer(self) -> None:
        """Give the current part buffer (not in any request) back for reuse."""
        PartBuffers.give(self._buf, self._buf_part)
        self._buf, self._fill = bytearray(), 0

    def close(self) -> int:
        """Upload the last part and complete the upload (or PUT a small file whole): the object exists,
        complete, when this returns. Raises StorageError (after aborting) if the store refuses. Called by
        the owning rank once its last write is done."""
        if self._state == "closed":
            return self._size
        check_open(self._state, self.url)
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
            raise storage_error(e, "upload", self.url) from e
        self._state = "closed"
        return self._size

    def abort(self) -> None:
        """Cancel parts in flight and abort the multipart upload; never raises. Called on any failure."""
        if self._state == "closed":
            return
        self._state = "aborted"
        self._keep_buffer()  # bodies in flight are dropped, never kept: a cancelled request may still send
        for _, fut, _, _ in self._inflight:
            fut.cancel()
        for _, fut, _, _ in self._inflight:
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
