"""The storage interface. One Storage object is rooted at a checkpoint directory (or a manager root) and
addresses everything by relative POSIX paths below it ("manifest.json", "data/<save_id>/r00000.bin").

Who calls what, and when (numbers follow one save and one load):
  save  1. every rank: open_write(data file) -> FileWriter.write(...)* -> FileWriter.close() (durable on return)
        2. every rank: write_file(index file)                         (durable on return)
        3. coordinator only: commit(manifest name, bytes)              (atomic, create-only; the commit point)
           or, when overwriting a committed checkpoint, replace(manifest name, bytes)  (atomic)
  load  1. every rank: read_file(manifest), read_file(index files)
        2. every rank: read_ranges(data file, ranges) for the frames it needs
  manager / CLI: list_dir, exists, size, mtime, delete_tree (retention and gc; coordinator only)

What each method raises (every backend; shardckpt.testing.storage.StorageConformance asserts it):
  FileNotFoundError      read_file and size of a file that does not exist. A missing file is an answer, not a
                         failure: callers (the manager looking for manifests) act on it.
  CheckpointExistsError  commit of a name that already exists (another save committed first).
  StorageError           every failure of the store itself, naming the file: refused, unreachable, disk full
                         (errno set where the OS gave one); read_ranges of a missing file, or of a file
                         shorter than a range ("truncated" in the message: the reader reports that as a
                         damaged checkpoint); write or close on a writer that was closed or aborted.
  ValueError             a caller's mistake no store is asked about: a read range that does not fit `dest`.
  nothing                FileWriter.abort; exists (False), list_dir / list_files ([]), mtime (None), delete
                         and delete_tree of what is not there.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

from shardckpt.errors import StorageError


@dataclass(frozen=True)
class ReadRange:
    """One byte range to fetch: `length` bytes at `offset` of a file, to land at `dest_offset` in the
    destination buffer handed to read_ranges."""
    offset: int
    length: int
    dest_offset: int


def storage_error(exc: BaseException, what: str, file: str) -> StorageError:
    """The StorageError a backend raises for a failed call of its store: names the file, keeps the store's
    own message (and its cause's, e.g. botocore's) and errno. Called by the fsspec backends' except clauses."""
    if isinstance(exc, StorageError):
        return exc
    detail = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in detail:
        detail = f"{detail} ({cause})"
    err = StorageError(f"{what} failed: {type(exc).__name__}: {detail}", file=file)
    err.errno = getattr(exc, "errno", None)
    return err


def check_open(state: str, file: str) -> None:
    """Raise StorageError unless a writer's state is "open". Called by FileWriter.write/close implementations."""
    if state != "open":
        raise StorageError(f"the writer is {state}: the file was not written", file=file)


class FileWriter(abc.ABC):
    """Sequential writer of one new file. Called by the rank that owns the file, from one thread at a time."""

    @abc.abstractmethod
    def write(self, data) -> None:
        """Append a buffer (bytes, memoryview, numpy array). May hand the bytes to the backend
        asynchronously: the caller must not modify `data` until close() returns. Raises StorageError
        (the writer is then aborted, or may be) if the store fails, or if the writer is closed or aborted."""

    @abc.abstractmethod
    def close(self) -> int:
        """Finish the file and make it durable (fsync / completed upload). Returns the file size. Raises
        StorageError if the store fails (nothing is left under the name then) or the writer was aborted."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the partial file (best effort); never raises."""


