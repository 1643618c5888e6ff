"""Fault-injection kit shared by tests/test_faults.py and bench/faults.py (importable by spawned ranks).

launch() runs a function on N gloo processes like harness.run_ranks, but expects some of them to die
(SIGKILL through SHARDCKPT_FAULT, see shardckpt/_faults.py) or hang: it reports every rank's fate instead
of failing. Everything a trial does is a function of its seed, so a failing trial is rerun by its seed."""
from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import tempfile
import time

import torch
import torch.multiprocessing as mp

from harness import _entry

FRAME = 1024  # small frames: a save makes many write batches, so "write" kills land mid-file
PHASES = ("stage", "write", "before_commit", "manifest")


# ----------------------------------------------------------------------------------------------- disk full

@contextlib.contextmanager
def small_tmpfs(mnt, size: str):
    """A tmpfs of `size` ("2m") mounted at the new directory `mnt`, for disk-full tests; unmounted after.
    Skips the test where mounting is not allowed (CI runs as root and mounts it)."""
    import pytest
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs for disk-full tests: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------------------------- launcher

def launch(world_size: int, fn, *args, env: dict | None = None, timeout: float = 60.0, grace: float = 10.0) -> dict:
    """Run fn(rank, world_size, *args) on world_size processes. Returns {rank: (fate, payload)} with fate
    "ok" (payload: fn's return), "error" (payload: traceback), "dead" (payload: exit code, -9 for SIGKILL) or
    "hung" (still running `grace` seconds after the first rank reported, or at `timeout`; it is killed)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "shardckpt"])
    q = ctx.Queue()
    fates: dict[int, tuple] = {}
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_entry, args=(r, world_size, os.path.join(d, "store"), fn, args,
                                                  dict(env or {}), q), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(fates) < world_size and time.monotonic() < deadline:
            try:
                rank, status, payload = q.get(timeout=0.1)
                fates[rank] = (status, payload)
                deadline = min(deadline, time.monotonic() + grace)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                # a rank that exited without reporting; give its queue feeder a moment to flush
                if r not in fates and p.exitcode is not None and p.exitcode != 0:
                    fates[r] = ("dead", p.exitcode)
        for r, p in enumerate(procs):
            if r not in fates:
                fates[r] = ("hung", None)
                p.kill()
            p.join(timeout=10)
        # late reports of ranks first seen dead (exit code 0 only after reporting)
        while True:
            try:
                rank, status, payload = q.get_nowait()
            except queue.Empty:
                break
            if fates.get(rank, ("",))[0] in ("dead", "hung"):
                fates[rank] = (status, payload)
    return fates


# ----------------------------------------------------------------------------------------------- states

def trial_state(seed: int) -> dict:
    """A small training-like state: a tensor big enough to be split across replicas (> 1 MiB), small ones
    of several dtypes, and plain values. The same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(300, 1000, generator=g),               # 1.2 MB: split over both ranks
                  "b": torch.randn(1000, generator=g).bfloat16(),
                  "emb": torch.randint(-100, 100, (37, 21), generator=g, dtype=torch.int64)},
        "optim": {"m": torch.randn(700, 500, generator=g).half(), "step": seed, "betas": (0.9, 0.999)},
        "rng": torch.randint(0, 255, (5000,), generator=g, dtype=torch.uint8),
        "meta": {"seed": seed, "name": f"trial-{seed}"},
    }


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, obj


def same_state(got: dict, ref: dict) -> bool:
    """Bit-exact equality of two states (tensors by bytes, values by ==)."""
    a, b = dict(_leaves(got)), dict(_leaves(ref))
    if a.keys() != b.keys():
        return False
    for k, r in b.items():
        g = a[k]
        if isinstance(r, torch.Tensor):
            if not isinstance(g, torch.Tensor) or g.dtype != r.dtype or g.shape != r.shape:
                return False
            if not torch.equal(g.contiguous().view(torch.uint8), r.contiguous().view(torch.uint8)):
                return False
        elif g != r:
            return False
    return True


# ----------------------------------------------------------------------------------------------- trials

