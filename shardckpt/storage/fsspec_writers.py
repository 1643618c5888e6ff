"""FileWriters of FsspecStorage for filesystems other than S3 (S3 has its multipart writer in s3.py):
memory:// collects a file and stores it in one write on close; every other filesystem writes through its own
buffered file object (gcsfs resumable upload, adlfs blocks, a local file fsynced on close). Created by
FsspecStorage.open_write; written and closed by the rank that owns the file, one thread at a time.
"""
from __future__ import annotations

import os
import posixpath

from fsspec.spec import AbstractBufferedFile

from shardckpt.storage.base import FileWriter, check_open, storage_error


class BufferedWriter(FileWriter):
    """memory://: collect the bytes, store them in one write on close (the file appears complete or not at all)."""

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url
        self._buf = bytearray()
        self._state = "open"
        self._size = 0

    def write(self, data) -> None:
        """Append to the in-memory buffer. Called by the owning rank."""
        check_open(self._state, self.url)
        self._buf += memoryview(data).cast("B")

    def close(self) -> int:
        """Store the whole file in one write. Called by the owning rank after its last write."""
        if self._state == "closed":
            return self._size
        check_open(self._state, self.url)
        try:
            self.fs.pipe_file(self.path, bytes(self._buf))
        except Exception as e:
            self.abort()
            raise storage_error(e, "write", self.url) from e
        self._size, self._buf, self._state = len(self._buf), bytearray(), "closed"
        return self._size

    def abort(self) -> None:
        """Drop the buffer; nothing was stored. Never raises."""
        if self._state != "closed":
            self._state, self._buf = "aborted", bytearray()


class StreamWriter(FileWriter):
    """Any other filesystem: its own buffered writer (gcsfs resumable upload, adlfs blocks, local file)."""

    def __init__(self, fs, path: str, url: str, block_size: int, local: bool):
        self.fs, self.path, self.url, self.local = fs, path, url, local
        self._size = 0
        self._state = "open"
        try:
            if local:
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._f = fs.open(path, "wb", block_size=block_size)
        except Exception as e:
            raise storage_error(e, "open for write", url) from e

    def write(self, data) -> None:
        """Append through the filesystem's file object (it uploads a block whenever one fills). Called by
        the owning rank."""
        check_open(self._state, self.url)
        view = memoryview(data).cast("B")
        try:
            self._f.write(view)
        except Exception as e:
            self.abort()
            raise storage_error(e, "write", self.url) from e
        self._size += view.nbytes

    def close(self) -> int:
        """Flush and finish the upload (fsync for a local file). Called by the owning rank after its last
        write."""
        if self._state == "closed":
            return self._size
        check_open(self._state, self.url)
        try:
            if self.local:
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
        except Exception as e:
            self.abort()
            raise storage_error(e, "close", self.url) from e
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