class Storage(abc.ABC):
    """A directory-like namespace. Implementations: LocalStorage (POSIX), FsspecStorage (any fsspec URL)."""

    url: str
    # Alignment (bytes) that read_ranges likes for file offsets and destination addresses: a reader that
    # starts its ranges on such boundaries in page-aligned buffers lets a local backend read them with
    # O_DIRECT. 1: no preference.
    read_align: int = 1
    # Whether a write that raised is settled when it returns: reading the file back then tells for certain
    # whether it landed (local files). False where a failed or timed-out request may still land later
    # (object stores): commit.commit_manifest then treats "not there" as an unknown outcome and keeps files.
    settles_on_error: bool = False

    @abc.abstractmethod
    def child(self, relpath: str) -> "Storage":
        """A Storage rooted at a subdirectory (the manager uses it for step-<N> directories). No I/O."""

    @abc.abstractmethod
    def open_write(self, relpath: str) -> FileWriter:
        """Create (or replace) a file for writing; missing parent directories are made. Raises StorageError
        if it cannot be created. Called by every rank for its own data files during a save."""

    def write_file(self, relpath: str, data) -> int:
        """Write a whole small file durably (index files); raises StorageError as open_write/write/close.
        Called by every rank after its data file."""
        w = self.open_write(relpath)
        try:
            w.write(data)
            return w.close()
        except BaseException:
            w.abort()
            raise

    @abc.abstractmethod
    def commit(self, relpath: str, data: bytes) -> None:
        """Atomically create `relpath` with `data` if and only if it does not exist yet; readers see either
        nothing or the whole file. Raises CheckpointExistsError if it exists (also when this same call's
        retried request found its own first attempt: the caller reads the manifest back), StorageError if
        the store fails. Called by the coordinator once per save, as the very last step: the commit point."""

    def replace(self, relpath: str, data: bytes) -> None:
        """Atomically put `data` at `relpath` whether or not a file is there: readers see the old file or the
        whole new one, never neither and never a mix. Raises StorageError if the store fails (the old file is
        then still in place). Called only by shardckpt.lifecycle.commit.commit_manifest on the coordinator, as the last
        step of a save that overwrites a committed checkpoint (shardckpt.dcp.Writer with overwrite=True);
        the caller deletes the old checkpoint's data only after this returns. This default refuses: a
        backend without an atomic replace cannot overwrite."""
        raise StorageError(f"{type(self).__name__} cannot replace a file atomically", file=self.url)

    @abc.abstractmethod
    def read_file(self, relpath: str) -> bytes:
        """Read a whole file (manifest, index). Raises FileNotFoundError if absent, StorageError if the store
        fails. Called by every loader."""

    @abc.abstractmethod
    def read_ranges(self, relpath: str, ranges: Sequence[ReadRange], dest) -> None:
        """Fill `dest` (a writable buffer) with the given ranges of a file, possibly in parallel. Raises
        StorageError naming the file if it is missing or shorter than a range ("truncated"), ValueError if a
        range does not fit `dest`. Zero-length ranges are no-ops. Called by loaders."""

    @abc.abstractmethod
    def exists(self, relpath: str) -> bool:
        """Whether a file exists; never cached. StorageError only if the store cannot be asked."""

    @abc.abstractmethod
    def size(self, relpath: str) -> int:
        """Size of a file in bytes. Raises FileNotFoundError if absent."""

    @abc.abstractmethod
    def list_dir(self, relpath: str = "") -> list[str]:
        """Names (not paths) of the entries directly below a directory; [] if it does not exist."""

    @abc.abstractmethod
    def list_files(self, relpath: str = "") -> list[str]:
        """Relative paths of every file below a directory, recursively; [] if it does not exist."""

    def mtime(self, relpath: str) -> float | None:
        """Last modification time of a file or directory (seconds since the epoch), or None if it is absent
        or the backend cannot tell. Called by gc (shardckpt.deleter, coordinator or CLI) to leave alone the files
        of a save that may still be in progress; None makes gc keep the entry, so this default is safe."""
        return None

    @abc.abstractmethod
    def delete(self, relpath: str) -> None:
        """Delete one file if present (absent: no-op). Raises StorageError if the store refuses. Retention
        and gc only (coordinator)."""

    @abc.abstractmethod
    def delete_tree(self, relpath: str = "") -> None:
        """Delete a directory and everything below it, if present. Retention and gc only (coordinator).
        Deletes every manifest.json below it first, so a half-deleted checkpoint is never seen as committed,
        and deletes nothing else if a manifest cannot be deleted. Raises StorageError if something could not
        be deleted."""

    def sync_dir(self, relpath: str = "") -> None:
        """Make directory entries durable (fsync on POSIX; a no-op on object stores)."""