def plan_trial(phase: str, seed: int, world_size: int = 2) -> dict:
    """The fault of one trial, a function of (phase, seed): which rank dies and exactly where."""
    rng = random.Random(f"{phase}/{seed}")
    victim = rng.randrange(world_size)
    hit, point = 1, phase
    if phase == "write":
        hit = rng.randint(1, 12)  # which write batch of this rank (it writes >= 12 with FRAME=1024)
    if phase == "manifest" and victim == 0:
        point = rng.choice(["manifest", "manifest_tmp", "committed"])
    return {"phase": phase, "seed": seed, "victim": victim, "point": point, "hit": hit}


def _fault_env(plan: dict, action: str = "kill") -> dict:
    point = plan["point"]
    if point == "manifest_tmp":  # killed by the os.link patch in save_worker, not by the env hook
        return {"SHARDCKPT_FAULT": ""}
    return {"SHARDCKPT_FAULT": f"{point}:{plan['victim']}:{action}:{plan['hit']}"}


def save_worker(rank, ws, path, seed, plan, timeout_s, mode="sync"):
    """One rank of a faulty save. Returns what the save did on this rank: (outcome, error text, seconds)."""
    import shardckpt
    if plan and plan["point"] == "manifest_tmp" and rank == plan["victim"]:
        # the temp manifest is written and fsynced; die before it is linked to manifest.json
        os.link = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    state = trial_state(seed)
    t0 = time.monotonic()
    try:
        if mode == "sync":
            shardckpt.save(state, path, frame_size=FRAME, timeout_s=timeout_s)
        else:
            from shardckpt.saving.async_save import async_save
            handle = async_save(state, path, frame_size=FRAME, timeout_s=timeout_s)
            for t in state["model"].values():  # the caller may change its tensors once async_save returns
                t.add_(1) if t.dtype != torch.bool else None
            handle.wait()
        return ("saved", "", time.monotonic() - t0)
    except shardckpt.CheckpointError as e:
        return (type(e).__name__, str(e)[:300], time.monotonic() - t0)


def check_after_fault(path: str, seed: int, prev_path: str, prev_seed: int, *, resave: bool = True) -> dict:
    """In the parent, after a faulty save of trial_state(seed) to `path`: what is on storage.

    Returns {"committed": bool, "partial": bool, "prev_ok": bool, "resave_ok": bool}. "partial" is the one
    thing that must never happen: a committed manifest whose checkpoint does not load bit-exactly."""
    import shardckpt
    out = {"committed": False, "partial": False, "prev_ok": False, "resave_ok": None}
    try:
        shardckpt.read_manifest(path)
        out["committed"] = True
    except shardckpt.IncompleteCheckpointError:
        pass
    if out["committed"]:
        try:
            out["partial"] = not same_state(shardckpt.load_full(path), trial_state(seed))
        except shardckpt.CheckpointError:
            out["partial"] = True
    try:
        out["prev_ok"] = same_state(shardckpt.load_full(prev_path), trial_state(prev_seed))
    except shardckpt.CheckpointError:
        out["prev_ok"] = False
    if resave:
        # the next save at that path: succeeds after an uncommitted save; refused (by design) after a commit
        try:
            shardckpt.save(trial_state(seed + 1), path, frame_size=FRAME)
            out["resave_ok"] = not out["committed"] and same_state(shardckpt.load_full(path),
                                                                    trial_state(seed + 1))
        except shardckpt.CheckpointExistsError:
            out["resave_ok"] = out["committed"]
    return out


def committed_problems(root: str, allowed) -> list[str]:
    """The data-safety invariant (FORMAT.md §9; test_safety_model.py checks it after every operation), after
    a kill: every directory under `root` holding a committed manifest loads bit-exact as one of the states
    `allowed(name)` returns. Returns what broke it, one line per checkpoint ([] when it holds)."""
    import shardckpt
    problems = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.exists(os.path.join(path, "manifest.json")):
            continue
        try:
            got = shardckpt.load_full(path)
        except Exception as e:  # noqa: BLE001 - any failure of a committed checkpoint breaks the invariant
            problems.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if not any(same_state(got, want) for want in allowed(name)):
            problems.append(f"{name}: loads, but not as any state saved there")
    return problems


