"""Local POSIX storage: the fast path. Data files are written with plain write(2) from one writer thread per
file, fsynced on close; the manifest is committed by writing a temp file, fsyncing it, hard-linking it to its
final name (link(2) fails if the name exists: create-only) and fsyncing the directory."""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from .. import _ext
from ..errors import CheckpointExistsError, StorageError
from .base import FileWriter, ReadRange, Storage

_READ_THREADS = 8
_PARALLEL_READ_BYTES = 8 << 20


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, what: str, path: str) -> StorageError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    err = StorageError(f"{what} failed: {reason}", file=path)
    err.errno = exc.errno
    return err


class _LocalWriter(FileWriter):
    def __init__(self, path: str):
        self.path = path
        self._size = 0
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _storage_error(e, "open for write", path) from e

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._size += n
        except OSError as e:
            raise _storage_error(e, "write", self.path) from e

    def close(self) -> int:
        if self._fd < 0:
            raise StorageError("file was aborted or already closed", file=self.path)
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise _storage_error(e, "fsync", self.path) from e
        finally:
            os.close(self._fd)
            self._fd = -1
        return self._size

    def abort(self) -> None:
        try:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            os.unlink(self.path)
        except OSError:
            pass


class LocalStorage(Storage):
    """Storage on a local or shared POSIX filesystem (NFS, Lustre, GPFS)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def _path(self, relpath: str) -> str:
        return os.path.join(self.root, relpath) if relpath else self.root

    def child(self, relpath: str) -> "LocalStorage":
        return LocalStorage(self._path(relpath))

    def open_write(self, relpath: str) -> FileWriter:
        path = self._path(relpath)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise _storage_error(e, "mkdir", os.path.dirname(path)) from e
        return _LocalWriter(path)

    def commit(self, relpath: str, data: bytes) -> None:
        path = self._path(relpath)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            w = _LocalWriter(tmp)
            try:
                w.write(data)
                w.close()
            except BaseException:
                w.abort()
                raise
            try:
                os.link(tmp, path)  # create-only: fails with EEXIST if a manifest is already there
            except FileExistsError:
                raise CheckpointExistsError("a committed manifest already exists", file=path) from None
            finally:
                os.unlink(tmp)
            _fsync_dir(directory)
        except OSError as e:
            raise _storage_error(e, "commit", path) from e

    def read_file(self, relpath: str) -> bytes:
        path = self._path(relpath)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _storage_error(e, "read", path) from e

    def read_ranges(self, relpath: str, ranges: Sequence[ReadRange], dest) -> None:
        path = self._path(relpath)
        dest = memoryview(dest).cast("B")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise _storage_error(e, "open for read", path) from e
        try:
            total = sum(r.length for r in ranges)
            if total >= _PARALLEL_READ_BYTES and len(ranges) > 1:
                with ThreadPoolExecutor(min(_READ_THREADS, len(ranges))) as pool:
                    list(pool.map(lambda r: self._pread(fd, path, r, dest), ranges))
            else:
                for r in ranges:
                    self._pread(fd, path, r, dest)
        finally:
            os.close(fd)

    @staticmethod
    def _pread(fd: int, path: str, r: ReadRange, dest: memoryview) -> None:
        try:
            got = _ext.pread_into(fd, r.offset, dest[r.dest_offset:r.dest_offset + r.length])
        except OSError as e:
            raise _storage_error(e, "read", path) from e
        if got != r.length:
            raise StorageError(f"file is truncated: wanted {r.length} bytes at offset {r.offset}, got {got}",
                               file=path)

    def exists(self, relpath: str) -> bool:
        return os.path.exists(self._path(relpath))

    def size(self, relpath: str) -> int:
        return os.path.getsize(self._path(relpath))

    def list_dir(self, relpath: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(relpath)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_files(self, relpath: str = "") -> list[str]:
        base = self._path(relpath)
        out = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    def delete(self, relpath: str) -> None:
        try:
            os.unlink(self._path(relpath))
        except FileNotFoundError:
            pass

    def delete_tree(self, relpath: str = "") -> None:
        base = self._path(relpath)
        # manifests first (shallowest first, made durable), so a crash mid-delete never leaves a committed
        # manifest pointing at deleted data
        manifests = sorted((os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs if f == "manifest.json"),
                           key=lambda p: p.count(os.sep))
        for m in manifests:
            try:
                os.unlink(m)
                _fsync_dir(os.path.dirname(m))
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)

    def sync_dir(self, relpath: str = "") -> None:
        _fsync_dir(self._path(relpath))
