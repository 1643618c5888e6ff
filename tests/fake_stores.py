"""Small fakes of object-store filesystems, for tests that need a store this machine has none of.

FakeS3 answers just the s3fs calls S3MultipartWriter makes (split_path, call_s3, _call_s3 on its own event
loop), so the part buffers can be tested without Ceph. FakeGCS and FakeAzure are in-memory filesystems that
answer pipe_file the way gcsfs and adlfs do (their public signatures; gcsfs >= 2024.12 takes mode="create"
and sends ifGenerationMatch=0, adlfs takes overwrite=False and the Azure SDK sends If-None-Match: *), with the
store's refusal made atomic as the real store's is. They check the call shape shardckpt uses, nothing about
the real services: gcsfs and adlfs are not installed here.
"""
from __future__ import annotations

import asyncio
import threading

from fsspec.implementations.memory import MemoryFileSystem


class FakeS3:
    """Objects in a dict; every request body is copied when the fake loop runs the request, so a buffer the
    writer touched while its request was in flight shows up as wrong bytes."""
    protocol = ("s3", "s3a")

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.objects: dict[tuple[str, str], bytes] = {}
        self._uploads: dict[str, dict[int, bytes]] = {}

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def split_path(self, path: str):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def call_s3(self, method: str, **kw):
        return asyncio.run_coroutine_threadsafe(self._call_s3(method, **kw), self.loop).result()

    async def _call_s3(self, method: str, **kw):
        await asyncio.sleep(0)
        where = (kw["Bucket"], kw["Key"])
        if method == "put_object":
            self.objects[where] = bytes(kw["Body"])
            return {}
        if method == "create_multipart_upload":
            upload = f"u{len(self._uploads)}"
            self._uploads[upload] = {}
            return {"UploadId": upload}
        if method == "upload_part":
            self._uploads[kw["UploadId"]][kw["PartNumber"]] = bytes(kw["Body"])
            return {"ETag": f'"{kw["PartNumber"]}"'}
        if method == "complete_multipart_upload":
            parts = self._uploads.pop(kw["UploadId"])
            numbers = [p["PartNumber"] for p in kw["MultipartUpload"]["Parts"]]
            self.objects[where] = b"".join(parts[n] for n in numbers)
            return {}
        if method == "abort_multipart_upload":
            self._uploads.pop(kw["UploadId"], None)
            return {}
        raise NotImplementedError(method)


class _RecordingMemory(MemoryFileSystem):
    """A memory filesystem of its own (not memory://'s store) that records exists() and pipe_file() calls."""
    cachable = False
    _lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store, self.pseudo_dirs = {}, [""]
        self.calls: list[tuple] = []

    def exists(self, path, **kwargs):
        self.calls.append(("exists", path))
        return super().exists(path, **kwargs)

    def _store(self, path, data, refuse_existing: bool) -> None:
        with self._lock:  # the store's own check-and-create: atomic
            if refuse_existing and self._strip_protocol(path) in self.store:
                raise self.exists_error(path)
            MemoryFileSystem.pipe_file(self, path, data)

    exists_error = FileExistsError


class FakeGCS(_RecordingMemory):
    """gcsfs's pipe_file signature (no **kwargs: an unknown keyword is a TypeError, as in gcsfs)."""
    protocol = ("gs", "gcs")

    def pipe_file(self, path, data, metadata=None, consistency=None, content_type="application/octet-stream",
                  fixed_key_metadata=None, chunksize=50 * 2**20, mode="overwrite"):
        self.calls.append(("pipe_file", path, {"mode": mode}))
        self._store(path, data, refuse_existing=mode == "create")


class FakeOldGCS(_RecordingMemory):
    """gcsfs before 2024.12: pipe_file has no mode, so no create-only write."""
    protocol = ("gs", "gcs")

    def pipe_file(self, path, data, metadata=None, consistency=None, content_type="application/octet-stream",
                  fixed_key_metadata=None, chunksize=50 * 2**20):
        self.calls.append(("pipe_file", path, {}))
        self._store(path, data, refuse_existing=False)


class ResourceExistsError(Exception):
    """Named as azure.core.exceptions' class: what adlfs before 2024.12 let through on a refused create."""
    status_code = 409


class FakeAzure(_RecordingMemory):
    """adlfs's pipe_file signature; a refused create raises the Azure SDK's error, as older adlfs does."""
    protocol = ("abfs", "az", "abfss")
    exists_error = ResourceExistsError

    def pipe_file(self, path, value, overwrite=True, max_concurrency=None, **kwargs):
        self.calls.append(("pipe_file", path, {"overwrite": overwrite, **kwargs}))
        self._store(path, value, refuse_existing=not overwrite)
