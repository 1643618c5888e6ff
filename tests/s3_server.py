"""A real S3 server for tests and benchmarks: a throwaway single-node Ceph cluster (one monitor, one memstore
OSD, one radosgw) bound to 127.0.0.1, living in a temp directory, started in about 2 s.

Who calls what, and when:
  pytest        the session-scoped `s3_server` fixture (import it into a test module) calls start() once per
                session and stop() at teardown; it skips when the Ceph binaries are absent (install them with
                scripts/s3-deps.sh) unless SHARDCKPT_REQUIRE_S3=1, where it fails instead.
  benchmarks    `python tests/s3_server.py --serve` prints the endpoint and credentials as one JSON line and
                serves until SIGINT/SIGTERM.
Every process started here is stopped by its PID at stop(), and at interpreter exit if stop() was not called;
on Linux the daemons also get SIGTERM if the thread that started them dies (PR_SET_PDEATHSIG), so a killed test
run leaves nothing behind: call start() from a thread that outlives the server (the main thread).

Why the settings: the machine has no IPv6 (ms bind ipv6 = false); auth is off for the cluster (throwaway, loopback
only), but radosgw still needs `ms mon client mode = crc secure` to talk to the monitor; one OSD means pool size 1
and few PGs per pool (radosgw creates ~7 pools); the OSD keeps objects in RAM (memstore), so nothing touches disk
but the monitor's store. Paxos proposes every 10 ms instead of every second: each pool radosgw creates waits
for an osdmap commit, and this alone takes start-up from ~17 s to ~2 s. region: s3fs must get it from AWS_DEFAULT_REGION, not client_kwargs, or bucket creation
sends a LocationConstraint radosgw rejects. Daemons are stopped one at a time, newest first: radosgw and the
OSD exit in well under a second while the monitor is still up, but hang for seconds once it is gone.
Deleted objects are reclaimed within about a second (rgw gc obj min wait = 0, processor period 1 s) instead of
after radosgw's default two hours: the memstore OSD holds every byte in RAM, and once it holds ~2 GB its CPU
time per written byte measured 2-3x higher (0.2 -> 0.5-0.7 s per 200 MB), so a benchmark that deletes what it
no longer needs keeps every repeat on an equal footing.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
REGION = "us-east-1"
BUCKET = "shardckpt-test"
START_TIMEOUT_S = 90.0
# Each daemon runs in the foreground (-f), so the PID we spawned is the process to stop.
_STOP_GRACE_S = 5.0


@dataclass
class S3Server:
    """A running cluster: where to reach it and how to log in. `storage_options` is ready for s3fs/fsspec."""
    endpoint_url: str
    key: str
    secret: str
    bucket: str
    buckets: tuple[str, ...]
    region: str
    workdir: str
    pids: list[int] = field(default_factory=list)
    _procs: list = field(default_factory=list, repr=False)

    @property
    def storage_options(self) -> dict:
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def url(self, prefix: str = "") -> str:
        """s3:// URL of a prefix in the main bucket."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def info(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret,
                "bucket": self.bucket, "buckets": list(self.buckets), "region": self.region,
                "storage_options": self.storage_options, "env": {"AWS_DEFAULT_REGION": self.region},
                "workdir": self.workdir, "pids": self.pids}


