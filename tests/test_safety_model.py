"""Model-based check (hypothesis stateful) of the product's core guarantee: no committed checkpoint ever loses
its data, and nothing is deleted on a guess (DESIGN.md principle 9; FORMAT.md §2 rules 3-5, §7 "Retention",
§8 "Local tier").

SafetyMachine drives one root (a local temp directory, or a fresh `memory://` root per example) through:
full saves (content_hash=True) and incremental saves (base= any committed checkpoint) under step-style and
sibling names ("final", "best", "last"), with or without overwrite=True; async saves held in flight while
other rules run; a CheckpointManager (every sequence starts one; restarts draw new keep_last / keep_best /
keep_every_steps / incremental rules) saving strictly increasing steps with a "loss" metric; restores; gc
with no grace period; loads. Any operation may meet a fault: an exception at its n-th delete / commit call
(a StorageError the library sees, or InjectedCrash, which unwinds it like a dying process), or one
transient StorageError at its n-th read / exists / listing.

The model holds, per name, the state saved there by the last save that returned normally. A save that
raised has an unknown outcome (the old or the new state may be there; a crashed manager is replaced); the
next observation of storage settles it. After every rule, on storage and without faults:
  - every directory holding a committed manifest.json loads bit-exactly, as a state the model allows there;
  - a committed checkpoint disappears only if it is a step directory that the retention rules of the
    manager whose save committed in this rule may delete (may_retire, written here from the README's rules,
    not taken from shardckpt.policy): never a sibling name, never the latest step, never one of the best
    keep_best by the metric, never at a gc, a load, a restore or a plain save;
  - a load or restore that returns (faults or not) returns exactly what was saved.
TierMachine does the same for the node-local tier in one process (local saves every step, promotions every
third, local_keep_last=2, restores under faults), on both roots.

Determinism: the sequences are derandomized, save ids are a function of the example (uuid4 is replaced), an
async save's background part waits at a gate (before its writes or before its commit round) until the rule
that waits for it, and a fault counts only the calls of the operation's own threads.

Cost (2 shared cores, measured): about 60 CPU-seconds per 1,000 sequences of either root kind (about
2 minutes wall per 1,000 while the machine was loaded). CI: CI_EXAMPLES per root kind plus TIER_EXAMPLES.
The slow test runs SHARDCKPT_MODEL_EXAMPLES (e.g. 20000) sequences in total, split over the root kinds.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
import zlib

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import shardckpt
from shardckpt.lifecycle import commit as commit_mod
from shardckpt.saving import pipeline
from shardckpt.errors import StorageError
from shardckpt.manager import CheckpointManager, gc_uncommitted
from shardckpt.storage.fsspec import FsspecStorage
from shardckpt.storage.local import LocalStorage

CI_EXAMPLES = 1000          # per root kind: 2,000 sequences in CI
CI_STEPS = 18               # rules per sequence at most
TIER_EXAMPLES, TIER_STEPS = 200, 12  # the node-local tier's machine (one process, local roots)
SIBLINGS = ("final", "best", "last")
STEP_NAMES = ("step-0000000001", "step-0000000002", "step-0000000003")
NAMES = STEP_NAMES + SIBLINGS
STEP_RE = re.compile(r"^step-(\d+)$")  # what a manager calls a step directory (shardckpt.lifecycle.layout.STEP_DIR)
MANIFEST = "manifest.json"
WAIT_S = 60.0               # an async save held at its gate finishes in milliseconds once released


def step_name(step: int) -> str:
    return f"step-{step:010d}"


# ----------------------------------------------------------------------------------------------- states

@dataclasses.dataclass(frozen=True)
class Version:
    """One saved state: `vid` is unique per save and is saved with it (the plain value "v"), so a load
    tells which save's state it returned. `frozen` and `emb` pick one of two variants (mostly the first),
    so consecutive saves share chunks and incremental saves really refer to earlier ones; "head" differs in
    every save. `loss` is the monitored metric of a manager save (None: saved without it)."""
    vid: int
    frozen: int
    emb: int
    loss: float | None = None

    def __repr__(self) -> str:
        return f"v{self.vid}"


_TENSORS: dict[tuple, torch.Tensor] = {}


def _tensor(kind: str, seed: int) -> torch.Tensor:
    key = (kind, seed)
    if key not in _TENSORS:
        g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        if kind == "frozen":
            t = torch.randn(300, generator=g)
        elif kind == "emb":
            t = torch.randn(20, 10, generator=g).bfloat16()
        else:
            t = torch.randn(128, generator=g)
        _TENSORS[key] = t
    return _TENSORS[key]


def state_of(v: Version) -> dict:
    """A fresh state dict holding v's values (fresh tensors: the caller may change them)."""
    return {"frozen": {"w": _tensor("frozen", v.frozen).clone()}, "emb": _tensor("emb", v.emb).clone(),
            "head": _tensor("head", v.vid).clone(), "v": v.vid}


