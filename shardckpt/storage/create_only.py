"""Create-only writes on fsspec filesystems: how FsspecStorage.commit stores the manifest only if no object has
its name yet. On every store readers see either no object or the whole one (a single upload, never a rename);
what differs is whether two committers racing for one name can both succeed.

  s3 (s3fs)          one PutObject with `If-None-Match: *`; the store answers 412 if the key exists.
                     Exactly one winner: tested against a real server (Ceph radosgw).
  gs (gcsfs)         pipe_file(mode="create"): gcsfs >= 2024.12 sends the upload with the precondition
                     ifGenerationMatch=0, which GCS refuses with 412 (gcsfs raises FileExistsError) if any
                     generation of the object exists (gcsfs documents its mode="create" as experimental).
                     Tested against a fake filesystem that checks this call, not against GCS.
  az/abfs (adlfs)    pipe_file(overwrite=False): the Azure SDK sends `If-None-Match: *`, which the service
                     refuses with 409 BlobAlreadyExists (ResourceExistsError; FileExistsError from adlfs
                     >= 2024.12). Tested against a fake filesystem that checks this call, not against Azure.
  memory://          exists() then one write, under a process-wide lock: exact, the filesystem is
                     process-local.
  others, and a gcsfs/adlfs too old for the conditional call
                     exists() then one write: two concurrent committers can both succeed, the later winning.
                     A warning says so, once per filesystem class.
A retried request whose first attempt did land finds its own object and reports it as existing (S3, GCS and
Azure alike): the caller reads the manifest back to tell (shardckpt.lifecycle.commit).

Who calls what: FsspecStorage.__init__ calls store_kind() once per root; FsspecStorage.commit calls
create_only() on the coordinator, once per save.
"""
from __future__ import annotations

import inspect
import logging
import threading

log = logging.getLogger("shardckpt")

_memory_lock = threading.Lock()
_warned: set[str] = set()


def protocols(fs) -> tuple[str, ...]:
    """The protocol names an fsspec filesystem registers under ("s3", ("gs", "gcs"), ...)."""
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def store_kind(fs) -> str:
    """Which create-only method fits `fs`: "s3", "gcs", "azure", "memory", "local" or "other"."""
    names = set(protocols(fs))
    if hasattr(fs, "_call_s3") and hasattr(fs, "split_path"):
        return "s3"
    if names & {"gs", "gcs"}:
        return "gcs"
    if names & {"az", "abfs", "abfss"}:
        return "azure"
    if "memory" in names:
        return "memory"
    if names & {"file", "local"}:
        return "local"
    return "other"


def create_only(fs, kind: str, path: str, data: bytes) -> None:
    """Store `data` at `path` if no object has that name; raise FileExistsError if one has (see the module
    docstring for how on each store, and which of them exclude a concurrent committer). Any other failure
    is raised as the filesystem raised it. `kind` is store_kind(fs). Called by FsspecStorage.commit."""
    try:
        if kind == "s3":
            bucket, key, _ = fs.split_path(path)
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        elif kind == "gcs" and _takes(fs.pipe_file, "mode"):
            fs.pipe_file(path, data, mode="create")
        elif kind == "azure" and _takes(fs.pipe_file, "overwrite"):
            fs.pipe_file(path, data, overwrite=False)
        elif kind == "memory":
            with _memory_lock:
                if fs.exists(path):
                    raise FileExistsError(path)
                fs.pipe_file(path, data)
        else:
            _warn_racy(fs)
            if fs.exists(path):
                raise FileExistsError(path)
            fs.pipe_file(path, data)
    except FileExistsError:
        raise
    except Exception as e:
        if is_exists_error(e):
            raise FileExistsError(path) from e
        raise


def is_exists_error(exc: BaseException) -> bool:
    """Whether a store's error says a conditional create found the name taken: FileExistsError (gcsfs, adlfs,
    s3fs's own translation), botocore's 412 PreconditionFailed, the Azure SDK's ResourceExistsError (409) or
    a 412 status (condition not met)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        if isinstance(e, FileExistsError) or type(e).__name__ == "ResourceExistsError":
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                return True
        if getattr(e, "status_code", None) == 412:
            return True
    return False


def _takes(fn, name: str) -> bool:
    """Whether `fn` accepts keyword `name` (by name or through **kwargs); True when it cannot be told."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _warn_racy(fs) -> None:
    name = f"{type(fs).__module__}.{type(fs).__qualname__}"
    if name not in _warned:
        _warned.add(name)
        log.warning("shardckpt: %s offers no create-only write that shardckpt knows; the manifest is committed "
                    "by exists() then one write, so two jobs saving to one path at once could both commit",
                    name)
