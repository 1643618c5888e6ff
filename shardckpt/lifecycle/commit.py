"""The commit protocol: the one place where a save becomes a checkpoint (docs/FORMAT.md, "Commit").

Who calls what, and when:
  shardckpt.api (save, and async_save's background thread), every rank, after its data and index files
      are durable (or its write failed):  finish(comm, storage, save_id, summary, ...)
        1. all ranks: gather one small write summary per rank at the coordinator
        2. coordinator: check the summaries (every rank ok, every element written exactly once), build the
           manifest, commit_manifest() it
        3. all ranks: broadcast the outcome; on failure each rank removes its own files if and only if the
           coordinator is certain that nothing of this save was committed, then every rank raises
  shardckpt.dcp.Writer.finish, coordinator only (DCP gathers the ranks' results itself):
        file_entry() per rank summary, check_written(), then commit_manifest(..., cleanup=True), which also
        removes the save's files when it is certain nothing was committed

The rule every error path follows: a save's files are deleted only when the coordinator has read the
manifest back and knows that no committed manifest refers to them. An error raised after the manifest
reached storage (the directory fsync after link() failing, a retried create-only PUT whose first attempt
landed answered with 412) is resolved by reading the manifest back: if it holds this save's save_id and
its checksum is good, the save is committed and returns normally (the late error is logged); if the
read-back itself fails, the state is unknown and every file is kept (gc removes them later if they turn
out to be uncommitted).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from shardckpt.lifecycle import deleter
from shardckpt.errors import CheckpointError, CheckpointExistsError, SaveError, error_text
from shardckpt.format.records import MANIFEST_NAME, data_file_name, index_file_name
from shardckpt.format.parse import parse_manifest
from shardckpt.storage import Storage

log = logging.getLogger("shardckpt")

# The write summary a rank sends (write_rank's RankFiles fields), and what the manifest's file entry keeps.
SUMMARY_FIELDS = ("data_size", "index_size", "index_crc32c", "chunks", "raw_bytes", "elements")


@dataclass(frozen=True)
class CommitOutcome:
    """What commit_manifest (or finish) found. `committed`: the manifest at the path is this save's.
    When not committed, `certain` says whether it is known that nothing of this save was committed (only
    then may its files be deleted) and `exists` whether another checkpoint already holds the path."""
    committed: bool
    certain: bool = True
    exists: bool = False
    message: str = ""
    rank: int = 0

    def to_json(self) -> dict:
        return {"committed": self.committed, "certain": self.certain, "exists": self.exists,
                "message": self.message, "rank": self.rank}

    @classmethod
    def from_json(cls, obj: dict) -> "CommitOutcome":
        return cls(bool(obj["committed"]), bool(obj["certain"]), bool(obj["exists"]), str(obj["message"]),
                   int(obj["rank"]))


def file_entry(save_id: str, rank: int, summary: dict) -> dict:
    """The manifest's entry for one rank's files, from the summary the rank's write produced."""
    entry = {"rank": rank, "data": data_file_name(save_id, rank), "data_size": summary["data_size"],
             "index": index_file_name(save_id, rank), "index_size": summary["index_size"],
             "index_crc32c": summary["index_crc32c"], "chunks": summary["chunks"], "raw_bytes": summary["raw_bytes"]}
    if summary.get("bases") is not None:  # a hashed save (FORMAT.md §7); the coordinator pops "bases"
        entry.update({k: summary[k] for k in ("ref_chunks", "ref_raw_bytes", "ref_stored_bytes", "bases")})
    return entry


def check_written(written: int, total: int, what: str = "the tensors hold") -> str | None:
    """None if the ranks wrote exactly the elements the state holds, else why not (a coverage failure)."""
    if written == total:
        return None
    return f"ranks wrote {written} elements, {what} {total} (inconsistent layouts?)"


def read_back(storage: Storage, save_id: str) -> CommitOutcome:
    """After an error of commit: whose manifest is at the path. Coordinator only."""
    url = f"{storage.url}/{MANIFEST_NAME}"
    try:
        data = storage.read_file(MANIFEST_NAME)
    except FileNotFoundError:
        return CommitOutcome(False, certain=True, message="no manifest was written")
    except Exception as e:
        return CommitOutcome(False, certain=False, message=f"the manifest could not be read back "
                                                            f"({error_text(e, 300)})")
    try:
        found = parse_manifest(data, file=url)
    except CheckpointError as e:  # a torn or corrupt manifest is no checkpoint, but it might be a partial ours
        return CommitOutcome(False, certain=False, message=f"the manifest read back is not valid "
                                                            f"({error_text(e, 300)})")
    if found.save_id == save_id:
        return CommitOutcome(True)
    return CommitOutcome(False, certain=True, exists=True,
                         message=f"another save ({found.save_id}) committed this path")


def _old_save_id(storage: Storage) -> str | None:
    """The save_id of the checkpoint a replacing commit will supersede (None if none, or unreadable)."""
    try:
        return parse_manifest(storage.read_file(MANIFEST_NAME), file=storage.url).save_id
    except Exception:
        return None


