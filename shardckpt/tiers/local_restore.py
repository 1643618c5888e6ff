"""Restoring from the node-local tier (shardckpt.tiers, FORMAT.md §8): what each node holds, which step the
surviving nodes can assemble, loading it through the exchange restricted to the ranks whose node holds each
file, and finding the intact copies after a corrupt one.

Who calls what, and when (every rank of the group, collectively, from LocalTier.restore):
  held(storage)            this rank's listing of its node's dir, all-gathered by gather_listings
  choose_local(recs, ...)  pure: the newest step the listings assemble, not older than the durable latest
  load_local(...)          metadata read by holders and all-gathered, then exchange.run with `holders`
  good_copies(...)         after a failed load_local: every frame of each node's copies checked, the
                           corrupt ones dropped from `holders`
"""
from __future__ import annotations

import json
import logging
import struct

from shardckpt.errors import error_text
from shardckpt.errors import ChecksumError, CorruptDataError, FormatError, StorageError, error_from, error_record
from shardckpt.format.records import MANIFEST_NAME
from shardckpt.format.parse import parse_manifest
from shardckpt.lifecycle.layout import STEP_DIR, step_dir

log = logging.getLogger("shardckpt")

# what a damaged local copy raises when restored (a corrupt frame, a short or missing file, a bad index)
COPY_ERRORS = (ChecksumError, CorruptDataError, FormatError, StorageError, OSError)
SET_ASIDE = ".set-aside"  # markers step-<N>.<save_id> of an abandoned timeline's steps (tiers.set_aside_newer)


def set_aside(storage) -> set[tuple[int, str]]:
    """(step, save_id) of the local steps set aside in this node's dir: restores ignore them."""
    out = set()
    for name in storage.list_dir(SET_ASIDE):
        step, _, sid = name.partition(".")
        m = STEP_DIR.match(step)
        if m and sid:
            out.add((int(m.group(1)), sid))
    return out


def held(storage) -> dict:
    """Every rank, at a local restore: this node's committed local steps, {step: {"id": save_id, "files":
    [rank of each manifest file entry], "held": [those whose data (of the manifest's size) and index files
    this dir holds]}}."""
    out = {}
    try:
        aside = set_aside(storage)
        names = storage.list_dir("")
    except Exception as e:  # this node's dir cannot be listed: it holds nothing a restore can use
        log.warning("shardckpt: local dir %s cannot be listed (%s); not restoring from it", storage.url,
                    error_text(e, 300))
        return out
    for name in names:
        m = STEP_DIR.match(name)
        if not m or not storage.exists(f"{name}/{MANIFEST_NAME}"):
            continue
        try:
            man = parse_manifest(storage.read_file(f"{name}/{MANIFEST_NAME}"), file=name)
            if (int(m.group(1)), man.save_id) in aside:
                continue  # an abandoned timeline's step: never restored
            held = []
            for f in man.files:
                d = f"{name}/{f.data}"
                if storage.exists(d) and storage.size(d) == f.data_size \
                        and storage.exists(f"{name}/{f.index}"):
                    held.append(f.rank)
            out[str(int(m.group(1)))] = {"id": man.save_id, "files": [f.rank for f in man.files], "held": held}
        except Exception as e:  # an unreadable step on this node counts as not held here
            log.warning("shardckpt: local step %s/%s is unreadable (%s); not restoring from it",
                        storage.url, name, error_text(e, 300))
    return out


def choose_local(recs: list[dict], durable: int | None) -> tuple[int, dict[int, list[int]]] | None:
    """The local step to restore, from every rank's listing (held): the newest one whose manifest
    every listing that has it agrees on (one save_id), whose every file some rank holds, and that is not
    older than the durable tier's latest. Returns (step, {manifest file index: holding ranks}) or None.
    Pure: every rank computes the same answer from the same all-gathered listings."""
    steps = sorted({int(s) for r in recs for s in r["steps"]}, reverse=True)
    for step in steps:
        if durable is not None and step < durable:
            return None
        have = [(rank, r["steps"][str(step)]) for rank, r in enumerate(recs) if str(step) in r["steps"]]
        if len({h["id"] for _, h in have}) != 1:
            continue  # nodes disagree about what step N is (a replaced attempt): not assembled from here
        files = have[0][1]["files"]
        entries: dict[int, list[int]] = {}  # saving rank -> its manifest file entries
        for i, fr in enumerate(files):
            entries.setdefault(fr, []).append(i)
        alike: dict[int, tuple[list, list[int]]] = {}  # a node's ranks share one "held" (merge_listings)
        for rank, h in have:
            alike.setdefault(id(h["held"]), (h["held"], []))[1].append(rank)
        holders: dict[int, list[int]] = {i: [] for i in range(len(files))}
        for held_files, ranks in alike.values():  # O(ranks + nodes x files a node holds)
            for fr in set(held_files):
                for i in entries.get(fr, ()):
                    holders[i].extend(ranks)
        holders = {i: sorted(rs) for i, rs in holders.items()}
        if files and all(holders.values()):
            return step, holders
    return None


def gather_listings(comm, listing: dict) -> list[dict]:
    """All ranks, at a local restore: every rank's listing (held), as choose_local takes them, for
    O(ranks) bytes per rank: sent digests first (Comm.all_gather_distinct) in two parts (listing_parts),
    instead of every rank's whole listing to every rank."""
    files, own = listing_parts(listing)
    return merge_listings(comm.all_gather_distinct(files), comm.all_gather_distinct(own))