def blank_state() -> dict:
    """What a restore loads into."""
    return {"frozen": {"w": torch.full((300,), -1.0)}, "emb": torch.zeros(20, 10, dtype=torch.bfloat16),
            "head": torch.full((128,), -1.0), "v": -1}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def holds(got: dict, v: Version) -> bool:
    """Bit-exact equality of a loaded state with v's."""
    want = state_of(v)
    try:
        pairs = [(got["frozen"]["w"], want["frozen"]["w"]), (got["emb"], want["emb"]), (got["head"], want["head"])]
        if got["v"] != v.vid:
            return False
    except (KeyError, TypeError):
        return False
    return all(isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
               and torch.equal(_bits(a), _bits(b)) for a, b in pairs)


# ----------------------------------------------------------------------------------------------- faults

class InjectedCrash(BaseException):
    """A crash at a storage call: unwinds the operation past every `except Exception`, as a process that
    dies there would stop it (finally blocks aside); the machine then starts its manager afresh."""


CRASH_METHODS = ("delete", "delete_tree", "commit", "replace")
READ_METHODS = ("read_file", "read_ranges", "exists", "list_dir")
_BACKENDS = (LocalStorage, FsspecStorage)


@dataclasses.dataclass
class Fault:
    """Raise once at the `at`-th call of any of `methods` during the next operation, then behave normally.
    Calls are counted on the operation's own threads (the caller's, and the pools a load reads with), not
    on the threads that run beside it (an async save's background part, a promotion's uploader), so which
    call fails does not depend on their timing."""
    methods: tuple
    at: int
    crash: bool  # InjectedCrash instead of a StorageError
    calls: int = 0
    fired: str | None = None

    def __repr__(self) -> str:
        what = "crash" if self.crash else "StorageError"
        return f"Fault({what} at call {self.at} of {'/'.join(self.methods)})"


class _Armed:
    fault: Fault | None = None


ARMED = _Armed()
MAIN = threading.main_thread()
BESIDE = ("shardckpt-async", "shardckpt-upload")  # thread name prefixes of work that overlaps the caller's
_count_lock = threading.Lock()


def _faulty(name: str, real):
    def method(self, *args, **kwargs):
        f = ARMED.fault
        if f is not None and f.fired is None and name in f.methods \
                and not threading.current_thread().name.startswith(BESIDE):
            with _count_lock:
                f.calls += 1
                fire = f.calls == f.at
                if fire:
                    f.fired = f"{type(self).__name__}.{name}({', '.join(map(repr, args[:1]))})"
            if fire:
                if f.crash:
                    raise InjectedCrash(f.fired)
                raise StorageError(f"injected transient failure of {name}", file=str(args[0]) if args else "")
        return real(self, *args, **kwargs)
    method.__wrapped__ = real
    return method


def run_op(fn, fault: Fault | None = None):
    """Run one operation with `fault` armed (if any); returns (result, exception): any exception is an
    outcome the model allows (a save that raised may or may not have committed)."""
    ARMED.fault = None if fault is None else dataclasses.replace(fault)  # a fresh count per run
    try:
        return fn(), None
    except (Exception, InjectedCrash) as e:  # noqa: BLE001
        return None, e
    finally:
        ARMED.fault = None


def install_fault_hooks(monkeypatch) -> None:
    for cls in _BACKENDS:
        for name in CRASH_METHODS + READ_METHODS:
            if name in vars(cls):
                monkeypatch.setattr(cls, name, _faulty(name, vars(cls)[name]))


# ------------------------------------------------------------------------------------------ save ids

class _Ids:
    """uuid4 made a function of the example: save ids name data directories, and the order in which gc and
    retention visit those decides which call an injected fault hits, so random ids would make a failing
    sequence fail only sometimes (hypothesis: Flaky). Reset by every machine's __init__."""
    lock = threading.Lock()
    rng = random.Random(0)


