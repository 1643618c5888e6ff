"""The node-local tier: frequent checkpoints on each node's own disk, each rank's files also held by peers on
other nodes, restored (onto any world size and layout) from whichever nodes survive (docs/FORMAT.md,
"Local tier").

Who calls what, and when (every rank of the group, collectively):
  LocalTier.save(step, state) / save_async(step, state)  a local save: an ordinary save into
      local_root/step-<N>/ on this node's disk (saving.pipeline.prepare, then _commit: pipeline.write_and_commit), with
      replication between the write and the commit round: every rank streams its data and index files to
      its peers (the same local rank on the nodes `jump`, 2*jump, ... further on; shardckpt.tiers.replicas, in
      bounded rounds over all_to_all) and writes the files it receives under the same names in its own
      node's dir. Only then does commit.finish run (a rank dying while writing or replicating fails the
      save on every rank, nothing is committed). The coordinator commits manifest.json in its node's dir;
      its bytes are broadcast and local rank 0 of every other node commits the same bytes in its own
      (replicas.mirror). Then each node's local rank 0 applies retention and gc to its own dir. save_async
      returns after the snapshot (the stall of an async save) and runs all of that on the group's
      background thread (async_save.start), which CheckpointManager(async_save=True) uses.
  LocalTier.promote(step, durable_root) / promote_async  the durable save of a step the local tier already
      holds: every rank uploads its own local files unchanged (no second snapshot, no second encode) and
      the coordinator commits the same manifest bytes there (commit.finish); promote_async queues it on
      the background thread behind the local save (async_save.after_saves). When the local save was told
      (upload_to=) that a promotion follows, each rank's upload starts on the tier's uploader thread as soon
      as its files are written, while replication and the local commit run; promote then waits for it.
  LocalTier.restore(state, durable_root)  every rank lists the committed steps its node's dir holds and which
      rank files of each; the newest step that the surviving dirs hold completely, and not older than the
      durable tier's latest, is restored through the exchange (exchange.run with `holders`: each file is
      fetched from its holders' own disks and sent to the ranks that need it; shardckpt.tiers.local_restore);
      else the durable tier's latest.

Nothing records which node holds which file: a restore learns it from the listings, so a lost node's dir
simply does not answer.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from shardckpt.format.records import DEFAULT_FRAME_SIZE
from shardckpt.saving import pipeline
from shardckpt.lifecycle import commit
from shardckpt import dist as sdist
from shardckpt.tiers import local_restore
from shardckpt.errors import error_text
from shardckpt.errors import CheckpointExistsError, SaveError, StorageError
from shardckpt.format.records import MANIFEST_NAME, data_file_name, index_file_name
from shardckpt.format.parse import parse_manifest
from shardckpt.lifecycle.deleter import DEFAULT_GC_GRACE_S, drop_uncommitted, gc_uncommitted, retire
from shardckpt.lifecycle.layout import committed_steps, step_dir
from shardckpt.tiers.replicas import Nodes, copy_file, mirror, node_map, replicate
from shardckpt.storage import storage_for

log = logging.getLogger("shardckpt")


class LocalTier:
    """One run's node-local tier. `local_root` is the same string on every node and names each node's own
    (never shared) directory. Created by CheckpointManager (local_root=...) or directly; every method is
    collective over `process_group`."""

    def __init__(self, local_root, *, keep_last: int | None = 2, replicas: int = 1, jump: int = 1,
                 process_group=None, timeout_s: float | None = None, codec: str = "auto",
                 gc_grace_s: float = DEFAULT_GC_GRACE_S):
        if replicas < 0 or jump < 1:
            raise ValueError("local_replicas must be >= 0 and the peer jump >= 1")
        self.root = local_root
        self.storage = storage_for(local_root)
        self.keep_last, self.replicas, self.jump = keep_last, replicas, jump
        self.process_group, self.timeout_s, self.codec = process_group, timeout_s, codec
        self.gc_grace_s = gc_grace_s
        self.restored: tuple[str, int] | None = None  # ("local" | "durable", step) of the last restore
        self._node_map: Nodes | None = None
        self.corrupt_copies: list[str] = []  # the local copies the last restore found corrupt and skipped
        self._uploads: dict[int, tuple[str, Future]] = {}  # step -> (save_id, upload of this rank's files)
        self._uploader: ThreadPoolExecutor | None = None
        # on_retired(step, url): called after local retention deleted a step on this node (CheckpointManager
        # queues its "deleted" event); on the thread that ran the save
        self.on_retired = None
        self._abandoned: set[tuple[int, str]] = set()  # (step, save_id) set aside by this process's restore

    def _comm(self):
        return sdist.comm_for(self.process_group, self.timeout_s)

    # -------------------------------------------------------------------------------------- save

    def _nodes(self, comm) -> Nodes:
        """Every rank's node (collective the first time; nodes do not change during a job)."""
        if self._node_map is None:
            self._node_map = node_map(comm)
        return self._node_map

    def save(self, step: int, state, metadata: dict | None = None, *, upload_to=None):
        """Save `state` as local step `step` (every rank, blocking; replaces a local step of that number left
        by an earlier attempt). `upload_to`: the durable root a promote of this step will follow to; this
        rank's files start uploading there as soon as they are written, while replication runs (promote
        then waits for that upload instead of starting one). Returns the committed Manifest. Raises
        SaveError on every rank if any failed."""
        comm = self._comm()
        self._nodes(comm)
        p = pipeline.prepare(state, self.storage.child(step_dir(step)), process_group=self.process_group,
                         timeout_s=self.timeout_s, stage=False, pool=None, **self._prepare_kw(metadata))
        dst = _step_storage(upload_to, step)
        return self._commit_or_drop(p, step, dst)

    def save_async(self, step: int, state, metadata: dict | None = None, *, upload_to=None):
        """Like save, but return once `state` is snapshotted (shardckpt.saving.async_save's staging pools and
        background thread): the write, the replication to peers, the commit on every node and the local
        retention run in the background. Returns an AsyncSaveHandle (wait() gives the Manifest or raises
        the save's error on every rank)."""
        from shardckpt.saving.async_save import start
        self._nodes(self._comm())
        dst = _step_storage(upload_to, step)
        return start(state, self.storage.child(step_dir(step)), lambda p: self._commit_or_drop(p, step, dst),
                     process_group=self.process_group, timeout_s=self.timeout_s, **self._prepare_kw(metadata))

    def _prepare_kw(self, metadata: dict | None) -> dict:
        return dict(codec=self.codec, frame_size=DEFAULT_FRAME_SIZE, metadata=metadata, storage_options=None,
                    overwrite=True)

    def _commit_or_drop(self, p, step: int, upload_dst=None):
        """_commit, and when it fails, this rank's early upload for the promotion is removed right there
        (no promotion follows a failed save), on the thread that ran the save: before its error reaches
        the caller, so a job that exits on that error leaves no uploaded files behind."""
        try:
            return self._commit(p, step, upload_dst)
        except BaseException:
            if upload_dst is not None:
                _drop_upload(self._uploads.pop(step, None), upload_dst, p.comm.rank)
            raise

    def _commit(self, p, step: int, upload_dst=None):
        """Every rank, on the save's comm (the caller's thread for save, the background one for save_async):
        write, replicate to peers (and upload this rank's files to the durable step dir `upload_dst`
        meanwhile, on the tier's uploader thread), commit, mirror the manifest on every node, retention per
        node."""
        nodes = self._node_map

        def after_write(summary: dict) -> dict:
            if upload_dst is not None and summary["ok"] and "data_size" in summary:
                try:
                    self._upload_early(step, p.storage, upload_dst, p.save_id, p.comm.rank)
                except Exception as e:  # into the commit round like any write error: every rank goes on
                    summary = {"rank": p.comm.rank, "ok": False, "error": f"starting the upload: {error_text(e)}"}
            return replicate(p.comm, p.storage, p.save_id, nodes, self.replicas, self.jump, summary)
        manifest = pipeline.write_and_commit(p, after_write=after_write)
        mirror(p.comm, nodes, p.storage, p.save_id)
        if nodes.local_rank(p.comm.rank) == 0:
            self._retain(step)
        return manifest

    def _upload_early(self, step: int, src, dst, save_id: str, rank: int) -> None:
        """This rank, once its local files of `step` are written: start uploading them to the durable step
        dir `dst` on the uploader thread (no collectives); promote(step) waits for it."""
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-upload")
        self._uploads[step] = (save_id, self._uploader.submit(_upload_own, src, dst, save_id, rank))

    def _retain(self, step: int) -> None:
        """Local rank 0 of each node, after a local commit: the steps of an abandoned timeline (set aside
        by a restore) go now that this run committed a step of its own, then keep_last per node's dir, then
        gc leftovers."""
        try:
            self._drop_set_aside()
            steps = committed_steps(self.storage)
            if self.keep_last:
                for old in steps[:-self.keep_last]:
                    retire(self.storage, step_dir(old), self.gc_grace_s)
                    if self.on_retired is not None:
                        self.on_retired(old, self.storage.child(step_dir(old)).url)
            gc_uncommitted(self.storage, dry_run=False, grace_s=self.gc_grace_s, exclude=[step])
        except Exception as e:  # retention never fails a save that committed
            log.warning("shardckpt: local retention under %s failed: %s", self.storage.url, error_text(e))

    # -------------------------------------------------------------------------------------- promote

    def promote(self, step: int, durable_root, storage_options: dict | None = None, *, exist_ok: bool = False,
                comm=None, after=None):
        """Every rank: make local step `step` a durable checkpoint at durable_root/step-<N> by uploading this
        rank's own local files unchanged (replicas.copy_file, piece by piece) and committing the same
        manifest bytes (same save_id, same names). `comm`: the background group's when run behind an async
        local save (promote_async). The files a save(upload_to=) of this step began uploading are waited
        for instead of uploaded again. `after`: the handle of the async local save of this step; if it
        failed, nothing is promoted and None is returned (every rank alike, no collective; the local
        save's error is the one the job sees). Returns the committed Manifest (None on the other ranks, and
        when the durable step is committed already and exist_ok; else that raises CheckpointExistsError,
        before anything is uploaded). Raises SaveError on every rank if any upload failed (the uploaded
        files are then removed)."""
        comm = comm or self._comm()
        src = self.storage.child(step_dir(step))
        dst = _step_storage(durable_root, step, storage_options)
        early = self._uploads.pop(step, None)
        if after is not None and after.exception() is not None:  # every rank saw the local save fail
            _drop_upload(early, dst, comm.rank)  # that failure is the error the job sees, not a second one
            log.warning("local step %d did not commit; not promoting it to %s", step, dst.url)
            return None
        data, summary, sid = None, {"rank": comm.rank, "ok": True, "elements": 0}, None
        exists, listed = False, b""  # listed[r]: whether rank r has files in the manifest (so must upload)
        if comm.is_coordinator:  # the coordinator's node committed first; other nodes' copies may still be landing
            try:
                exists = dst.exists(MANIFEST_NAME)
                data = src.read_file(MANIFEST_NAME)
                man = parse_manifest(data, file=f"{src.url}/{MANIFEST_NAME}")
                sid, ranks = man.save_id, {f.rank for f in man.files}
                listed = bytes(r in ranks for r in range(comm.world_size))
                if man.world_size != comm.world_size:
                    raise SaveError(f"local step saved by {man.world_size} ranks, this group has {comm.world_size}; "
                                    f"its files cannot be promoted by this group", file=src.url)
            except Exception as e:
                summary = {"rank": 0, "ok": False, "error": f"local step {src.url}: {error_text(e)}"}
        sid, exists, n = comm.broadcast_json([sid, exists, len(listed)])
        listed = comm.broadcast_bytes(listed, n) if n else b""
        if early is not None and (exists or early[0] != sid):  # files of a save that is not the one promoted
            _drop_upload(early, dst, comm.rank)
            early = None
        if exists:  # before any upload: same-named files may belong to the committed step (a retried promotion)
            if exist_ok:
                log.warning("step %d is already committed under %s; not promoting it again", step, dst.url)
                return None
            raise CheckpointExistsError("a committed checkpoint already exists here", file=dst.url)
        sid = sid or ""
        try:
            if early is not None:
                early[1].result()
            elif listed and listed[comm.rank]:  # a rank that owned no data has no files
                if not src.exists(data_file_name(sid, comm.rank)):
                    raise StorageError("this rank's local file of the step is missing (a replaced or wiped node?)",
                                       file=f"{src.url}/{data_file_name(sid, comm.rank)}", rank=comm.rank)
                _upload_own(src, dst, sid, comm.rank)
        except Exception as e:
            summary = {"rank": comm.rank, "ok": False, "error": error_text(e)}
        committed = commit.finish(comm, dst, sid, summary, total_elements=0, build=lambda files: data)
        return None if committed is None else parse_manifest(committed, file=f"{dst.url}/{MANIFEST_NAME}")

    def promote_async(self, step: int, durable_root, storage_options: dict | None = None, *,
                      exist_ok: bool = False, after=None):
        """promote on the group's background thread, behind the async local save of `step` (every rank,
        after save_async; `after`: that save's handle). Returns an AsyncSaveHandle whose wait() gives the
        Manifest (coordinator) or None."""
        from shardckpt.saving.async_save import after_saves
        url = _step_storage(durable_root, step, storage_options).url
        return after_saves(url, lambda comm: self.promote(step, durable_root, storage_options, exist_ok=exist_ok,
                                                          comm=comm, after=after),
                           process_group=self.process_group, timeout_s=self.timeout_s)

    # -------------------------------------------------------------------------------------- restore

    def restore(self, state, durable_root=None, *, storage_options: dict | None = None,
                load_durable: bool = True) -> int | None:
        """Every rank: restore the newest step that can be assembled, from the local tier (own files plus
        peer replicas of the surviving nodes) when it is at least as new as the durable tier's latest, else
        from the durable tier (unless not `load_durable`: then None, and the caller restores it, as
        CheckpointManager.restore does with its verification and fallbacks). Sets self.restored to
        (tier, step) and logs it. Returns the step, or None."""
        from shardckpt.loading.state import load_training_state
        comm = self._comm()
        self.corrupt_copies = []

        def durable_latest():  # coordinator; a listing error raises on every rank at once
            steps = [] if durable_root is None else committed_steps(durable_root, storage_options=storage_options)
            return steps[-1] if steps else None
        durable = comm.from_coordinator(durable_latest)
        recs = local_restore.gather_listings(comm, local_restore.held(self.storage))
        pick = local_restore.choose_local(recs, durable)
        if pick is not None:
            step, holders = pick
            while True:
                try:
                    local_restore.load_local(self, state, comm, step, holders)
                    return self._done("local", step, comm)
                except Exception as e:  # every rank fails with it (the loaders agree on failures)
                    error = e
                # only a bad copy is worth checking every frame for (not a key the state lacks); the ranks
                # agree, since the failing rank raises its own error and the others a rebuilt one
                if not comm.any_flag(isinstance(error, local_restore.COPY_ERRORS)):
                    break
                good = local_restore.good_copies(self, comm, step, holders, error)
                if good is None:
                    break
                holders = good  # every file still has an intact copy: restore from those
            if durable is None:
                raise error
            log.warning("shardckpt: restoring local step %d failed (%s); restoring durable step %d instead",
                        step, error_text(error, 300), durable)
        if durable is None or not load_durable:
            self.restored = None
            return None
        load_training_state(state, _step_storage(durable_root, durable, storage_options),
                            process_group=self.process_group)
        return self._done("durable", durable, comm)

    def _done(self, tier: str, step: int, comm) -> int:
        self.restored = (tier, step)
        log.info("shardckpt: restored step %d from the %s tier", step, tier)
        self.set_aside_newer(step, comm)
        return step

    def set_aside_newer(self, step: int, comm=None) -> None:
        """Every rank, after a restore of `step` (restore; CheckpointManager.restore after a durable one):
        local steps newer than it belong to an abandoned timeline (incomplete, unreadable for now, or not
        chosen). Each node's local rank 0 sets them aside: a marker `.set-aside/step-<N>.<save_id>` makes
        every later restore ignore them, and they are deleted only once this run has committed a local step
        of its own (_retain), never because of the restore: the error that made it fall back may have been
        transient. A replaced step (same number, new save_id) is not affected by an old marker."""
        comm = comm or self._comm()
        if self._nodes(comm).local_rank(comm.rank) != 0:
            return
        try:
            for newer in [s for s in committed_steps(self.storage) if s > step]:
                sid = parse_manifest(self.storage.read_file(f"{step_dir(newer)}/{MANIFEST_NAME}"),
                                     file=step_dir(newer)).save_id
                self._abandoned.add((newer, sid))
                self.storage.write_file(f"{local_restore.SET_ASIDE}/{step_dir(newer)}.{sid}", b"")
        except Exception as e:  # a step not marked here is still dropped by this run's next commit
            log.warning("shardckpt: could not set aside local steps newer than %d under %s: %s", step,
                        self.storage.url, error_text(e))

    def _drop_set_aside(self) -> None:
        """Local rank 0, after this run committed a local step: delete the set-aside steps (the markers'
        and this process's own record), each only while the step still holds the abandoned save_id."""
        marked = local_restore.set_aside(self.storage) | self._abandoned
        for newer, sid in sorted(marked):
            try:
                current = parse_manifest(self.storage.read_file(f"{step_dir(newer)}/{MANIFEST_NAME}"),
                                         file=step_dir(newer)).save_id
            except FileNotFoundError:
                current = None
            if current == sid:
                retire(self.storage, step_dir(newer), self.gc_grace_s)
                if self.on_retired is not None:
                    self.on_retired(newer, self.storage.child(step_dir(newer)).url)
            self.storage.delete(f"{local_restore.SET_ASIDE}/{step_dir(newer)}.{sid}")
            self._abandoned.discard((newer, sid))

def _step_storage(root, step: int, storage_options: dict | None = None):
    """root/step-<N> of a durable root as a Storage (None for no root): where a promotion of `step` commits
    and a durable restore of it reads."""
    return None if root is None else storage_for(root, storage_options).child(step_dir(step))


def _upload_own(src, dst, save_id: str, rank: int) -> None:
    """This rank's data and index files of one local step uploaded unchanged to the durable step dir."""
    for name in (data_file_name(save_id, rank), index_file_name(save_id, rank)):
        copy_file(src, dst, name)
    dst.sync_dir(f"data/{save_id}")


def _drop_upload(early, dst, rank: int) -> None:
    """An early upload that will not be committed: wait for it, then delete what it wrote. Its save_id is a
    fresh local save's, so no committed manifest can refer to those files."""
    if early is None:
        return
    save_id, future = early
    try:
        future.result()
    except Exception:
        pass
    drop_uncommitted(dst, save_id, rank)