def listing_parts(listing: dict) -> tuple[bytes, bytes]:
    """A listing's two records: each step's manifest file list (the same on every node that has the
    step: sent once) and what this node holds (the same on its ranks: sent once a node, a few entries)."""
    return (json.dumps({s: h["files"] for s, h in listing.items()}).encode(),
            json.dumps({s: {"id": h["id"], "held": h["held"]} for s, h in listing.items()}).encode())


def merge_listings(files: list[bytes], own: list[bytes]) -> list[dict]:
    """Every rank's listing from the records all_gather_distinct returned (each distinct one parsed once)."""
    parsed: dict[bytes, dict] = {}

    def parse(b: bytes) -> dict:
        if b not in parsed:
            parsed[b] = json.loads(b)
        return parsed[b]
    merged: dict[tuple[int, int], dict] = {}  # a node's ranks share one listing
    out = []
    for f, h in zip(files, own):
        rec = merged.get((id(f), id(h)))
        if rec is None:
            fs, hs = parse(f), parse(h)
            rec = merged[(id(f), id(h))] = {"steps": {s: {"id": v["id"], "held": v["held"], "files": fs[s]}
                                                      for s, v in hs.items()}}
        out.append(rec)
    return out


def load_local(tier, state, comm, step: int, holders: dict[int, list[int]]) -> None:
    """All ranks: the metadata read by holders (manifest by the first, each index by one of its file's
    holders), all-gathered, then the exchange restricted to holders."""
    from shardckpt.loading.state import load_training_state_from
    path = tier.storage.child(step_dir(step))
    have = [r for rs in holders.values() for r in rs]
    first = min(have)
    parts: list[tuple[int, bytes]] = []  # (-1 for the manifest | file index, bytes)
    record = None
    try:
        if comm.rank == first:
            parts.append((-1, path.read_file(MANIFEST_NAME)))
        man = parse_manifest(path.read_file(MANIFEST_NAME), file=path.url) if any(
            comm.rank == hs[i % len(hs)] for i, hs in holders.items()) else None
        for i, hs in holders.items():
            if hs[i % len(hs)] == comm.rank:
                parts.append((i, path.read_file(man.files[i].index)))
    except Exception as e:
        record = error_record(e, comm.rank)
    head = json.dumps({"error": record} if record else {"parts": [[i, len(b)] for i, b in parts]}).encode()
    # each index once, the manifest once (not ranks x the longest part, as a padded all-gather would)
    blobs = comm.all_gather_distinct(struct.pack("<I", len(head)) + head + b"".join(b for _, b in parts))
    got: dict[int, bytes] = {}
    for b in blobs:
        (n,) = struct.unpack_from("<I", b)
        h = json.loads(b[4:4 + n])
        if "error" in h:
            raise error_from(h["error"])
        pos = 4 + n
        for i, k in h["parts"]:
            got[i] = b[pos:pos + k]
            pos += k
    manifest = parse_manifest(got[-1], file=f"{path.url}/{MANIFEST_NAME}")
    index_data = [got[i] for i in range(len(manifest.files))]
    load_training_state_from(state, path, comm, (manifest, index_data), holders=holders)


def good_copies(tier, comm, step: int, holders: dict[int, list[int]], error: Exception):
    """Every rank, after a local restore of `step` failed with `error`: each node's ranks check every
    frame of the copies their node holds (verify.verify_checkpoint, the node's files split among them)
    and the corrupt ones are dropped. Returns the holders left when that dropped some and every file
    still has an intact copy (restore then uses those, saying so), else None."""
    from shardckpt.loading.verify import verify_checkpoint
    nodes = tier._nodes(comm)
    members = nodes.members(nodes.node_of[comm.rank])
    path = tier.storage.child(step_dir(step))
    try:
        man = parse_manifest(path.read_file(MANIFEST_NAME), file=path.url)
        index_of = {name: i for i, f in enumerate(man.files) for name in (f.data, f.index)}
        report = verify_checkpoint(path, full=True, progress=False, rank=members.index(comm.rank),
                                   world_size=len(members))
        bad = sorted({(index_of[p.file], man.files[index_of[p.file]].rank) for p in report.problems
                      if p.kind != "missing_file" and p.file in index_of})
    except Exception:  # this node's copy of the step cannot be read at all: none of its files count
        bad = [(i, None) for i in sorted(holders)]
    recs = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(bad).encode())]
    bad_on: dict[int, dict[int, int | None]] = {n: {} for n in range(nodes.count)}
    for r, b in enumerate(recs):
        bad_on[nodes.node_of[r]].update({i: saver for i, saver in b})
    left = {i: [r for r in hs if i not in bad_on[nodes.node_of[r]]] for i, hs in holders.items()}
    if left == holders or not all(left.values()):
        return None
    dropped = sorted(f"rank {saver}'s files on node {n}" for n, b in bad_on.items() for i, saver in b.items()
                     if any(nodes.node_of[r] == n for r in holders.get(i, ())))
    log.warning("shardckpt: local step %d: %s; the copies %s are corrupt, restoring from the other copies",
                step, error_text(error, 300), ", ".join(dropped))
    tier.corrupt_copies = dropped
    return left
