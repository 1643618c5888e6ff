"""The one verifier: what makes a committed checkpoint sound, checked by `shardckpt verify`, by
CheckpointManager.restore before it loads, and (for frames) by every load.

Checks, in order, collecting every problem rather than stopping at the first:
  1. the manifest parses and matches its crc32c (docs/FORMAT.md section 3);
  2. every index file listed in it is present, matches the size and crc32c the manifest pins, and parses;
  3. every data file is exactly `data_size` bytes (FORMAT.md section 6);
  4. each tensor's chunks cover it exactly once (only when one process checks every file: with
     rank/world_size each rank sees only its files, and load checks the coverage of what it reads);
  5. with `full`, every frame matches its crc32c and decodes to its raw length.

A frame that fails decode_frames is mapped to a typed error by frame_error, here only: ChecksumError when
its stored bytes do not match their crc32c, CorruptDataError when they do but do not decode. The loader
(reader.py), this verifier and so the manager and the CLI all report a bad frame the same way.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shardckpt.native import kernels as _ext
from shardckpt.format.metadata import read_manifest
from shardckpt.format.codec import CODEC_IDS, plane_size, threads
from shardckpt.errors import ChecksumError, CheckpointError, CorruptDataError, IncompleteCheckpointError, StorageError
from shardckpt.format.records import Chunk
from shardckpt.plan.geometry import check_coverage
from shardckpt.format.parse import parse_index
from shardckpt.progress import Progress
from shardckpt.format.refs import chunk_storage, reference_error
from shardckpt.storage import ReadRange, storage_for

VERIFY_BATCH = 64 << 20  # stored bytes of one verify job: contiguous frames of one chunk


def frame_error(e: Exception, chunk: Chunk, frames, first: int, where: str) -> ChecksumError | CorruptDataError:
    """The typed error for frames that _ext.decode_frames refused. Called by the loader and the verifier
    right where decode_frames raised.

    Args:
        e: the _ext.FrameError (or the ValueError the kernel raises for an inconsistent frame table).
        chunk: the chunk the frames belong to.
        frames: the frames passed to decode_frames (e.index counts in this list).
        first: the number, within the chunk, of frames[0].
        where: the checkpoint's URL or path, so the error names the data file in full.

    Returns:
        ChecksumError (the stored bytes do not match their crc32c) or CorruptDataError (they do, but do not
        decode to the frame's raw length, or the frame table is inconsistent).
    """
    path = f"{where}/{chunk.file}"
    note = ""
    if chunk.base:  # a reference (FORMAT.md §7): the frames are in the sibling base checkpoint
        path = f"{where.rstrip('/').rpartition('/')[0]}/{chunk.base}/{chunk.file}"
        note = f" (checkpoint {where} refers to these frames of earlier checkpoint {chunk.base})"
    if not isinstance(e, _ext.FrameError):
        return CorruptDataError(f"frame table is inconsistent: {e}{note}", key=chunk.key, file=path, rank=chunk.rank)
    bad = frames[e.index]
    cls = ChecksumError if e.reason == "checksum" else CorruptDataError
    return cls(f"frame {first + e.index} at byte offset {bad.offset} failed its {e.reason} check{note}",
               key=chunk.key, file=path, rank=chunk.rank)


@dataclass
class Problem:
    """One thing wrong with a checkpoint. `file` is relative to the checkpoint (VerifyReport.path)."""
    kind: str                  # manifest | index | missing_file | size | reference | coverage | checksum |
                               # corrupt | io
    message: str
    key: str | None = None
    file: str | None = None
    rank: int | None = None
    offset: int | None = None  # byte offset in `file`
    frame: int | None = None   # frame number within the chunk
    error: str | None = None   # the typed error a load would raise for it (ChecksumError, ...)

    def where(self) -> str:
        """"key=..., file=..., rank=..." for the fields that are set."""
        return ", ".join(f"{k}={v}" for k, v in (("key", self.key), ("file", self.file), ("rank", self.rank),
                                                ("offset", self.offset), ("frame", self.frame)) if v is not None)

    def line(self) -> str:
        w = self.where()
        return f"{self.error or self.kind}: {self.message}" + (f" ({w})" if w else "")


@dataclass
class VerifyReport:
    path: str
    ok: bool
    tensors: int = 0
    chunks: int = 0
    frames: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)


def _problem(kind: str, e: CheckpointError, **kw) -> Problem:
    return Problem(kind, e.message, **{"key": e.key, "rank": e.rank, **kw}, error=type(e).__name__)


def verify_checkpoint(path, *, full: bool = True, storage_options: dict | None = None, workers: int | None = None,
                      progress: bool | None = None, rank: int = 0, world_size: int = 1,
                      metadata=None) -> VerifyReport:
    """Check a committed checkpoint (the checks in this module's docstring) and report every problem.

    Called by `shardckpt verify` (one process, all files) and, through list_problems, by
    CheckpointManager.restore on every rank, each rank checking the files i with i % world_size == rank.

    Args:
        full: also read every frame and check its crc32c and decodability (in jobs of about VERIFY_BATCH
            stored bytes on `workers` threads; default min(8, CPUs)).
        progress: draw a progress bar on stderr (None: only when it is a terminal).
        rank, world_size: the share of the files this caller checks.
        metadata: (Manifest, index files' bytes or None) already read for the group (loading.read_group_metadata,
            as CheckpointManager.restore does, so a restore reads the manifest and each index once in all);
            None: read here.

    Raises:
        IncompleteCheckpointError: there is no committed checkpoint at `path` (nothing to verify).
        StorageError: the manifest cannot be read (an I/O error, not a finding).
    """
    t0 = time.monotonic()
    storage = storage_for(path, storage_options)
    report = VerifyReport(storage.url, True)
    try:
        m = metadata[0] if metadata is not None else read_manifest(storage)
    except (IncompleteCheckpointError, StorageError):
        raise
    except CheckpointError as e:
        report.problems.append(_problem("manifest", e, file=getattr(e, "file", None)))
        report.ok = False
        return report
    given = metadata[1] if metadata is not None else None
    mine = [(i, entry) for i, entry in enumerate(m.files) if i % world_size == rank]
    by_key: dict[str, list[Chunk]] = {k: [] for k in m.tensors}
    bad_files = set()
    for i, entry in mine:
        try:
            chunks = parse_index(given[i] if given is not None else storage.read_file(entry.index), entry, m)
        except FileNotFoundError:
            report.problems.append(Problem("missing_file", "index file is missing", file=entry.index,
                                           rank=entry.rank, error="IncompleteCheckpointError"))
            continue
        except CheckpointError as e:
            report.problems.append(_problem("index", e, file=entry.index, rank=entry.rank))
            continue
        for c in chunks:
            by_key[c.key].append(c)
        try:
            size = storage.size(entry.data)
        except (FileNotFoundError, OSError, CheckpointError):
            report.problems.append(Problem("missing_file", "data file is missing", file=entry.data,
                                           rank=entry.rank, error="CorruptDataError"))
            bad_files.add(entry.data)
            continue
        if size != entry.data_size:
            report.problems.append(Problem("size", f"data file is {size} bytes, the manifest says "
                                                   f"{entry.data_size}", file=entry.data, rank=entry.rank,
                                           error="CorruptDataError"))
            bad_files.add(entry.data)
    _check_references(storage, by_key, bad_files, report)
    if world_size == 1:
        for k, meta in m.tensors.items():
            try:
                check_coverage(meta, by_key[k])
            except CheckpointError as e:
                report.problems.append(_problem("coverage", e, key=k))
    report.tensors = len(m.tensors)
    report.chunks = sum(len(cs) for cs in by_key.values())
    if full:
        _verify_frames(storage, m, by_key, bad_files, report, workers, progress)
    report.ok = not report.problems
    report.seconds = time.monotonic() - t0
    return report


def _check_references(storage, by_key, bad_files, report: VerifyReport) -> None:
    """Step 4b: every base data file that this share's references point into (FORMAT.md §7) exists and
    holds their frames; a missing or short one is a Problem for each key whose frames it lacks, naming the
    key and both checkpoints (one stat per file)."""
    ends: dict[tuple[str, str], dict[str, tuple[int, Chunk]]] = {}  # (base, file) -> key -> (end, a chunk)
    for cs in by_key.values():
        for c in cs:
            if c.base and c.frames:
                end = max(f.offset + f.stored_len for f in c.frames)
                keys = ends.setdefault((c.base, c.file), {})
                if c.key not in keys or keys[c.key][0] < end:
                    keys[c.key] = (end, c)
    for (base, file), keys in sorted(ends.items()):
        try:
            size = chunk_storage(storage, next(iter(keys.values()))[1]).size(file)
        except (FileNotFoundError, OSError, CheckpointError):
            size = None
        for key, (end, c) in sorted(keys.items()):
            if size is None or size < end:
                what = "missing" if size is None else f"{size} bytes, shorter than its frames (to byte {end})"
                e = reference_error(storage, c, f"referenced data file is {what}")
                report.problems.append(_problem("reference", e, file=f"../{base}/{file}"))
                bad_files.add((base, file))


def _verify_frames(storage, m, by_key, bad_files, report: VerifyReport, workers, progress) -> None:
    """Step 5: read every frame of the chunks in `by_key` (except in files already found missing or of
    the wrong size) and decode it, adding a Problem per bad frame to `report`."""
    jobs = []  # (chunk, first frame, last frame): contiguous frames of one chunk, ~VERIFY_BATCH stored bytes
    for cs in by_key.values():
        for c in cs:
            if c.file in bad_files or (c.base, c.file) in bad_files:
                continue
            start, acc = 0, 0
            for i, f in enumerate(c.frames):
                acc += f.stored_len
                if acc >= VERIFY_BATCH:
                    jobs.append((c, start, i + 1))
                    start, acc = i + 1, 0
            if start < len(c.frames):
                jobs.append((c, start, len(c.frames)))
    total = sum(f.stored_len for c, a, b in jobs for f in c.frames[a:b])
    bar = Progress(total, "verify", enabled=progress)
    workers = workers or min(8, max(2, threads()))
    per_job_threads = max(1, threads() // workers)

    def run(job):
        c, a, b = job
        frames = c.frames[a:b]
        start = frames[0].offset
        stored = frames[-1].offset + frames[-1].stored_len - start
        found = []
        src = np.empty(stored, dtype=np.uint8)
        try:
            chunk_storage(storage, c).read_ranges(c.file, [ReadRange(start, stored, 0)], src)
        except (CheckpointError, OSError) as e:
            return [Problem("io", getattr(e, "message", str(e)), key=c.key, file=c.file, rank=c.rank, offset=start,
                            frame=a, error=type(e).__name__)], stored, 0
        itemsize = plane_size(m.tensors[c.key].dtype)
        i = 0
        while i < len(frames):  # after a bad frame, go on with the next one: report them all
            rest = frames[i:]
            table = [(f.offset - start, f.stored_len, f.raw_len, f.crc32c, f.encoded) for f in rest]
            raw = np.empty(sum(f.raw_len for f in rest), dtype=np.uint8)
            try:
                _ext.decode_frames(src, table, raw, itemsize, CODEC_IDS[c.codec], per_job_threads)
                break
            except (_ext.FrameError, ValueError) as e:
                err = frame_error(e, c, rest, a + i, storage.url)
                n = getattr(e, "index", 0)
                found.append(_problem("checksum" if isinstance(err, ChecksumError) else "corrupt", err,
                                      file=c.file, offset=rest[n].offset, frame=a + i + n))
                if not isinstance(e, _ext.FrameError):
                    break  # the table itself is bad: the frames after it cannot be told apart
                i += n + 1
        return found, stored, len(frames)

    with ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-verify") as pool:
        for found, nbytes, nframes in pool.map(run, jobs):
            report.problems += found
            report.bytes_checked += nbytes
            report.frames += nframes
            bar(nbytes)
    bar.close()


def check_frames(storage, manifest, chunks: list[Chunk], *, skip=frozenset()) -> set:
    """Step 5 for some chunks only: every frame's crc32c and decodability, without keeping the data.
    Called by shardckpt diff for the tensors it finds identical by content hash (FORMAT.md §7), so that it
    never reports data it did not check.

    Args:
        storage: the checkpoint the chunks belong to.
        manifest: its Manifest.
        chunks: the chunks to check (references are read in their base).
        skip: locations (URL of the file, byte offset) already checked, e.g. the same base frames through
            the other side of a diff; not read again.

    Returns:
        The locations checked (add them to `skip` for the next call).

    Raises:
        ChecksumError, CorruptDataError, StorageError: the first bad frame, naming key, file and rank.
    """
    by_key: dict[str, list[Chunk]] = {}
    seen = set()
    for c in chunks:
        loc = (f"{chunk_storage(storage, c).url}/{c.file}", c.frames[0].offset if c.frames else -1)
        if loc not in skip:
            by_key.setdefault(c.key, []).append(c)
            seen.add(loc)
    report = VerifyReport(storage.url, True)
    _verify_frames(storage, manifest, by_key, set(), report, None, False)
    if report.problems:
        p = report.problems[0]
        cls = {"ChecksumError": ChecksumError, "CorruptDataError": CorruptDataError}.get(p.error, StorageError)
        at = "" if p.offset is None else f" at byte offset {p.offset}"
        raise cls(f"{p.message}{at}", key=p.key, file=f"{storage.url}/{p.file}", rank=p.rank)
    return seen


def list_problems(path, *, full: bool = False, storage_options: dict | None = None, rank: int = 0,
                  world_size: int = 1, metadata=None) -> list[str]:
    """verify_checkpoint's findings as one line each, [] if none; a checkpoint that cannot be read at all
    is one line too. Called by CheckpointManager.restore on every rank (this rank's share of the files;
    the ranks then agree on the first problem) and importable as shardckpt.manager.verify_checkpoint.

    Args:
        full: also check every frame (the manager's verify="full"); else index level only (steps 1-4).
    """
    try:
        report = verify_checkpoint(path, full=full, storage_options=storage_options, progress=False, rank=rank,
                                   world_size=world_size, metadata=metadata)
    except Exception as e:  # a step that vanished or cannot be read is one the manager falls back past
        return [f"manifest: {type(e).__name__}: {e}"]
    return [p.line() for p in report.problems]
