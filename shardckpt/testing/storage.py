"""The storage conformance suite: the contract of shardckpt.storage.base.Storage as tests, for anyone writing a
backend (modelled on zarr's StoreTests). Subclass StorageConformance in a pytest test module and give it a
`storage` fixture that yields an empty Storage of your backend (and cleans it up):

    from shardckpt.testing.storage import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        def storage(self, tmp_path):
            yield MyStorage(...)

Class attributes tune it to a backend: `large_size` (bytes of the multi-part round trip), `reports_mtime`
(False if mtime() is always None), `supports_replace` (False if replace() is base.py's refusal). The exception types asserted here are the ones base.py pins for each method.
shardckpt's own backends run it in tests/test_storage.py (LocalStorage in both direct-I/O modes, memory://,
file://, fakes of gcsfs and adlfs, and S3 on a real Ceph server). Needs pytest and numpy; never imported by
shardckpt itself.
"""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from shardckpt.errors import CheckpointExistsError, StorageError
from shardckpt.storage.base import ReadRange

MIB = 1 << 20


def payload(n: int, seed: int = 0) -> bytes:
    """`n` reproducible random bytes (they do not compress, so a store cannot shortcut them)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class StorageConformance:
    """The tests every Storage backend must pass. Subclasses define the `storage` fixture."""

    large_size = 12 * MIB + 12345  # more than one S3 part at every part size the fixtures use
    reports_mtime = True           # False for a backend whose mtime() is always None (gc then keeps all)
    supports_replace = True        # False for a backend that keeps base.py's replace() (it refuses)

    # --- whole files ---------------------------------------------------------------------------------------
    def test_write_read_file(self, storage):
        data = payload(1000)
        assert storage.write_file("index/r00000.idx", data) == 1000
        assert storage.read_file("index/r00000.idx") == data
        assert storage.exists("index/r00000.idx")
        assert storage.size("index/r00000.idx") == 1000

    def test_open_write_many_buffer_types(self, storage):
        parts = [b"abc", bytearray(b"defg"), memoryview(b"hij"), np.arange(5, dtype=np.uint8),
                 np.arange(3, dtype=np.float32), b""]
        w = storage.open_write("data/s1/r00000.bin")
        for p in parts:
            w.write(p)
        expected = b"".join(memoryview(p).cast("B").tobytes() for p in parts)
        assert w.close() == len(expected)
        assert storage.read_file("data/s1/r00000.bin") == expected

    def test_empty_file(self, storage):
        assert storage.write_file("empty", b"") == 0
        assert storage.read_file("empty") == b""
        assert storage.size("empty") == 0

    def test_open_write_replaces(self, storage):
        storage.write_file("f", b"old contents, longer")
        storage.write_file("f", b"new")
        assert storage.read_file("f") == b"new"

    def test_read_file_missing_is_file_not_found(self, storage):
        storage.write_file("present/other", b"1")
        for name in ("nope/manifest.json", "present/manifest.json", "manifest.json"):
            with pytest.raises(FileNotFoundError) as info:
                storage.read_file(name)
            assert not isinstance(info.value, StorageError)  # an answer, not a failure of the store
            assert not storage.exists(name)

    def test_size_missing_is_file_not_found(self, storage):
        with pytest.raises(FileNotFoundError):
            storage.size("nope")

    def test_write_after_close_or_abort_is_storage_error(self, storage):
        w = storage.open_write("closed.bin")
        w.write(b"abc")
        assert w.close() == 3
        with pytest.raises(StorageError, match="closed.bin"):
            w.write(b"more")
        assert storage.read_file("closed.bin") == b"abc"
        w = storage.open_write("aborted.bin")
        w.write(b"abc")
        w.abort()
        with pytest.raises(StorageError, match="aborted.bin"):
            w.write(b"more")
        with pytest.raises(StorageError, match="aborted.bin"):
            w.close()
        assert not storage.exists("aborted.bin")

    def test_absent_things_raise_nothing(self, storage):
        assert storage.exists("none/such") is False
        assert storage.list_dir("none") == [] and storage.list_files("none") == []
        storage.delete("none/such")
        storage.delete_tree("none")
        assert storage.mtime("none/such") is None

    def test_mtime(self, storage):
        before = time.time()
        storage.write_file("dated.bin", b"x")
        m = storage.mtime("dated.bin")
        if not self.reports_mtime:
            assert m is None
            return
        assert isinstance(m, float)
        assert before - 120 <= m <= time.time() + 120  # store clocks may be a little off ours

    def test_abort_leaves_no_file(self, storage):
        w = storage.open_write("data/aborted.bin")
        w.write(payload(1000))
        w.abort()
        w.abort()  # idempotent, never raises
        assert not storage.exists("data/aborted.bin")

    def test_close_after_abort_does_not_create_the_file(self, storage):
        w = storage.open_write("data/aborted.bin")
        w.write(b"partial")
        w.abort()
        try:
            w.close()
        except Exception:  # noqa: BLE001 -- raising is fine; claiming a complete file is not
            pass
        assert not storage.exists("data/aborted.bin")

    def test_large_file_round_trip(self, storage):
        data = payload(self.large_size, seed=1)
        w = storage.open_write("big.bin")
        view = memoryview(data)
        pos, rng = 0, random.Random(1)
        while pos < len(data):  # uneven writes: tiny, part-straddling and multi-part buffers
            n = rng.choice([1, 3, 4096, MIB + 7, 7 * MIB])
            w.write(view[pos:pos + n])
            pos += n
        assert w.close() == len(data)
        assert storage.size("big.bin") == len(data)
        assert storage.read_file("big.bin") == data
        # ranges straddling every MiB boundary, read into one buffer
        ranges = [ReadRange(k * MIB - 100, 200, i * 200) for i, k in enumerate(range(1, 12))]
        dest = bytearray(200 * len(ranges))
        storage.read_ranges("big.bin", ranges, dest)
        for r in ranges:
            assert dest[r.dest_offset:r.dest_offset + r.length] == data[r.offset:r.offset + r.length]

    # --- read_ranges ---------------------------------------------------------------------------------------
    def test_read_ranges_many_out_of_order(self, storage):
        data = payload(300_000, seed=2)
        storage.write_file("d.bin", data)
        rng = random.Random(2)
        ranges, dest_pos = [], 0
        for _ in range(200):
            off = rng.randrange(len(data))
            length = rng.choice([0, 1, 17, 4096, rng.randrange(len(data) - off + 1)])
            ranges.append(ReadRange(off, length, dest_pos))
            dest_pos += length
        ranges += [ReadRange(0, 10, dest_pos), ReadRange(10, 10, dest_pos + 10),  # back to back
                   ReadRange(5, 10, dest_pos + 20), ReadRange(len(data) - 1, 1, dest_pos + 30)]  # overlap, last
        dest_pos += 31
        rng.shuffle(ranges)
        dest = np.zeros(dest_pos, dtype=np.uint8)
        storage.read_ranges("d.bin", ranges, dest)
        for r in ranges:
            assert dest[r.dest_offset:r.dest_offset + r.length].tobytes() == data[r.offset:r.offset + r.length]

    def test_read_ranges_zero_length_and_empty(self, storage):
        storage.write_file("z.bin", b"0123456789")
        dest = bytearray(b"xx")
        storage.read_ranges("z.bin", [], dest)
        storage.read_ranges("z.bin", [ReadRange(3, 0, 0), ReadRange(10, 0, 1), ReadRange(9, 1, 1)], dest)
        assert dest == b"x9"

    @pytest.mark.parametrize("offset,length", [(95, 10), (100, 1), (1000, 5)])
    def test_read_ranges_beyond_eof(self, storage, offset, length):
        storage.write_file("short.bin", payload(100))
        dest = bytearray(16)
        with pytest.raises(StorageError, match="short.bin") as info:
            storage.read_ranges("short.bin", [ReadRange(0, 4, 0), ReadRange(offset, length, 4)], dest)
        assert "truncated" in str(info.value)

    def test_read_ranges_missing_file(self, storage):
        with pytest.raises(StorageError, match="missing.bin"):
            storage.read_ranges("missing.bin", [ReadRange(0, 1, 0)], bytearray(1))

    @pytest.mark.parametrize("r", [ReadRange(0, 9, 0), ReadRange(0, 4, 5), ReadRange(0, 1, -1)])
    def test_read_ranges_not_fitting_dest_is_value_error(self, storage, r):
        storage.write_file("f.bin", payload(100))
        dest = bytearray(8)
        with pytest.raises(ValueError):
            storage.read_ranges("f.bin", [r], dest)
        assert dest == bytearray(8)  # nothing written before the check

    # --- listing -------------------------------------------------------------------------------------------
    def _tree(self, storage):
        for name in ["a", "b", "sub/c", "sub/d/e", "subway/f"]:
            storage.write_file(name, name.encode())

    def test_list_dir(self, storage):
        assert storage.list_dir() == []
        self._tree(storage)
        assert storage.list_dir() == ["a", "b", "sub", "subway"]
        assert storage.list_dir("sub") == ["c", "d"]
        assert storage.list_dir("sub/d") == ["e"]
        assert storage.list_dir("missing") == []

    def test_list_files(self, storage):
        assert storage.list_files() == []
        self._tree(storage)
        assert storage.list_files() == ["a", "b", "sub/c", "sub/d/e", "subway/f"]
        assert storage.list_files("sub") == ["sub/c", "sub/d/e"]
        assert storage.list_files("missing") == []

    def test_exists(self, storage):
        self._tree(storage)
        assert storage.exists("a") and storage.exists("sub/d/e")
        assert not storage.exists("x") and not storage.exists("sub/x")

    # --- deleting ------------------------------------------------------------------------------------------
    def test_delete(self, storage):
        self._tree(storage)
        storage.delete("sub/c")
        storage.delete("sub/c")  # absent: no-op
        assert not storage.exists("sub/c")
        assert storage.list_files("sub") == ["sub/d/e"]

    def test_delete_tree(self, storage):
        for step in ("step-1", "step-10"):
            storage.commit(f"{step}/manifest.json", b"{}")
            storage.write_file(f"{step}/data/r00000.bin", b"x" * 100)
            storage.write_file(f"{step}/index/r00000.idx", b"y")
        storage.delete_tree("step-1")  # must not touch step-10 (same key prefix on object stores)
        assert not storage.exists("step-1/manifest.json")
        assert storage.list_files("step-1") == []
        assert storage.list_dir() == ["step-10"]
        assert storage.read_file("step-10/manifest.json") == b"{}"
        storage.delete_tree("missing")  # absent: no-op

    def test_delete_tree_root_then_reuse(self, storage):
        self._tree(storage)
        storage.delete_tree()
        assert storage.list_files() == []
        storage.write_file("again", b"1")  # the root (an S3 bucket, maybe) is still usable
        assert storage.read_file("again") == b"1"

    # --- commit --------------------------------------------------------------------------------------------
    def test_commit_create_only(self, storage):
        storage.write_file("step-5/data/r00000.bin", b"data")
        storage.commit("step-5/manifest.json", b'{"v": 1}')
        assert storage.read_file("step-5/manifest.json") == b'{"v": 1}'
        with pytest.raises(CheckpointExistsError, match="manifest.json") as info:
            storage.commit("step-5/manifest.json", b'{"v": 2}')
        assert not isinstance(info.value, StorageError)  # its own class: callers tell it from a failure
        with pytest.raises(CheckpointExistsError):
            storage.commit("step-5/manifest.json", b'{"v": 1}')  # same bytes: still a second commit
        assert storage.read_file("step-5/manifest.json") == b'{"v": 1}'
        assert storage.list_files("step-5") == ["step-5/data/r00000.bin", "step-5/manifest.json"]

    def test_commit_in_new_directory(self, storage):
        storage.commit("fresh/dir/manifest.json", b"m")
        assert storage.read_file("fresh/dir/manifest.json") == b"m"

    def test_concurrent_commits_one_winner(self, storage):
        n = 6
        barrier, results = threading.Barrier(n), [None] * n

        def commit(i):
            barrier.wait()
            try:
                storage.commit("manifest.json", f"committer {i}".encode())
                results[i] = "ok"
            except CheckpointExistsError:
                results[i] = "exists"

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("ok") == 1, results
        assert results.count("exists") == n - 1, results
        winner = results.index("ok")
        assert storage.read_file("manifest.json") == f"committer {winner}".encode()

    def test_reader_never_sees_partial_manifest(self, storage):
        manifest = payload(2 * MIB, seed=3)  # big enough that a non-atomic write is caught half done
        seen = []

        def check():
            if storage.exists("manifest.json"):
                got = storage.read_file("manifest.json")  # once there it stays: FileNotFoundError fails
            else:
                try:
                    got = storage.read_file("manifest.json")
                except FileNotFoundError:
                    got = None
            if got is not None and got != manifest:
                return f"partial manifest: {len(got)} of {len(manifest)} bytes"
            if got is not None:
                seen.append(1)
            return None

        errors = _while_polling(check, lambda: storage.commit("manifest.json", manifest))
        assert not errors, errors
        assert seen, "readers never saw the committed manifest"

    # --- replace -------------------------------------------------------------------------------------------
    def test_replace_creates_and_replaces(self, storage):
        if not self.supports_replace:
            with pytest.raises(StorageError):
                storage.replace("manifest.json", b"m")
            assert not storage.exists("manifest.json")
            return
        storage.replace("fresh/dir/manifest.json", b"first")  # absent: created, directories too
        assert storage.read_file("fresh/dir/manifest.json") == b"first"
        storage.replace("fresh/dir/manifest.json", b"a longer second version")
        assert storage.read_file("fresh/dir/manifest.json") == b"a longer second version"
        storage.replace("fresh/dir/manifest.json", b"3")
        assert storage.read_file("fresh/dir/manifest.json") == b"3"
        assert storage.list_files("fresh") == ["fresh/dir/manifest.json"]  # no temp file left behind
        with pytest.raises(CheckpointExistsError):
            storage.commit("fresh/dir/manifest.json", b"4")  # still a committed name

    def test_replace_readers_see_old_or_new_whole(self, storage):
        if not self.supports_replace:
            return
        old, new = payload(2 * MIB, seed=11), payload(2 * MIB + 17, seed=12)
        storage.commit("manifest.json", old)

        def check():
            got = storage.read_file("manifest.json")  # never absent: the old one or the new
            return None if got in (old, new) else f"a mix: {len(got)} bytes"

        errors = _while_polling(check, lambda: storage.replace("manifest.json", new))
        assert not errors, errors
        assert storage.read_file("manifest.json") == new

    # --- child ---------------------------------------------------------------------------------------------
    def test_child(self, storage):
        step = storage.child("step-7")
        step.write_file("data/r00000.bin", b"abc")
        step.commit("manifest.json", b"{}")
        assert storage.read_file("step-7/data/r00000.bin") == b"abc"
        assert storage.list_dir() == ["step-7"]
        assert step.list_files() == ["data/r00000.bin", "manifest.json"]
        assert step.url.rstrip("/").endswith("step-7")
        grandchild = step.child("data")
        assert grandchild.read_file("r00000.bin") == b"abc"
        dest = bytearray(2)
        grandchild.read_ranges("r00000.bin", [ReadRange(1, 2, 0)], dest)
        assert dest == b"bc"
        step.sync_dir()


def _while_polling(check, action, readers: int = 2) -> list[str]:
    """Run check() over and over on `readers` threads while action() runs, and once more after it; return
    what the checks reported (a string per problem, or an exception's repr)."""
    done, errors = threading.Event(), []

    def poll():
        try:
            while True:
                finished = done.is_set()
                problem = check()
                if problem:
                    errors.append(problem)
                    return
                if finished:
                    return
        except Exception as e:  # noqa: BLE001 -- reported to the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=poll) for _ in range(readers)]
    for t in threads:
        t.start()
    try:
        action()
    finally:
        done.set()
        for t in threads:
            t.join()
    return errors
