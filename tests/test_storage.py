"""Storage backends against the conformance suite (shardckpt.testing.storage.StorageConformance, the contract
of shardckpt.storage.base.Storage), each through a subclass that provides a `storage` fixture.

Backends: LocalStorage (tmp_path, O_DIRECT on and off), FsspecStorage on memory://, on file:// (fsspec's local
filesystem), on fakes of gcsfs and adlfs (tests/fake_stores.py: the create-only call shape, not the real
services) and on a real S3 server (Ceph radosgw from tests/s3_server.py, marked `s3`; skipped when Ceph is not
installed unless SHARDCKPT_REQUIRE_S3=1). Backend-only behaviour follows each (O_DIRECT, request coalescing,
delete order, multipart and its part buffers, create-only commits per store).
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
from shardckpt.storage import LocalStorage, ReadRange, storage_for
from shardckpt.storage import local
from shardckpt.storage.fsspec import FsspecStorage
from shardckpt.storage.s3 import MIN_PART_SIZE, PartBuffers, S3MultipartWriter
from shardckpt.testing.storage import MIB, StorageConformance
from shardckpt.testing.storage import payload as _payload

import fake_stores
from s3_server import s3_server  # noqa: F401  (session fixture)


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

    @pytest.mark.parametrize("tail", [3 * local.DIRECT_ALIGN + 100, 2 * local.DIRECT_ALIGN])
    def test_the_last_stage_writes_its_whole_blocks_direct(self, tmp_path, monkeypatch, tail):
        """At close, the stage's whole blocks go direct; only a last partial block goes through the page
        cache (a tail of up to a stage through the page cache made fsync flush it, ~10 ms per 8 MiB)."""
        storage = LocalStorage(tmp_path, direct_io=True)
        writes = []
        real = local.os.write
        monkeypatch.setattr(local.os, "write", lambda fd, view: (
            writes.append((len(view), bool(local.fcntl.fcntl(fd, local.fcntl.F_GETFL) & os.O_DIRECT))),
            real(fd, view))[1])
        data = _payload(local.DIRECT_STAGE + tail, seed=6)
        w = self._write(storage, "tail.bin", data)
        assert w.close() == len(data)
        whole = tail - tail % local.DIRECT_ALIGN
        assert writes[-2 if tail % local.DIRECT_ALIGN else -1:] == [(whole, True)] + (
            [(tail % local.DIRECT_ALIGN, False)] if tail % local.DIRECT_ALIGN else [])
        assert (tmp_path / "tail.bin").read_bytes() == data

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
        reused = []
        take = PartBuffers.take
        monkeypatch.setattr(PartBuffers, "take", classmethod(lambda cls, size: reused.append(take(size))
                                                             or reused[-1]))
        monkeypatch.setattr(PartBuffers, "_free", [])
        w = s.open_write("reuse.bin")
        view, pos, rng = memoryview(data), 0, random.Random(6)
        while pos < len(data):
            n = rng.choice([7, 4096, MIB + 3, 3 * MIB])
            w.write(view[pos:pos + n])
            pos += n
        assert w.close() == len(data)
        try:
            assert sum(b is not None for b in reused) >= 3
            assert len(PartBuffers._free) >= 2  # given back when done, for the next file
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
        from shardckpt.storage.s3 import s3_options as _s3_options
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


class TestLocalDeleteTree:
    def test_a_manifest_that_cannot_be_deleted_keeps_its_data(self, tmp_path, monkeypatch):
        storage = LocalStorage(tmp_path)
        storage.write_file("step-1/data/s/r00000.bin", b"data")
        storage.commit("step-1/manifest.json", b"{}")
        real_unlink = os.unlink

        def refuse_manifest(path, *a, **kw):
            if os.path.basename(path) == "manifest.json":
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_unlink(path, *a, **kw)
        monkeypatch.setattr(local.os, "unlink", refuse_manifest)
        with pytest.raises(StorageError, match="manifest.json"):
            storage.delete_tree("step-1")
        assert storage.read_file("step-1/data/s/r00000.bin") == b"data"  # still loadable
        assert storage.read_file("step-1/manifest.json") == b"{}"


# --- S3 part buffers, on a fake S3 (the real-server tests are in TestS3Storage) ---------------------------------

@pytest.fixture
def fake_s3(monkeypatch):
    fs = fake_stores.FakeS3()
    monkeypatch.setattr(PartBuffers, "_free", [])
    yield fs
    fs.close()


def _upload(fs, name: str, data: bytes, part_size: int = MIN_PART_SIZE, concurrency: int = 1) -> None:
    w = S3MultipartWriter(fs, f"bucket/{name}", f"s3://bucket/{name}", part_size, concurrency)
    view, pos, rng = memoryview(data), 0, random.Random(len(data))
    while pos < len(data):
        n = rng.choice([5, 4096, MIB + 3, 3 * MIB])
        w.write(view[pos:pos + n])
        pos += n
    assert w.close() == len(data)
    assert fs.objects[("bucket", name)] == data


class TestPartBuffers:
    def test_short_last_parts_are_not_kept_and_whole_ones_are_reused(self, fake_s3, monkeypatch):
        # Every file ends in a short part; before the fix those were kept and, never taken again (take()
        # wants a whole part), filled the slots.
        taken = []
        take = PartBuffers.take
        monkeypatch.setattr(PartBuffers, "take", classmethod(lambda cls, size: taken.append(take(size))
                                                             or taken[-1]))
        for i, size in enumerate([2 * MIN_PART_SIZE + 123, MIN_PART_SIZE + 7, 3 * MIN_PART_SIZE + 5, 11]):
            _upload(fake_s3, f"f{i}", _payload(size, seed=i), concurrency=8)  # the last part in a fresh buffer
            assert PartBuffers._free, "whole part buffers are kept"
            assert all(len(b) == MIN_PART_SIZE for b in PartBuffers._free), \
                sorted(len(b) for b in PartBuffers._free)
        assert sum(b is not None for b in taken) >= 4  # the later files filled kept buffers

    def test_slots_held_by_another_part_size_make_room(self, monkeypatch):
        monkeypatch.setattr(PartBuffers, "_free", [])
        monkeypatch.setattr(PartBuffers, "KEEP", 2)
        for _ in range(2):
            PartBuffers.give(bytearray(16), 16)  # left by a writer with another part size
        mine = bytearray(32)
        PartBuffers.give(mine, 32)
        assert PartBuffers.take(32) is mine
        PartBuffers.give(bytearray(31), 32)  # short: dropped
        assert sorted(len(b) for b in PartBuffers._free) == [16]

    def test_parts_read_back_with_several_in_flight(self, fake_s3):
        for i in range(3):
            _upload(fake_s3, f"g{i}", _payload(4 * MIN_PART_SIZE + 999, seed=10 + i), concurrency=3)
        assert len(PartBuffers._free) <= PartBuffers.KEEP


# --- create-only commits per store, on fakes of gcsfs and adlfs ---------------------------------------------------

def _fake_storage(fs) -> FsspecStorage:
    root = f"/fake-bucket/{uuid.uuid4().hex}"
    return FsspecStorage(f"{fs.protocol[0]}:/{root}", _fs=fs, _root=root)


class TestFakeGCSStorage(StorageConformance):
    @pytest.fixture
    def storage(self):
        return _fake_storage(fake_stores.FakeGCS())


class TestFakeAzureStorage(StorageConformance):
    @pytest.fixture
    def storage(self):
        return _fake_storage(fake_stores.FakeAzure())


class TestCreateOnlyCalls:
    """The conditional call each store gets: the guarantee rests on the store refusing it, not on exists()."""

    @pytest.mark.parametrize("fake,kwargs", [(fake_stores.FakeGCS, {"mode": "create"}),
                                             (fake_stores.FakeAzure, {"overwrite": False})])
    def test_commit_is_one_conditional_write(self, fake, kwargs):
        storage = _fake_storage(fake())
        storage.commit("manifest.json", b"m1")
        path = storage._path("manifest.json")
        assert storage.fs.calls == [("pipe_file", path, kwargs)]  # no exists() first: nothing to race
        with pytest.raises(CheckpointExistsError, match="manifest.json"):
            storage.commit("manifest.json", b"m2")
        assert storage.read_file("manifest.json") == b"m1"

    def test_gcsfs_without_mode_falls_back_and_says_so(self, caplog, monkeypatch):
        from shardckpt.storage import create_only
        monkeypatch.setattr(create_only, "_warned", set())
        storage = _fake_storage(fake_stores.FakeOldGCS())
        with caplog.at_level("WARNING", logger="shardckpt"):
            storage.commit("manifest.json", b"m1")
        path = storage._path("manifest.json")
        assert storage.fs.calls == [("exists", path), ("pipe_file", path, {})]
        with pytest.raises(CheckpointExistsError):
            storage.commit("manifest.json", b"m2")
        assert storage.read_file("manifest.json") == b"m1"
        assert "FakeOldGCS" in caplog.text and "could both commit" in caplog.text

    def test_store_errors_that_mean_exists(self):
        from shardckpt.storage.create_only import is_exists_error
        botocore_412 = Exception("PreconditionFailed")
        botocore_412.response = {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}
        assert is_exists_error(botocore_412)
        assert is_exists_error(fake_stores.ResourceExistsError("exists"))
        assert is_exists_error(FileExistsError("x"))
        wrapped = OSError("upload failed")
        wrapped.__cause__ = fake_stores.ResourceExistsError("BlobAlreadyExists")
        assert is_exists_error(wrapped)
        assert not is_exists_error(PermissionError("denied"))
        assert not is_exists_error(OSError("timed out"))
