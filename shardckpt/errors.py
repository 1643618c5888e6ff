"""Typed errors. Every error shardckpt raises derives from CheckpointError and names what it can:
the key (fqn), the file and the rank involved."""
from __future__ import annotations

import json


class CheckpointError(Exception):
    """Base class of every error raised by shardckpt."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None,
                 rank: int | None = None):
        parts = [message]
        where = []
        if key is not None:
            where.append(f"key={key!r}")
        if file is not None:
            where.append(f"file={file!r}")
        if rank is not None:
            where.append(f"rank={rank}")
        if where:
            parts.append("(" + ", ".join(where) + ")")
        super().__init__(" ".join(parts))
        self.message = message  # without the (key, file, rank) suffix: reports that list those apart use it
        self.key = key
        self.file = file
        self.rank = rank


class IncompleteCheckpointError(CheckpointError):
    """The path holds no committed manifest: the checkpoint does not exist (or its save never committed)."""


class CheckpointExistsError(CheckpointError):
    """A committed checkpoint already exists at the path (or another job committed it first), or an export's
    destination already holds files (and overwrite was not asked for)."""


class FormatError(CheckpointError):
    """The manifest or an index file breaks a rule of docs/FORMAT.md (malformed, hostile or unsupported)."""


class UnsupportedVersionError(FormatError):
    """The manifest's format_version major is not one this reader understands."""


class ChecksumError(CheckpointError):
    """A frame, index or manifest failed its crc32c check: the bytes on storage are corrupt."""


class CorruptDataError(CheckpointError):
    """A frame passed its checksum but could not be decoded, or a data file is shorter than the manifest says."""


class KeyMismatchError(CheckpointError):
    """strict load: keys missing from the checkpoint or unexpected in it; or a key selection (keys=,
    export --keys) that selects nothing."""

    def __init__(self, message: str, *, missing: list[str] = (), unexpected: list[str] = (), hint: bool = True,
                 **kw):
        # the fix is nearly always one of these two, so the error says so wherever it applies
        super().__init__(message + ("; pass strict=False to load the keys that match, or key_map= to map the "
                                    "caller's keys to the saved ones" if hint else ""), **kw)
        self.without_hint = message  # for callers that take no strict= (CheckpointManager.restore)
        self.missing = list(missing)
        self.unexpected = list(unexpected)


class ShapeMismatchError(CheckpointError):
    """The caller's tensor has another global shape than the saved one."""


class DtypeMismatchError(CheckpointError):
    """The caller's tensor has another dtype than the saved one (and no conversion was asked for)."""


class PlanMismatchError(CheckpointError):
    """Ranks disagree on what is being saved (different keys, shapes, dtypes or layouts)."""


class SaveError(CheckpointError):
    """A save failed on some rank; nothing was committed, unless `outcome_unknown`: the manifest write
    failed in a way that may still land (an object store's timed-out PUT), so its files were kept.
    `rank` names the first failing rank."""
    outcome_unknown = False


class CoordinationError(CheckpointError):
    """A collective of the save protocol failed or timed out (a rank died or stopped responding)."""


class StorageError(CheckpointError):
    """The storage backend failed (I/O error, disk full, permission, network)."""


class ConfigError(CheckpointError, ValueError):
    """A SHARDCKPT_* variable or an option has a value shardckpt cannot use; `name` is the variable/option."""

    def __init__(self, message: str, *, name: str | None = None, **kw):
        super().__init__(message, **kw)
        self.name = name


class MetricError(ConfigError):
    """CheckpointManager(save_best_only=True): a save is due but the monitored metric is not among the
    metrics given (or is not a number), so the policy cannot decide; raised on every rank alike."""


class UnsupportedValueError(CheckpointError):
    """A state_dict leaf of a type shardckpt does not save (it never falls back to pickle)."""


def error_record(e: BaseException, rank: int) -> dict:
    """A failure on `rank` as a small JSON record for a collective, so every rank can raise it (error_from)."""
    if isinstance(e, CheckpointError):
        cls, msg, at = type(e).__name__, bounded_text(e.message, 1200), e.rank
    else:
        cls, msg, at = "CheckpointError", error_text(e, 1200), None
    return {"cls": cls, "message": msg, "by": rank, "rank": rank if at is None else at,
            "key": getattr(e, "key", None), "file": getattr(e, "file", None), "name": getattr(e, "name", None)}


def error_from(record: dict) -> CheckpointError:
    """The typed error a record stands for, as the ranks other than the failing one raise it: the same
    class, key, file and rank, its message prefixed with the rank that found it."""
    cls = globals().get(record.get("cls"), CheckpointError)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = CheckpointError
    err = cls.__new__(cls)
    CheckpointError.__init__(err, f"on rank {record['by']}: {record['message']}", key=record.get("key"),
                             file=record.get("file"), rank=record.get("rank"))
    if isinstance(err, KeyMismatchError):
        err.missing, err.unexpected, err.without_hint = [], [], err.message
    if isinstance(err, ConfigError):
        err.name = record.get("name")
    return err


def error_text(e: BaseException, limit: int = 1500) -> str:
    """An exception as one bounded line for a coordination record ("Type: message"): a record holds at
    most dist.RECORD_BYTES, and an error must reach every rank however long its message is."""
    return bounded_text(f"{type(e).__name__}: {e}", limit)


def bounded_text(text: str, limit: int = 1500) -> str:
    """`text` cut so that it takes at most `limit` bytes as JSON in a coordination record (measured
    encoded: an escaped character can take 6 bytes, so cutting characters alone is not enough)."""
    if len(json.dumps(text)) <= limit:
        return text
    while len(json.dumps(text)) > limit - 20:
        text = text[:max(0, min(len(text) - 1, (limit - 20) * len(text) // len(json.dumps(text))))]
    return text + " ...(truncated)"
