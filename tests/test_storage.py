"""Storage conformance: StorageConformance is the contract of shardckpt.storage.base.Storage; every backend runs
it through a subclass that provides a `storage` fixture (an empty Storage, cleaned up afterwards).

Backends: LocalStorage (tmp_path), FsspecStorage on memory://, on file:// (fsspec's local filesystem) and on a
real S3 server (Ceph radosgw from tests/s3_server.py, marked `s3`; skipped when Ceph is not installed unless
SHARDCKPT_REQUIRE_S3=1). FsspecStorage-only behaviour (request coalescing, delete order, multipart) follows.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import threading
import uuid

import numpy as np
import pytest

from shardckpt.errors import CheckpointExistsError, StorageError
from shardckpt.storage import LocalStorage, ReadRange, local, storage_for
from shardckpt.storage.fsspec import MIN_PART_SIZE, FsspecStorage

from s3_server import s3_server  # noqa: F401  (session fixture)

MIB = 1 << 20


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class StorageConformance:
    """The tests every Storage backend must pass. Subclasses define the `storage` fixture."""

    large_size = 12 * MIB + 12345  # more than one S3 part at every part size the fixtures use

    # --- whole files ---------------------------------------------------------------------------------------
    def test_write_read_file(self, storage):
        data = _payload(1000)
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
        with pytest.raises(FileNotFoundError):
            storage.read_file("nope/manifest.json")
        assert not storage.exists("nope/manifest.json")

    def test_size_missing_raises(self, storage):
        with pytest.raises((FileNotFoundError, StorageError)):
            storage.size("nope")

    def test_abort_leaves_no_file(self, storage):
        w = storage.open_write("data/aborted.bin")
        w.write(_payload(1000))
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
        data = _payload(self.large_size, seed=1)
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
        data = _payload(300_000, seed=2)
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
        storage.write_file("short.bin", _payload(100))
        dest = bytearray(16)
        with pytest.raises(StorageError, match="short.bin"):
            storage.read_ranges("short.bin", [ReadRange(0, 4, 0), ReadRange(offset, length, 4)], dest)

    def test_read_ranges_missing_file(self, storage):
        with pytest.raises(StorageError, match="missing.bin"):
            storage.read_ranges("missing.bin", [ReadRange(0, 1, 0)], bytearray(1))

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
        with pytest.raises(CheckpointExistsError, match="manifest.json"):
            storage.commit("step-5/manifest.json", b'{"v": 2}')
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
        manifest = _payload(2 * MIB, seed=3)  # big enough that a non-atomic write is caught half done
        seen, done, errors = [], threading.Event(), []

        def poll():
            try:
                while True:
                    finished = done.is_set()
                    if storage.exists("manifest.json"):
                        got = storage.read_file("manifest.json")
                        if got != manifest:
                            errors.append(f"partial manifest: {len(got)} of {len(manifest)} bytes")
                            return
                        seen.append(1)
                    else:
                        try:
                            got = storage.read_file("manifest.json")
                        except FileNotFoundError:
                            got = None
                        if got is not None and got != manifest:
                            errors.append(f"partial manifest: {len(got)} of {len(manifest)} bytes")
                            return
                    if finished:
                        return
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(repr(e))

        readers = [threading.Thread(target=poll) for _ in range(2)]
        for t in readers:
            t.start()
        storage.commit("manifest.json", manifest)
        done.set()
        for t in readers:
            t.join()
        assert not errors, errors
        assert seen, "readers never saw the committed manifest"

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


class TestLocalStorage(StorageConformance):
    @pytest.fixture(params=[True, False], ids=["direct", "buffered"])
    def storage(self, tmp_path, request):
        return LocalStorage(tmp_path / "ckpt", direct_io=request.param)


class TestLocalDirectIO:
    """O_DIRECT on local files: whole aligned blocks go direct, tails and refusals fall back to the page
    cache, and what comes back is always the bytes written."""

    def _write(self, storage, name, data, sizes=(1, 4095, 3 * MIB + 5, 5 * MIB, 17)):
        w = storage.open_write(name)
        view, pos, i = memoryview(data), 0, 0
        while pos < len(data):
            w.write(view[pos:pos + sizes[i % len(sizes)]])
            pos += sizes[i % len(sizes)]
            i += 1
        return w

    def test_large_file_goes_direct_and_reads_back(self, tmp_path, monkeypatch):
        storage = LocalStorage(tmp_path, direct_io=True)
        calls = []
        real = local._LocalWriter._set_direct
        monkeypatch.setattr(local._LocalWriter, "_set_direct", lambda self, on: (calls.append(on), real(self, on)))
        data = _payload(2 * local.DIRECT_STAGE + 12345, seed=5)
        w = self._write(storage, "big.bin", data)
        assert calls == [True]  # switched on at the first whole stage
        assert w.close() == len(data)
        assert calls == [True, False]  # and off for the unaligned tail
        assert (tmp_path / "big.bin").read_bytes() == data

    def test_small_file_never_goes_direct(self, tmp_path, monkeypatch):
        storage = LocalStorage(tmp_path, direct_io=True)
        monkeypatch.setattr(local._LocalWriter, "_set_direct", lambda self, on: pytest.fail("went direct"))
        storage.write_file("small.bin", _payload(local.DIRECT_STAGE - 1))
        assert storage.size("small.bin") == local.DIRECT_STAGE - 1

    def test_refused_direct_falls_back_to_the_page_cache(self, tmp_path, monkeypatch):
        storage = LocalStorage(tmp_path, direct_io=True)
        real_write = os.write

        def einval_when_direct(fd, data):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data)
        monkeypatch.setattr(local.os, "write", einval_when_direct)
        data = _payload(local.DIRECT_STAGE * 2 + 3, seed=6)
        self._write(storage, "f.bin", data).close()
        assert (tmp_path / "f.bin").read_bytes() == data

    def test_aligned_ranges_read_direct_into_aligned_buffers(self, tmp_path, monkeypatch):
        storage = LocalStorage(tmp_path, direct_io=True)
        data = _payload(3 * MIB + 777, seed=7)
        storage.write_file("r.bin", data)
        opened = []
        real_open = local._open_direct
        monkeypatch.setattr(local, "_open_direct", lambda path: (opened.append(path), real_open(path))[1])
        A = local.DIRECT_ALIGN
        # aligned starts, odd lengths, one running to the end of the file, one piece-splitting range
        ranges = [ReadRange(0, A + 5, 0), ReadRange(5 * A, 3 * A, 2 * A), ReadRange(len(data) - 777 - A, A + 777, 5 * A),
                  ReadRange(A, 2 * MIB + 3, 7 * A)]
        dest = np.frombuffer(mmap.mmap(-1, 7 * A + 2 * MIB + 3), dtype=np.uint8)
        storage.read_ranges("r.bin", ranges, dest)
        assert opened
        for r in ranges:
            assert dest[r.dest_offset:r.dest_offset + r.length].tobytes() == data[r.offset:r.offset + r.length]
        with pytest.raises(StorageError, match="truncated"):
            storage.read_ranges("r.bin", [ReadRange(len(data) - 777, 2 * A, 0)], dest)

    def test_disk_full_mid_direct_write_is_typed_and_leaves_nothing(self, tmp_path):
        from faultkit import small_tmpfs
        with small_tmpfs(tmp_path / "small", "12m") as mnt:
            storage = LocalStorage(mnt, direct_io=True)
            w = storage.open_write("big.bin")
            went_direct = False
            with pytest.raises(StorageError, match="disk full") as info:
                for _ in range(4):
                    w.write(_payload(local.DIRECT_STAGE, seed=8))
                    went_direct |= w._direct
            assert went_direct  # the first whole block went direct; the device filled during a later one
            assert "big.bin" in str(info.value)
            w.abort()
            assert os.listdir(mnt) == []

    def test_env_switch(self, tmp_path, monkeypatch):
        monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "0")
        assert LocalStorage(tmp_path).direct_io is False and LocalStorage(tmp_path).read_align == 1
        monkeypatch.delenv("SHARDCKPT_DIRECT_IO")
        assert LocalStorage(tmp_path).direct_io is True
        assert LocalStorage(tmp_path).child("x").direct_io is True


class TestMemoryStorage(StorageConformance):
    @pytest.fixture
    def storage(self):
        s = FsspecStorage(f"memory://shardckpt-tests/{uuid.uuid4().hex}")
        yield s
        if s.fs.exists(s.root):
            s.fs.rm(s.root, recursive=True)


class TestFsspecFileStorage(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path):
        return FsspecStorage(f"file://{tmp_path}/ckpt")


@pytest.mark.s3
class TestS3Storage(StorageConformance):
    @pytest.fixture
    def storage(self, s3_server):  # noqa: F811
        s = FsspecStorage(s3_server.url(f"t-{uuid.uuid4().hex[:12]}"), s3_server.storage_options,
                          part_size=MIN_PART_SIZE)
        yield s
        s.delete_tree()

    def test_large_file_is_multipart(self, storage):
        data = _payload(self.large_size, seed=4)
        storage.write_file("mp.bin", data)
        etag = storage.fs.info(storage._path("mp.bin"))["ETag"].strip('"')
        assert etag.endswith("-3"), etag  # 5 + 5 + 2 MiB parts
        assert storage.read_file("mp.bin") == data

    def test_aborted_multipart_leaves_no_upload(self, storage):
        w = storage.open_write("ab.bin")
        w.write(_payload(MIN_PART_SIZE + 10))  # starts a multipart upload
        w.abort()
        bucket, prefix, _ = storage.fs.split_path(storage.root)
        uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
        assert uploads == []
        assert not storage.exists("ab.bin")

    def test_part_buffers_reused_while_parts_are_in_flight(self, s3_server, monkeypatch):  # noqa: F811
        # One part in flight: from the third part on, every part is filled into the buffer of a part whose
        # upload is done, so a buffer refilled too early would upload (and read back) the wrong bytes.
        s = FsspecStorage(s3_server.url(f"t-{uuid.uuid4().hex[:12]}"), s3_server.storage_options,
                          part_size=MIN_PART_SIZE, upload_concurrency=1)
        data = _payload(5 * MIN_PART_SIZE + 12345, seed=6)
        from shardckpt.storage.fsspec import _PartBuffers
        reused = []
        take = _PartBuffers.take
        monkeypatch.setattr(_PartBuffers, "take", classmethod(lambda cls, size: reused.append(take(size))
                                                              or reused[-1]))
        monkeypatch.setattr(_PartBuffers, "_free", [])
        w = s.open_write("reuse.bin")
        view, pos, rng = memoryview(data), 0, random.Random(6)
        while pos < len(data):
            n = rng.choice([7, 4096, MIB + 3, 3 * MIB])
            w.write(view[pos:pos + n])
            pos += n
        assert w.close() == len(data)
        try:
            assert sum(b is not None for b in reused) >= 3
            assert len(_PartBuffers._free) >= 2  # given back when done, for the next file
            assert s.fs.info(s._path("reuse.bin"))["ETag"].strip('"').endswith("-6")
            assert s.read_file("reuse.bin") == data
        finally:
            s.delete_tree()

    def test_uploads_are_signed_without_a_second_checksum(self, storage):
        # Over http botocore's default adds a CRC32 of every body on top of the SHA-256 payload signature;
        # shardckpt turns the CRC32 off, and the body must still be signed (the store checks every byte).
        assert storage.fs.config_kwargs["request_checksum_calculation"] == "when_required"
        storage.exists("x")  # the client exists from the first request on
        seen = []
        hook = lambda request, **_: seen.append(dict(request.headers))  # noqa: E731
        storage.fs.s3.meta.events.register("before-send.s3", hook)
        try:
            data = _payload(MIN_PART_SIZE + 100, seed=7)
            storage.write_file("signed.bin", data)
            storage.write_file("small.bin", b"abc")
        finally:
            storage.fs.s3.meta.events.unregister("before-send.s3", hook)
        bodies = [h for h in seen if h.get("Content-Length", b"0") not in (b"0", "0")]
        assert len(bodies) >= 3  # two parts and a small PUT (plus the complete request)
        for h in bodies:
            sha = h["X-Amz-Content-SHA256"]
            sha = sha.decode() if isinstance(sha, bytes) else sha
            assert len(sha) == 64 and sha != "UNSIGNED-PAYLOAD"
            assert not any(k.lower().startswith("x-amz-checksum-") for k in h)
        assert storage.read_file("signed.bin") == data

    def test_delete_tree_never_deletes_the_bucket(self, s3_server):  # noqa: F811
        bucket = f"shardckpt-tmp-{uuid.uuid4().hex[:8]}"
        s = FsspecStorage(f"s3://{bucket}", s3_server.storage_options)
        s.fs.mkdir(bucket)
        try:
            s.write_file("x/y", b"1")
            s.delete_tree()
            assert s.list_files() == []
            assert s.fs.exists(bucket)
        finally:
            s.fs.rm(bucket, recursive=True)

    def test_errors_are_storage_errors_naming_the_file(self, s3_server):  # noqa: F811
        options = dict(s3_server.storage_options, secret="wrong-secret", skip_instance_cache=True)
        s = FsspecStorage(s3_server.url("denied"), options)
        with pytest.raises(StorageError, match="denied/f"):
            s.write_file("f", b"1")
        with pytest.raises(StorageError, match="denied/manifest.json"):
            s.commit("manifest.json", b"{}")


class TestFsspecSpecifics:
    """Behaviour of FsspecStorage beyond the contract, checked on memory:// with the filesystem spied on."""

    @pytest.fixture
    def storage(self):
        s = FsspecStorage(f"memory://shardckpt-tests/{uuid.uuid4().hex}")
        yield s
        if s.fs.exists(s.root):
            s.fs.rm(s.root, recursive=True)

    def test_read_ranges_one_call_coalesced(self, storage, monkeypatch):
        data = _payload(4 * MIB, seed=5)
        storage.write_file("d.bin", data)
        calls = []
        real = storage.fs.cat_ranges

        def spy(paths, starts, ends, **kw):
            calls.append(list(zip(starts, ends)))
            return real(paths, starts, ends, **kw)

        monkeypatch.setattr(storage.fs, "cat_ranges", spy)
        # back to back, a small hole, then a far one: two requests in one call
        ranges = [ReadRange(1000, 100, 0), ReadRange(0, 1000, 100), ReadRange(2000, 10, 1100),
                  ReadRange(3 * MIB, 10, 1110)]
        dest = bytearray(1120)
        storage.read_ranges("d.bin", ranges, dest)
        assert calls == [[(0, 2010), (3 * MIB, 3 * MIB + 10)]]
        for r in ranges:
            assert dest[r.dest_offset:r.dest_offset + r.length] == data[r.offset:r.offset + r.length]

    def test_read_ranges_split_and_batched(self, storage, monkeypatch):
        import shardckpt.storage.fsspec as fsspec_storage
        monkeypatch.setattr(fsspec_storage, "_MAX_REQUEST", 1000)
        monkeypatch.setattr(fsspec_storage, "_MAX_BATCH", 3000)
        monkeypatch.setattr(fsspec_storage, "_COALESCE_GAP", 10)
        data = _payload(50_000, seed=6)
        storage.write_file("d.bin", data)
        calls = []
        real = storage.fs.cat_ranges
        monkeypatch.setattr(storage.fs, "cat_ranges", lambda p, s, e, **kw: (
            calls.append(sum(b - a for a, b in zip(s, e))), real(p, s, e, **kw))[1])
        rng = random.Random(6)
        for _ in range(20):
            ranges, pos = [], 0
            for _ in range(rng.randrange(1, 30)):
                off = rng.randrange(len(data))
                length = rng.randrange(min(5000, len(data) - off) + 1)
                ranges.append(ReadRange(off, length, pos))
                pos += length
            dest = bytearray(pos)
            storage.read_ranges("d.bin", ranges, dest)
            for r in ranges:
                assert dest[r.dest_offset:r.dest_offset + r.length] == data[r.offset:r.offset + r.length]
        assert max(calls) < 3000 + 1000  # a batch stops once it holds 3000 bytes of <= 1000-byte requests
        assert len(calls) > 20  # some reads needed several batches

    def test_delete_tree_deletes_manifests_first(self, storage, monkeypatch):
        for name in ["data/r00000.bin", "index/r00000.idx", "a/data.bin"]:
            storage.write_file(name, b"x")
        storage.commit("manifest.json", b"{}")
        storage.commit("a/manifest.json", b"{}")
        order = []
        real_rm_file, real_rm = storage.fs.rm_file, storage.fs.rm
        monkeypatch.setattr(storage.fs, "rm_file", lambda p, **kw: (order.append([p]), real_rm_file(p, **kw)))
        monkeypatch.setattr(storage.fs, "rm", lambda p, *a, **kw: (order.append(p if isinstance(p, list) else [p]),
                                                                  real_rm(p, *a, **kw)))
        storage.delete_tree()
        flat = [p.rsplit("/", 1)[-1] for step in order for p in step]
        assert flat[:2] == ["manifest.json", "manifest.json"], order
        assert order[0] == [storage._path("manifest.json")]
        assert storage.list_files() == []

    def test_storage_for_dispatch(self, tmp_path):
        assert isinstance(storage_for("memory://x/y"), FsspecStorage)
        assert isinstance(storage_for(f"file://{tmp_path}"), LocalStorage)
        assert isinstance(storage_for(str(tmp_path)), LocalStorage)

    def test_s3_checksum_option_defaults_and_respects_the_caller(self, monkeypatch):
        from shardckpt.storage.fsspec import _s3_options
        for var in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(var, raising=False)
        http = {"endpoint_url": "http://10.0.0.1:9000"}
        base = {"key": "k", "client_kwargs": http, "config_kwargs": {"connect_timeout": 5}}
        out = _s3_options(base)
        assert out["config_kwargs"] == {"connect_timeout": 5, "request_checksum_calculation": "when_required"}
        assert base["config_kwargs"] == {"connect_timeout": 5}  # the caller's dict is not changed
        assert "request_checksum_calculation" in _s3_options({"endpoint_url": "HTTP://h"})["config_kwargs"]
        assert "request_checksum_calculation" in _s3_options({"use_ssl": False})["config_kwargs"]
        # https (AWS's default endpoint included): botocore's own default is the cheaper one there
        for https in ({}, {"client_kwargs": {"endpoint_url": "https://s3.example.com"}}):
            assert _s3_options(https) == https
        mine = {"client_kwargs": http, "config_kwargs": {"request_checksum_calculation": "when_supported"}}
        assert _s3_options(mine) == mine
        unsigned = {"client_kwargs": http, "config_kwargs": {"s3": {"payload_signing_enabled": False}}}
        assert _s3_options(unsigned) == unsigned  # then the CRC32 is the only check: kept
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
        assert "request_checksum_calculation" in _s3_options({})["config_kwargs"]
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
        assert _s3_options({}) == {}

    def test_part_size_validated(self):
        with pytest.raises(ValueError):
            FsspecStorage("memory://x", part_size=MIN_PART_SIZE - 1)