def _repeatable_uuid4() -> uuid.UUID:
    with _Ids.lock:
        return uuid.UUID(int=_Ids.rng.getrandbits(128), version=4)


def install_repeatable_ids(monkeypatch) -> None:
    monkeypatch.setattr(uuid, "uuid4", _repeatable_uuid4)


def reset_ids() -> None:
    with _Ids.lock:
        _Ids.rng = random.Random(0)


# ------------------------------------------------------------------------------------------- async gate

class _Gate:
    """Holds an async save's background part (on its thread only) at `point` until `event` is set;
    `reached` is set when it got there."""
    point: str | None = None
    event: threading.Event | None = None
    reached: threading.Event | None = None


GATE = _Gate()


def install_async_gate(monkeypatch) -> None:
    real_write, real_finish = pipeline.write_rank, commit_mod.finish

    def hold(point):
        ev, reached = GATE.event, GATE.reached
        if GATE.point == point and ev is not None and threading.current_thread() is not MAIN:
            reached.set()
            ev.wait(WAIT_S)

    def write_rank(*a, **kw):
        hold("before_write")
        return real_write(*a, **kw)

    def finish(*a, **kw):
        hold("before_commit")
        return real_finish(*a, **kw)
    monkeypatch.setattr(pipeline, "write_rank", write_rank)
    monkeypatch.setattr(commit_mod, "finish", finish)


# ------------------------------------------------------------------------------------------------ roots