def run_kill_trial(root: str, phase: str, seed: int, prev_path: str, prev_seed: int, *, timeout_s: float = 5.0,
                   mode: str = "sync") -> dict:
    """One SIGKILL trial: 2 ranks save trial_state(seed) to root/<phase>-<seed>, the planned victim dies at the
    planned point. Returns the plan, every rank's fate and check_after_fault's verdict."""
    plan = plan_trial(phase, seed)
    path = os.path.join(root, f"{mode}-{phase}-{seed}")
    fates = launch(2, save_worker, path, seed, plan, timeout_s, mode, env=_fault_env(plan),
                   timeout=timeout_s * 4 + 30)
    verdict = check_after_fault(path, seed, prev_path, prev_seed)
    survivors = {r: f for r, f in fates.items() if r != plan["victim"]}

    def allowed(name: str) -> list[dict]:  # <mode>-<phase>-<seed>: the killed save's state, or the re-save's
        s = int(name.rsplit("-", 1)[1])
        return [trial_state(s), trial_state(s + 1)]
    return {"plan": plan, "fates": fates, "verdict": verdict, "invariant": committed_problems(root, allowed),
            "victim_died": fates[plan["victim"]][0] == "dead",
            "survivors_typed": all(f[0] == "ok" and f[1][0] in ("saved", "CoordinationError", "SaveError")
                                   for f in survivors.values())}


# ----------------------------------------------------------------------------------------------- bit rot

def corruption_state(seed: int = 3) -> dict:
    """A small state for corruption sweeps: compressible and incompressible tensors, several dtypes, values."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 48, generator=g), "h": (torch.randn(40, 30, generator=g) * 100).half(),
            "i": torch.arange(3000, dtype=torch.int64) % 17, "b": torch.rand(333, generator=g) > 0.5,
            "zeros": torch.zeros(1000, dtype=torch.bfloat16), "step": 12, "cfg": {"lr": 0.1, "name": "x"}}


def checkpoint_files(path: str) -> dict[str, list[str]]:
    """Relative paths of a checkpoint's files by kind: data, index, manifest."""
    import shardckpt
    m = shardckpt.read_manifest(path)
    return {"data": [f.data for f in m.files], "index": [f.index for f in m.files], "manifest": ["manifest.json"]}


def _classify(path: str, ref: dict, kind: str, verify=None) -> str:
    """Load after a corruption: 'detected' (typed error naming the file, and the key for data files),
    'benign' (loads bit-exactly: a manifest flip JSON ignores, e.g. whitespace), 'silent' (loads a wrong
    value: never allowed), 'untyped' (another exception), 'unnamed' (typed, but no file / key named)."""
    import shardckpt
    try:
        got = shardckpt.load_full(path)
    except shardckpt.CheckpointError as e:
        if not e.file or (kind == "data" and not e.key):
            return "unnamed"
        if verify is not None and verify(path):
            return "verify_missed"
        return "detected"
    except Exception as e:  # noqa: BLE001 - anything untyped is a finding
        return f"untyped:{type(e).__name__}:{e}"[:200]
    if not same_state(got, ref):
        return "silent"
    if verify is not None and not verify(path):
        return "verify_false_alarm"
    return "benign"