_running: list[S3Server] = []


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- not Linux: atexit and stop() still apply
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(workdir: str, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind ipv4 = true
ms mon client mode = crc secure
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
keyring = {workdir}/keyring
run dir = {workdir}/run
admin socket = {workdir}/run/$name.asok
pid file = {workdir}/run/$name.pid
log file = {workdir}/log/$name.log
crash dir = {workdir}/crash
mon data = {workdir}/mon/$name
osd data = {workdir}/osd/$name
osd objectstore = memstore
memstore device bytes = 4294967296
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
paxos propose interval = 0.01
paxos min wait = 0.001
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
osd memory target = 536870912
osd max object name len = 460
osd max object namespace len = 64

[client]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {workdir}/rgw/$name
rgw dns name = 127.0.0.1
rgw thread pool size = 64
rgw enable usage log = false
rgw max chunk size = 4194304
rgw gc obj min wait = 0
rgw gc processor period = 1
rgw gc processor max time = 1
"""


def _run(args: list[str], conf: str, timeout: float = 30.0) -> str:
    proc = subprocess.run([*args[:1], "-c", conf, *args[1:]], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _wait(what: str, check, deadline: float, workdir: str, interval: float = 0.25):
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001 -- polling a daemon that is still starting
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; logs in {workdir}/log")
        time.sleep(interval)


def start(timeout: float = START_TIMEOUT_S) -> S3Server:
    """Start a throwaway cluster and return it (blocking until radosgw answers and the bucket exists)."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"Ceph binaries missing: {', '.join(missing)} (run scripts/s3-deps.sh)")
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    deadline = time.monotonic() + timeout
    workdir = tempfile.mkdtemp(prefix="shardckpt-ceph-")
    for sub in ("run", "log", "crash", "mon", "osd", "rgw"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    fsid = str(uuid.uuid4())
    mon_port, rgw_port = _free_port(), _free_port()
    conf = os.path.join(workdir, "ceph.conf")
    with open(conf, "w") as f:
        f.write(_conf(workdir, fsid, mon_port, rgw_port))
    server = S3Server(endpoint_url=f"http://127.0.0.1:{rgw_port}", key="shardckpt" + uuid.uuid4().hex[:12],
                      secret=uuid.uuid4().hex + uuid.uuid4().hex[:8], bucket=BUCKET, buckets=(BUCKET,),
                      region=REGION, workdir=workdir)
    _running.append(server)

    def spawn(args: list[str], name: str) -> None:
        log = open(os.path.join(workdir, "log", f"{name}.stdout"), "wb")
        proc = subprocess.Popen([*args[:1], "-c", conf, *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=workdir, preexec_fn=_die_with_parent)
        log.close()
        server._procs.append(proc)
        server.pids.append(proc.pid)

    try:
        monmap = os.path.join(workdir, "monmap")
        _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", monmap],
             conf)
        _run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap], conf)
        spawn(["ceph-mon", "-f", "-i", "a"], "mon.a")

        def ceph(*args: str, timeout_s: float = 20.0) -> str:
            return _run(["ceph", "--connect-timeout", "10", *args], conf, timeout=timeout_s)

        _wait("the monitor", lambda: ceph("mon", "stat", timeout_s=12), deadline, workdir)
        osd_uuid = str(uuid.uuid4())
        osd_id = ceph("osd", "new", osd_uuid).strip()
        os.makedirs(os.path.join(workdir, "osd", f"osd.{osd_id}"), exist_ok=True)  # memstore keeps fsid there
        _run(["ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], conf, timeout=30)
        spawn(["ceph-osd", "-f", "-i", osd_id], f"osd.{osd_id}")
        _wait("the OSD", lambda: json.loads(ceph("osd", "stat", "-f", "json")).get("num_up_osds", 0) >= 1,
              deadline, workdir)
        spawn(["radosgw", "-f", "-n", "client.rgw.a"], "rgw.a")
        _wait("radosgw", lambda: _http_ok(rgw_port), deadline, workdir)
        _run(["radosgw-admin", "user", "create", "--uid", "shardckpt", "--display-name", "shardckpt tests",
              "--access-key", server.key, "--secret-key", server.secret], conf, timeout=30)
        _wait("bucket creation", lambda: _make_buckets(server) or True, deadline, workdir, interval=0.5)
    except BaseException:
        stop(server, keep_logs=True)
        raise
    return server


def _http_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        return s.recv(12).startswith(b"HTTP/1.")


def _make_buckets(server: S3Server) -> None:
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
    for bucket in server.buckets:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    # radosgw creates its data pool on the first object write (~2 s): pay that here, not in a timed test.
    probe = f"{server.bucket}/.probe"
    fs.pipe_file(probe, b"1")
    fs.rm_file(probe)


def stop(server: S3Server | None = None, keep_logs: bool = False) -> None:
    """Stop every process started for `server` (all running servers if None) by PID and remove its temp dir
    (all but log/, kept for a post-mortem, when `keep_logs`)."""
    for s in ([server] if server is not None else list(_running)):
        for proc in reversed(s._procs):  # radosgw, then osd, then mon
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        s._procs.clear()
        if keep_logs:
            for name in os.listdir(s.workdir):
                if name != "log":
                    shutil.rmtree(os.path.join(s.workdir, name), ignore_errors=True)
        else:
            shutil.rmtree(s.workdir, ignore_errors=True)
        if s in _running:
            _running.remove(s)


atexit.register(stop)

try:
    import pytest
except ImportError:  # --serve does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def s3_server():
        """A running S3Server for the whole session; skips (or fails with SHARDCKPT_REQUIRE_S3=1) without Ceph."""
        required = os.environ.get("SHARDCKPT_REQUIRE_S3") == "1"
        missing = missing_binaries()
        if missing:
            reason = f"S3 server unavailable: Ceph binaries missing ({', '.join(missing)}); run scripts/s3-deps.sh"
            if required:
                pytest.fail(reason + " [SHARDCKPT_REQUIRE_S3=1]")
            pytest.skip(reason)
        server = start()
        try:
            yield server
        finally:
            stop(server)


def _serve() -> None:
    server = start()
    print(json.dumps(server.info()), flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping:
            time.sleep(0.5)
            if any(p.poll() is not None for p in server._procs):
                print(f"a Ceph daemon exited; logs in {server.workdir}/log", file=sys.stderr)
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python tests/s3_server.py --serve")
    _serve()