class Root:
    """A fresh root and an observer of it that goes around shardckpt's Storage classes (which carry the
    fault hooks): os.* for a local directory, the fsspec filesystem itself for memory://."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "local":
            # a tmpfs where there is one: the same POSIX calls, without waiting on a disk for every fsync
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self.path = tempfile.mkdtemp(prefix="shardckpt-model-", dir=shm)
            self.url = self.path
        else:
            self.fs = fsspec.filesystem("memory")
            self.path = f"/shardckpt-model-{os.urandom(12).hex()}"  # uuid4 is made repeatable below
            self.url = f"memory:/{self.path}"

    def join(self, name: str) -> str:
        return f"{self.url}/{name}"

    def names(self) -> list[str]:
        if self.kind == "local":
            return sorted(n for n in os.listdir(self.path) if os.path.isdir(os.path.join(self.path, n)))
        try:
            return sorted({e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path, detail=True)
                           if e["type"] == "directory"})
        except FileNotFoundError:
            return []

    def committed(self, name: str) -> bool:
        if self.kind == "local":
            return os.path.isfile(os.path.join(self.path, name, MANIFEST))
        return self.fs.isfile(f"{self.path}/{name}/{MANIFEST}")

    def fingerprint(self, name: str):
        """What a load of root/name depends on: its manifest's bytes and the (path, size, time) of every file
        of the data directories it names (its own and its bases', FORMAT.md §7). Equal fingerprints: the load
        gives the same result, so the invariant need not load it again. None: not committed."""
        import json
        try:
            raw = self._read(f"{name}/{MANIFEST}")
        except FileNotFoundError:
            return None
        try:
            m = json.loads(raw)
            dirs = [(name, m["save_id"])] + [(b["dir"], b["save_id"]) for b in m.get("bases") or ()]
        except Exception:  # noqa: BLE001 - not ours to judge: the load will say
            return (raw, None)
        return (raw, tuple(f for d, sid in sorted(dirs) for f in self._files(f"{d}/data/{sid}")))

    def _read(self, rel: str) -> bytes:
        if self.kind == "local":
            with open(os.path.join(self.path, rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(f"{self.path}/{rel}")

    def _files(self, rel: str) -> list[tuple]:
        if self.kind == "local":
            top = os.path.join(self.path, rel)
            out = []
            for d, _, files in os.walk(top):
                for f in files:
                    st_ = os.stat(os.path.join(d, f))
                    out.append((os.path.relpath(os.path.join(d, f), self.path), st_.st_size, st_.st_mtime_ns))
            return sorted(out)
        try:
            found = self.fs.find(f"{self.path}/{rel}", detail=True)
        except FileNotFoundError:
            return []
        return sorted((k, e.get("size"), str(e.get("created"))) for k, e in found.items())

    def remove(self) -> None:
        if self.kind == "local":
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            try:
                self.fs.rm(self.path, recursive=True)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------------- retention

@dataclasses.dataclass(frozen=True)
class MgrConfig:
    keep_last: int | None
    keep_best: int
    keep_every_steps: int | None
    incremental: bool
    full_every: int

    def kwargs(self) -> dict:
        kw = dict(keep_last=self.keep_last, keep_best=self.keep_best, monitor="loss",
                  keep_every_steps=self.keep_every_steps, async_save=False, preemption_signals=())
        if self.incremental:  # full_every without incremental=True is a ConfigError
            kw.update(incremental=True, full_every=self.full_every)
        return kw


def may_retire(cfg: MgrConfig, committed: dict[str, Version]) -> set[str]:
    """The step directories that retention (docs/guide/manager.md, retention) may delete after
    a manager with `cfg` committed, given every committed checkpoint under the root. Kept: the latest step,
    the last keep_last, the best keep_best by loss (lower is better; ties: the newer step), the multiples of
    keep_every_steps; keep_last and keep_best both unset: everything. Sibling names are never steps."""
    steps = sorted(int(m.group(1)) for n in committed if (m := STEP_RE.match(n)))
    if not steps or (cfg.keep_last is None and not cfg.keep_best):
        return set()
    keep = {steps[-1]}
    if cfg.keep_last:
        keep.update(steps[-cfg.keep_last:])
    if cfg.keep_best:
        scored = sorted((committed[step_name(s)].loss, -s) for s in steps
                        if committed[step_name(s)].loss is not None)
        keep.update(-neg for _, neg in scored[:cfg.keep_best])
    if cfg.keep_every_steps:
        keep.update(s for s in steps if s % cfg.keep_every_steps == 0)
    return {step_name(s) for s in steps if s not in keep}


# --------------------------------------------------------------------------------------------- invariant

def observe_root(root: Root, candidates: list, verified: dict) -> tuple[dict, dict]:
    """Every committed checkpoint under `root`, loaded without faults: (name -> the saved state it holds,
    the new `verified` cache). A committed manifest that does not load bit-exactly as one of `candidates`
    is a failure. A checkpoint whose fingerprint did not change since its last bit-exact load is not
    loaded again."""
    by_vid = {v.vid: v for v in candidates if v is not None}
    seen, now = {}, {}
    for name in root.names():
        key = root.fingerprint(name)
        if key is None:
            continue
        if verified.get(name, (None,))[0] == key:
            now[name] = verified[name]
            seen[name] = now[name][1]
            continue
        try:
            got = shardckpt.load_full(root.join(name))
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{root.url}/{name} holds a committed manifest but does not load: "
                                 f"{type(e).__name__}: {e}") from e
        v = by_vid.get(got.get("v") if isinstance(got, dict) else None)
        assert v is not None and holds(got, v), f"{root.url}/{name} loads a state no save of the model put there"
        seen[name] = v
        now[name] = (key, v)
    return seen, now


def judge(seen: dict, model: dict, exact: dict, maybe: dict, may_go: set, extra: dict, why: str) -> None:
    """After one rule: what each name holds must be what the model allows. `exact`: names a save that
    returned normally committed (only that state); `maybe`: states a save that raised may have committed
    (or not); `may_go`: names that may have disappeared (retention's); `extra`: name -> more allowed states
    (an async save in flight)."""
    for name in sorted(set(seen) | set(model) | set(exact) | set(maybe)):
        allowed = {exact[name]} if name in exact else {model.get(name)} | maybe.get(name, set())
        if name in may_go:
            allowed.add(None)
        allowed |= extra.get(name, set())
        got = seen.get(name)
        if got in allowed:
            continue
        if got is None:
            what = "a sibling, never retention's" if not STEP_RE.match(name) else why
            raise AssertionError(f"committed checkpoint {name} ({model.get(name) or exact.get(name)}) is gone: "
                                 f"{what}; only these could go: {sorted(may_go)}")
        raise AssertionError(f"{name} holds {got}; allowed: {sorted(allowed, key=repr)}")


# ----------------------------------------------------------------------------------------------- machine

configs = st.builds(MgrConfig, keep_last=st.sampled_from([1, 1, 2, 3, None]), keep_best=st.sampled_from([0, 1, 1, 2]),
                    keep_every_steps=st.sampled_from([None, None, 2, 3]), incremental=st.booleans(),
                    full_every=st.sampled_from([2, 3, 8]))  # full_every: used only with incremental
variants = st.sampled_from([0, 0, 0, 1])
losses = st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])
_counts = st.integers(1, 4) | st.integers(1, 16)
# the fault an operation meets, if any: one StorageError (the library sees it) or InjectedCrash (the operation
# dies there) at the n-th delete / commit call; or one transient StorageError at the n-th read of a kind
faults = st.none() | st.none() | st.builds(
    Fault, methods=st.sampled_from([CRASH_METHODS, ("delete", "delete_tree"), ("commit", "replace")]),
    at=_counts, crash=st.booleans()) | st.builds(
    Fault, methods=st.sampled_from([READ_METHODS, ("read_file",), ("exists",), ("list_dir",), ("read_ranges",)]),
    at=_counts, crash=st.just(False))


class SafetyMachine(RuleBasedStateMachine):
    root_kind = "local"

    def __init__(self):
        super().__init__()
        self.root = Root(self.root_kind)
        self.model: dict[str, Version] = {}   # name -> committed state (settled by the last observation)
        self.next_vid = 1
        self.last_step = 0                     # manager steps increase strictly, across restarts
        self.mgr: CheckpointManager | None = None
        self.cfg: MgrConfig | None = None
        self.inflight = None                   # (handle, name, Version) of the async save held at its gate
        self.exact: dict[str, Version] = {}    # this rule: name -> the state a save that returned put there
        self.maybe: dict[str, set] = {}        # this rule: name -> states a save that raised may have put there
        self.retention = None                  # this rule: (config, step name, state) of a manager save
        self.verified: dict[str, tuple] = {}   # name -> (Root.fingerprint, state) of its last bit-exact load
        ARMED.fault = None
        GATE.point, GATE.event = None, None
        reset_ids()

    # ------------------------------------------------------------------------------------------ helpers
    def new_version(self, frozen: int, emb: int, loss: float | None = None) -> Version:
        v = Version(self.next_vid, frozen, emb, loss)
        self.next_vid += 1
        return v

    def may_hold(self, name: str, what) -> None:
        self.maybe.setdefault(name, set()).add(what)

    def close_manager(self) -> None:
        if self.mgr is not None:
            try:
                self.mgr.close()
            except (Exception, InjectedCrash):  # noqa: BLE001
                pass
            self.mgr = None

    def teardown(self):
        ARMED.fault = None
        try:
            if GATE.event is not None:
                GATE.event.set()
            if self.inflight is not None:
                try:
                    self.inflight[0].wait(timeout=WAIT_S)
                except Exception:  # noqa: BLE001
                    pass
            self.close_manager()
        finally:
            GATE.point, GATE.event = None, None
            self.root.remove()

    def committed_names(self) -> list[str]:
        return sorted(self.model)

    # ------------------------------------------------------------------------------------------ saves
    @rule(name=st.sampled_from(NAMES), frozen=variants, emb=variants, data=st.data(),
          use_base=st.booleans(), overwrite=st.booleans(), fault=faults)
    def save(self, name, frozen, emb, data, use_base, overwrite, fault):
        """shardckpt.save to root/name: full with content hashes, or incremental on a committed checkpoint
        of any name; overwrite=True replaces a committed checkpoint there."""
        if self.inflight is not None and name == self.inflight[1]:
            return  # one save at a time per name (the async one holds it)
        others = [n for n in self.committed_names() if n != name]
        base = data.draw(st.sampled_from(others), label="base") if use_base and others else None
        v = self.new_version(frozen, emb)
        kw = {"base": self.root.join(base)} if base else {"content_hash": True}
        existed = name in self.model
        _, err = run_op(lambda: shardckpt.save(state_of(v), self.root.join(name), overwrite=overwrite, **kw),
                             fault)
        if err is None:
            assert overwrite or not existed, (
                f"save to {name} returned over a committed checkpoint without overwrite=True")
            self.exact[name] = v  # committed: nothing else may be there now
        else:
            self.may_hold(name, v)

    @precondition(lambda self: self.inflight is None)
    @rule(name=st.sampled_from(NAMES), frozen=variants, emb=variants, data=st.data(), use_base=st.booleans(),
          overwrite=st.booleans(), point=st.sampled_from(["before_write", "before_commit"]), fault=faults)
    def start_async_save(self, name, frozen, emb, data, use_base, overwrite, point, fault):
        """shardckpt.async_save; its background part waits at `point` until finish_async_save, so the rules
        in between (retention, gc, saves, loads) run while it is in flight."""
        others = [n for n in self.committed_names() if n != name]
        base = data.draw(st.sampled_from(others), label="base") if use_base and others else None
        v = self.new_version(frozen, emb)
        kw = {"base": self.root.join(base)} if base else {"content_hash": True}
        GATE.point, GATE.event, GATE.reached = point, threading.Event(), threading.Event()
        handle, err = run_op(lambda: shardckpt.async_save(state_of(v), self.root.join(name),
                                                               overwrite=overwrite, **kw), fault)
        if err is not None:
            GATE.event.set()
            GATE.point, GATE.event = None, None
            self.may_hold(name, v)
            return
        self.inflight = (handle, name, v)
        # the background part runs up to the gate now, so the next rules never race with its writes
        deadline = time.monotonic() + WAIT_S
        while not GATE.reached.wait(0.002):
            assert not time.monotonic() > deadline, "an async save neither reached its gate nor finished"
            if handle.done():
                break

    @precondition(lambda self: self.inflight is not None)
    @rule()
    def finish_async_save(self):
        handle, name, v = self.inflight
        GATE.event.set()
        try:
            _, err = run_op(lambda: handle.wait(timeout=WAIT_S))
        finally:
            GATE.point, GATE.event = None, None
            self.inflight = None
        assert not isinstance(err, TimeoutError), "an async save did not finish"
        if err is None:
            self.exact[name] = v
        else:
            self.may_hold(name, v)

    # --------------------------------------------------------------------------------------- manager
    @initialize(cfg=configs)
    def first_manager(self, cfg):
        """Every sequence starts with a CheckpointManager on the root (so manager saves are common)."""
        self.mgr, self.cfg = CheckpointManager(self.root.url, **cfg.kwargs()), cfg

    @rule(cfg=configs, fault=faults)
    def start_manager(self, cfg, fault):
        """A (re)started job: a new CheckpointManager with these retention rules on the same root."""
        self.close_manager()
        self.mgr, _ = run_op(lambda: CheckpointManager(self.root.url, **cfg.kwargs()), fault)
        self.cfg = cfg

    @precondition(lambda self: self.mgr is not None)
    @rule(gap=st.integers(1, 2), loss=losses, frozen=variants, emb=variants, fault=faults)
    def manager_save(self, gap, loss, frozen, emb, fault):
        """CheckpointManager.save(step, state, metrics={"loss": x}) (synchronous), then its retention."""
        # above every step directory there (a new step is the latest: rolling back is another test's job)
        named = [int(m.group(1)) for n in list(self.model) + ([self.inflight[1]] if self.inflight else [])
                 if (m := STEP_RE.match(n))]
        step = max([self.last_step] + named) + gap
        self.last_step = step
        name = step_name(step)
        v = self.new_version(frozen, emb, loss)
        existed = name in self.model
        _, err = run_op(lambda: self.mgr.save(step, state_of(v), metrics={"loss": loss}), fault)
        if isinstance(err, InjectedCrash):
            self.mgr = None  # the process died: a restarted job makes a new manager
        if err is None:
            assert not existed, f"manager save of {name} returned over a committed checkpoint"
            self.exact[name] = v
        else:
            self.may_hold(name, v)
        # retention runs only once the new step committed (settled in the invariant), by this manager's rules
        self.retention = (self.cfg, name, v)

    @precondition(lambda self: self.mgr is not None)
    @rule(fault=faults)
    def manager_restore(self, fault):
        """CheckpointManager.restore("latest") (typically under an armed read fault): if it returns a step,
        the state holds exactly that step's committed values."""
        into = blank_state()
        got, err = run_op(lambda: self.mgr.restore(into), fault)
        if isinstance(err, InjectedCrash):
            self.mgr = None
        if err is None and got is not None:
            v = self.model.get(step_name(got))
            assert v is not None, f"restore returned step {got}, which is not committed"
            assert holds(into, v), f"restore of step {got} did not give {v} bit-exactly"

    # --------------------------------------------------------------------------------------- gc / load
    @precondition(lambda self: self.inflight is None or STEP_RE.match(self.inflight[1]))
    @rule(fault=faults)
    def gc(self, fault):
        """gc_uncommitted with no grace period. An async save of this machine in flight is excluded by its
        step; with one in flight to a sibling name gc does not run (gc may take its files: it cannot tell
        them from a crashed save's)."""
        exclude = [int(STEP_RE.match(self.inflight[1]).group(1))] if self.inflight else []
        run_op(lambda: gc_uncommitted(self.root.url, dry_run=False, grace_s=0, exclude=exclude), fault)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), fault=faults)
    def load(self, data, fault):
        """load_full of a committed checkpoint (typically under an armed read fault): it raises or returns
        exactly what was committed."""
        name = data.draw(st.sampled_from(self.committed_names()), label="name")
        v = self.model[name]
        got, err = run_op(lambda: shardckpt.load_full(self.root.join(name)), fault)
        if err is None:
            assert holds(got, v), f"load_full({name}) returned a state that is not {v}"

    # ----------------------------------------------------------------------------------------- invariant
    def observe(self, candidates: list[Version]) -> dict[str, Version]:
        if self.inflight is not None:
            candidates = candidates + [self.inflight[2]]
        seen, self.verified = observe_root(self.root, list(self.model.values()) + candidates, self.verified)
        return seen

    @invariant()
    def no_committed_checkpoint_lost(self):
        ARMED.fault = None
        self._check()

    def _check(self):
        retention, self.retention = self.retention, None
        exact, self.exact = self.exact, {}
        maybe, self.maybe = self.maybe, {}
        seen = self.observe(list(exact.values()) + [v for vs in maybe.values() for v in vs])
        retirable: set[str] = set()
        if retention is not None:
            cfg, name, v = retention
            if seen.get(name) == v:  # the new step committed, so retention may have run
                retirable = may_retire(cfg, {**self.model, name: v})
        extra = {self.inflight[1]: {self.inflight[2]}} if self.inflight is not None else {}
        judge(seen, self.model, exact, maybe, retirable, extra,
              "a step retention must keep" if retention is not None else "no retention ran")
        self.model = seen