def corruption_sweep(path: str, ref: dict, *, flips_per_file: int, truncs_per_file: int, seed: int,
                     verify=None) -> dict:
    """Single-byte flips (random position, random non-zero xor) and truncations of every file of a committed
    checkpoint, each undone before the next. `verify(path) -> bool` (e.g. `shardckpt verify`) must also say
    False for every detected case. Returns counts per (kind, outcome) and the failing cases."""
    rng = random.Random(seed)
    stats: dict = {"flips": 0, "truncations": 0, "outcomes": {}, "failures": []}
    for kind, names in checkpoint_files(path).items():
        for name in names:
            full = os.path.join(path, name)
            with open(full, "rb") as f:
                orig = f.read()
            cases = [("flip", rng.randrange(len(orig)), rng.randrange(1, 256)) for _ in range(flips_per_file)]
            cuts = {0, 1, len(orig) - 1, len(orig) // 2} | {rng.randrange(len(orig)) for _ in range(truncs_per_file)}
            cases += [("trunc", c, 0) for c in sorted(cuts)[:max(truncs_per_file, 4)]]
            try:
                for what, pos, mask in cases:
                    bad = bytearray(orig)
                    if what == "flip":
                        bad[pos] ^= mask
                        stats["flips"] += 1
                    else:
                        del bad[pos:]
                        stats["truncations"] += 1
                    with open(full, "wb") as f:
                        f.write(bad)
                    out = _classify(path, ref, kind, verify)
                    key = f"{kind}:{what}:{out.split(':')[0]}"
                    stats["outcomes"][key] = stats["outcomes"].get(key, 0) + 1
                    if out not in ("detected",) and not (out == "benign" and kind == "manifest"):
                        stats["failures"].append((name, what, pos, mask, out))
            finally:
                with open(full, "wb") as f:
                    f.write(orig)
    return stats


# ----------------------------------------------------------------------------------------------- races

def race_worker(rank, ws, root, trials, seed):
    """Two jobs of two ranks each ({0,1} and {2,3}, separate process groups) save different states to the
    same path at the same moment, `trials` times. Returns per trial (job, outcome)."""
    import torch.distributed as dist

    import shardckpt
    groups = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    job = rank // 2
    out = []
    rng = random.Random(f"race/{seed}")
    for t in range(trials):
        delay = rng.random() * 0.02  # shift one job by up to 20 ms so every window of the race gets hit
        dist.barrier()
        if job == t % 2:
            time.sleep(delay)
        path = os.path.join(root, f"race-{t}")
        try:
            shardckpt.save(trial_state(1000 * job + t), path, process_group=groups[job], frame_size=FRAME * 64,
                           timeout_s=20)
            out.append((job, "saved"))
        except shardckpt.CheckpointError as e:
            out.append((job, type(e).__name__))
    dist.barrier()
    return out


# ----------------------------------------------------------------------------------------------- manager

def manager_worker(rank, ws, root, seed, plan, timeout_s, mode):
    """A CheckpointManager commits step 1, then a rank dies (per `plan`) while it saves step 2."""
    from shardckpt.manager.checkpoint_manager import CheckpointManager
    m = CheckpointManager(root, async_save=(mode == "async"), timeout_s=timeout_s, preemption_signals=(),
                          frame_size=FRAME)
    m.save(1, trial_state(seed))
    m.wait()
    os.environ.update(_fault_env(plan))  # armed only now: step 1's save passes every fault point unharmed
    if plan["point"] == "manifest_tmp" and rank == plan["victim"]:
        os.link = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        m.save(2, trial_state(seed + 1))
        m.wait()
        return ("saved", "", time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - the parent checks the type
        return (type(e).__name__, str(e)[:300], time.monotonic() - t0)


def run_manager_trial(root: str, phase: str, seed: int, *, timeout_s: float = 5.0, mode: str = "sync") -> dict:
    """One manager trial: 2 ranks, step 1 committed, a rank killed during step 2; then (a fresh process,
    like a restarted job) restore must give step 1 bit-exactly (or step 2 if its commit completed) and
    the next save must succeed."""
    from shardckpt.manager.checkpoint_manager import CheckpointManager
    plan = plan_trial(phase, seed)
    mroot = os.path.join(root, f"mgr-{mode}-{phase}-{seed}")
    fates = launch(2, manager_worker, mroot, seed, plan, timeout_s, mode, timeout=timeout_s * 4 + 30)
    m = CheckpointManager(mroot, async_save=False, preemption_signals=(), frame_size=FRAME)
    state = trial_state(seed + 7)
    restored = m.restore(state)
    expected = {1: trial_state(seed), 2: trial_state(seed + 1)}.get(restored)
    ok_restore = expected is not None and same_state(state, expected)
    nxt = 2 if restored == 1 else 3
    m.save(nxt, trial_state(seed + 2))
    back = trial_state(seed + 9)
    resave_ok = m.restore(back) == nxt and same_state(back, trial_state(seed + 2))
    m.close()
    survivors = {r: f for r, f in fates.items() if r != plan["victim"]}
    saved = {"step-0000000001": [trial_state(seed)], "step-0000000002": [trial_state(seed + 1), trial_state(seed + 2)],
             "step-0000000003": [trial_state(seed + 2)]}
    return {"plan": plan, "fates": fates, "restored": restored, "restore_ok": ok_restore, "resave_ok": resave_ok,
            "invariant": committed_problems(mroot, lambda name: saved.get(name, [])),
            "victim_died": fates[plan["victim"]][0] == "dead",
            "survivors_typed": all(f[0] == "ok" and f[1][0] in ("saved", "CoordinationError", "SaveError")
                                   for f in survivors.values())}