def commit_manifest(storage: Storage, manifest: bytes, save_id: str, *, has_files: bool = True,
                    replace: bool = False, cleanup: bool = False) -> CommitOutcome:
    """Coordinator only, once per save, the last step: make the data directory durable and write the
    manifest (create-only, or with `replace` atomically replacing a committed one, whose data the deleter
    frees only once the new manifest is durable and no committed sibling refers to it). Never raises for a
    storage failure: the outcome says whether the save committed, read back from storage when anything
    went wrong. A write that failed and whose manifest is not there on reading back is certainly
    uncommitted only where a failed write cannot land later (Storage.settles_on_error: local files,
    memory://); on an object store a timed-out PUT may still land, so the outcome is unknown and every file
    is kept. With `cleanup`, a save that certainly did not commit has its data directory removed here (for
    callers without a per-rank cleanup)."""
    old = _old_save_id(storage) if replace else None
    try:
        if has_files:
            storage.sync_dir(f"data/{save_id}")
    except Exception as e:  # before the manifest write: nothing can have committed
        outcome = CommitOutcome(False, message=f"commit failed: {error_text(e)}")
    else:
        outcome = _write_manifest(storage, manifest, save_id, replace)
    if outcome.committed and old is not None and old != save_id:
        try:  # the superseded checkpoint's data, unless a committed sibling still refers to it
            deleter.free_replaced(storage, old)
        except Exception as e:
            log.warning("shardckpt: could not delete the replaced checkpoint's data data/%s under %s: %s",
                        old, storage.url, error_text(e))
    if cleanup and not outcome.committed and outcome.certain:
        deleter.drop_uncommitted(storage, save_id)
    return outcome


def _write_manifest(storage: Storage, manifest: bytes, save_id: str, replace: bool) -> CommitOutcome:
    """The commit point itself, and what it means when it raised (read back; see commit_manifest)."""
    from shardckpt._faults import fault_point
    try:
        fault_point("manifest", 0)
        if replace:
            storage.replace(MANIFEST_NAME, manifest)
        else:
            storage.commit(MANIFEST_NAME, manifest)
        return CommitOutcome(True)
    except CheckpointExistsError as e:
        outcome = read_back(storage, save_id)
        if outcome.committed:
            return outcome
        return CommitOutcome(False, certain=outcome.certain, exists=True, message=str(e))
    except Exception as e:
        outcome = read_back(storage, save_id)
        if outcome.committed:
            log.warning("shardckpt: the commit of %s reported %s after the manifest was in place; the manifest "
                        "read back is this save's, so the checkpoint is committed", storage.url, error_text(e))
            return outcome
        if outcome.certain and not outcome.exists:
            if storage.settles_on_error:
                return CommitOutcome(False, message=f"commit failed: {error_text(e)}")
            return CommitOutcome(False, certain=False, message=f"commit failed: {error_text(e)}; the manifest is "
                                 f"not there now, but a write that failed on this store may still land later")
        return CommitOutcome(False, certain=outcome.certain, exists=outcome.exists,
                             message=f"commit failed: {error_text(e)}; {outcome.message}")


def raise_for(outcome: CommitOutcome, storage: Storage) -> None:
    """The typed error for a save that did not commit, the same on every rank."""
    if outcome.committed:
        return
    if outcome.exists:
        raise CheckpointExistsError(f"save failed, nothing was committed: {outcome.message}", file=storage.url,
                                    rank=outcome.rank)
    if outcome.certain:
        raise SaveError(f"save failed, nothing was committed: {outcome.message}", file=storage.url,
                        rank=outcome.rank)
    err = SaveError(f"save failed and whether it committed is unknown; its files were kept (shardckpt gc "
                    f"removes them once they are known to be uncommitted): {outcome.message}",
                    file=storage.url, rank=outcome.rank)
    err.outcome_unknown = True
    raise err


def finish(comm, storage: Storage, save_id: str, summary: dict, *, total_elements: int,
           build: Callable[[list[dict]], bytes], replace: bool = False) -> bytes | None:
    """All ranks, after writing: gather the write summaries, let the coordinator commit, agree on the
    outcome, clean up only what is certainly uncommitted, and raise the same typed error on every rank.

    Args:
        comm: the save's dist.Comm.
        summary: this rank's {"rank", "ok", and SUMMARY_FIELDS | "error"} (no files: no data_size).
        total_elements: elements of all the state's tensors (each must be written exactly once).
        build: coordinator only: manifest bytes from the list of file entries.
        replace: coordinator only: atomically replace the committed manifest at the path (overwrite=True).

    Returns:
        On the coordinator the committed manifest's bytes, elsewhere None.
    """
    from shardckpt._faults import fault_point
    records = comm.gather_json(summary)
    committed = None
    outcome = None
    if comm.is_coordinator:
        outcome, committed = _coordinate(storage, save_id, records, total_elements, build, replace)
        if outcome.committed:
            fault_point("committed", 0)
    else:
        fault_point("manifest", comm.rank)
    outcome = CommitOutcome.from_json(comm.broadcast_json(None if outcome is None else outcome.to_json()))
    if not outcome.committed:
        if outcome.certain:
            deleter.drop_uncommitted(storage, save_id, comm.rank)
        raise_for(outcome, storage)
    return committed


def _coordinate(storage, save_id, records, total_elements, build, replace=False) -> tuple[CommitOutcome, bytes | None]:
    bad = next((r for r in records if not r["ok"]), None)
    if bad:
        return CommitOutcome(False, message=f"rank {bad['rank']}: {bad['error']}", rank=bad["rank"]), None
    problem = check_written(sum(r.get("elements", 0) for r in records), total_elements)
    if problem:
        return CommitOutcome(False, message=problem), None
    files = [file_entry(save_id, r["rank"], r) for r in records if "data_size" in r]
    try:
        manifest = build(files)
    except Exception as e:
        return CommitOutcome(False, message=f"building the manifest failed: {error_text(e)}"), None
    outcome = commit_manifest(storage, manifest, save_id, has_files=bool(files), replace=replace)
    return outcome, (manifest if outcome.committed else None)