class TierMachine(RuleBasedStateMachine):
    """The node-local tier in one process (docs/guide/local-tier.md; FORMAT.md §8): a manager saves every
    step to local_root (local_keep_last=2) and every third step also to the durable root (a promotion of the
    local step), with faults; restarts; restores under faults. Invariant, on both roots: every committed
    checkpoint loads bit-exactly as what was saved at that step; the durable root (no retention configured)
    never loses one; a local step goes only when local retention may take it after a local commit (not among
    the newest two, or newer than a step restored since: an abandoned timeline), never at a restore."""

    def __init__(self):
        super().__init__()
        self.durable, self.local = Root("local"), Root("local")
        self.models = {"durable": {}, "local": {}}
        self.verified = {"durable": {}, "local": {}}
        self.exact, self.maybe = {"durable": {}, "local": {}}, {"durable": {}, "local": {}}
        self.may_go: set[str] = set()
        self.set_aside: set[str] = set()  # local steps newer than a restored one
        self.next_vid, self.last_step, self.mgr = 1, 0, None
        ARMED.fault = None
        reset_ids()

    def teardown(self):
        ARMED.fault = None
        try:
            if self.mgr is not None:
                self.mgr.close()
        except (Exception, InjectedCrash):  # noqa: BLE001
            pass
        finally:
            self.durable.remove()
            self.local.remove()

    def _new(self):
        return CheckpointManager(self.durable.url, local_root=self.local.url, local_every_steps=1, local_keep_last=2,
                                 save_every_steps=3, async_save=False, preemption_signals=())

    @initialize()
    def first_manager(self):
        self.mgr = self._new()

    @rule(fault=faults)
    def restart(self, fault):
        """A restarted job on the same two roots."""
        if self.mgr is not None:
            try:
                self.mgr.close()
            except (Exception, InjectedCrash):  # noqa: BLE001
                pass
        self.mgr, _ = run_op(self._new, fault)

    @precondition(lambda self: self.mgr is not None)
    @rule(loss=losses, frozen=variants, emb=variants, fault=faults)
    def tier_save(self, loss, frozen, emb, fault):
        """maybe_save(step): a local save every step, its promotion to the durable root every third."""
        self.last_step += 1
        step, name = self.last_step, step_name(self.last_step)
        v = Version(self.next_vid, frozen, emb, loss)
        self.next_vid += 1
        saved, err = run_op(lambda: self.mgr.maybe_save(step, state_of(v),
                                                                             metrics={"loss": loss}), fault)
        if isinstance(err, InjectedCrash):
            self.mgr = None
        tiers_ = ("local", "durable") if step % 3 == 0 else ("local",)
        for t in tiers_:
            if err is None:
                assert saved, f"maybe_save({step}) did not save"
                self.exact[t][name] = v
            else:
                self.maybe[t].setdefault(name, set()).add(v)
        local = self.models["local"]
        self.new_local = (name, v, sorted(local))  # retention may run once this step committed locally

    @precondition(lambda self: self.mgr is not None)
    @rule(fault=faults)
    def tier_restore(self, fault):
        """restore("latest") under a fault: a returned step loads exactly what was saved at it."""
        into = blank_state()
        got, err = run_op(lambda: self.mgr.restore(into), fault)
        if isinstance(err, InjectedCrash):
            self.mgr = None
        if err is None and got is not None:
            name = step_name(got)
            v = self.models["local"].get(name) or self.models["durable"].get(name)
            assert v is not None, f"restore returned step {got}, which is committed in neither tier"
            assert holds(into, v), f"restore of step {got} ({self.mgr.restored_tier}) did not give {v} bit-exactly"
            self.set_aside |= {n for n in self.models["local"] if int(STEP_RE.match(n).group(1)) > got}

    @invariant()
    def no_committed_checkpoint_lost(self):
        ARMED.fault = None
        new_local, self.new_local = getattr(self, "new_local", None), None
        for t, root in (("durable", self.durable), ("local", self.local)):
            exact, maybe, model = self.exact[t], self.maybe[t], self.models[t]
            cands = list(model.values()) + list(exact.values()) + [v for vs in maybe.values() for v in vs]
            seen, self.verified[t] = observe_root(root, cands, self.verified[t])
            may_go: set[str] = set()
            if t == "local" and new_local is not None and seen.get(new_local[0]) == new_local[1]:
                # a local step committed: keep_last=2 over the local steps, and the set-aside ones may go
                kept = sorted(set(new_local[2]) | {new_local[0]})[-2:]
                may_go = (set(new_local[2]) - set(kept)) | self.set_aside
                self.set_aside = set()
            judge(seen, model, exact, maybe, may_go, {}, f"a {t} step retention must keep")
            self.models[t] = seen
            self.exact[t], self.maybe[t] = {}, {}


def _machine(kind: str):
    return type(f"SafetyMachine_{kind}", (SafetyMachine,), {"root_kind": kind})


def _settings(examples: int, derandomize: bool, steps: int = CI_STEPS) -> settings:
    """derandomize: the same sequences on every run (CI); otherwise a failure also prints the
    @reproduce_failure blob that replays it. One failure is shrunk and reported (the minimal sequence); no
    example database is written."""
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=derandomize,
                    database=None, report_multiple_bugs=False, print_blob=not derandomize,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_no_committed_checkpoint_loses_its_data(kind, monkeypatch):
    install_fault_hooks(monkeypatch)
    install_repeatable_ids(monkeypatch)
    install_async_gate(monkeypatch)
    run_state_machine_as_test(_machine(kind), settings=_settings(CI_EXAMPLES, derandomize=True))


def test_local_tier_never_loses_a_committed_step(monkeypatch):
    install_fault_hooks(monkeypatch)
    install_repeatable_ids(monkeypatch)
    run_state_machine_as_test(TierMachine, settings=_settings(TIER_EXAMPLES, derandomize=True, steps=TIER_STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_no_committed_checkpoint_loses_its_data_long(kind, monkeypatch):
    total = int(os.environ.get("SHARDCKPT_MODEL_EXAMPLES", "0") or 0)
    if not total:
        pytest.skip("set SHARDCKPT_MODEL_EXAMPLES=20000 for 20,000 sequences (split over both root kinds)")
    install_fault_hooks(monkeypatch)
    install_repeatable_ids(monkeypatch)
    install_async_gate(monkeypatch)
    run_state_machine_as_test(_machine(kind), settings=_settings(total // 2, derandomize=False))


@pytest.mark.slow
def test_local_tier_never_loses_a_committed_step_long(monkeypatch):
    total = int(os.environ.get("SHARDCKPT_MODEL_EXAMPLES", "0") or 0)
    if not total:
        pytest.skip("set SHARDCKPT_MODEL_EXAMPLES=20000 (the tier machine runs a tenth of it)")
    install_fault_hooks(monkeypatch)
    install_repeatable_ids(monkeypatch)
    run_state_machine_as_test(TierMachine, settings=_settings(total // 10, derandomize=False, steps=TIER_STEPS))
