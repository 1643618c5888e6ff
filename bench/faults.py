"""Fault-injection report (issue 7): the figures behind the README's Guarantees section.

    python -m bench.faults --trials 20                 # full run, writes bench/results/faults.json
    python -m bench.faults --trials 3 --fuzz-cases 200 # quick look

Prints, per save mode (sync, async, manager): trials per phase, partial checkpoints committed (must be 0),
complete commits by a kill after the commit point, previous checkpoint intact, next save succeeded; hung-rank
timeouts; same-path races; single-byte flips and truncations tried and detected (both backends); fuzz cases
run per target. Every trial is a function of its seed (see tests/faultkit.py), so a failure is rerun by seed.
Exit status 1 if any guarantee was broken."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _kills(root, trials, modes, report, fail):
    import faultkit
    import shardckpt
    prev = os.path.join(root, "prev")
    shardckpt.save(faultkit.trial_state(999), prev, frame_size=faultkit.FRAME)
    for mode in modes:
        rows = report.setdefault("kill", {}).setdefault(mode, {})
        for phase in faultkit.PHASES:
            row = {"trials": 0, "victim_died": 0, "partials_committed": 0, "complete_commits": 0, "prev_intact": 0,
                   "next_save_ok": 0, "survivors_typed": 0, "kill_points": {}}
            t0 = time.monotonic()
            for seed in range(trials):
                if mode == "manager":
                    r = faultkit.run_manager_trial(root, phase, seed, mode="async" if seed % 2 else "sync")
                    partial = not r["restore_ok"]
                    committed = r["restored"] == 2
                    prev_ok, resave_ok = r["restore_ok"], r["resave_ok"]
                else:
                    r = faultkit.run_kill_trial(root, phase, seed, prev, 999, mode=mode)
                    v = r["verdict"]
                    partial, committed, prev_ok, resave_ok = v["partial"], v["committed"], v["prev_ok"], v["resave_ok"]
                row["trials"] += 1
                row["victim_died"] += r["victim_died"]
                row["partials_committed"] += partial
                row["complete_commits"] += committed and not partial
                row["prev_intact"] += bool(prev_ok)
                row["next_save_ok"] += bool(resave_ok)
                row["survivors_typed"] += r["survivors_typed"]
                pt = f"{r['plan']['point']}@r{r['plan']['victim']}"
                row["kill_points"][pt] = row["kill_points"].get(pt, 0) + 1
                if partial or not prev_ok or not resave_ok or not r["victim_died"] or not r["survivors_typed"]:
                    fail.append(f"{mode}/{phase} seed {seed}: {r}")
            row["seconds"] = round(time.monotonic() - t0, 1)
            rows[phase] = row
            print(f"  {mode:8s} {phase:14s} trials {row['trials']:3d}  partials committed {row['partials_committed']}"
                  f"  complete commits {row['complete_commits']:2d}  prev intact {row['prev_intact']:3d}"
                  f"  next save ok {row['next_save_ok']:3d}  victim died {row['victim_died']:3d}"
                  f"  survivors typed {row['survivors_typed']:3d}  ({row['seconds']} s)", flush=True)


def _hangs(root, report, fail):
    import faultkit
    import shardckpt
    out = []
    for phase, victim in [("stage", 1), ("write", 0), ("before_commit", 1), ("stage", 0)]:
        timeout_s = 2.0
        plan = {"phase": phase, "seed": 0, "victim": victim, "point": phase, "hit": 1}
        path = os.path.join(root, f"hang-{phase}-{victim}")
        fates = faultkit.launch(2, faultkit.save_worker, path, 0, plan, timeout_s,
                                env={"SHARDCKPT_FAULT": f"{phase}:{victim}:hang:1"}, timeout=60, grace=0.5)
        s = fates[1 - victim]
        committed = os.path.exists(os.path.join(path, "manifest.json"))
        row = {"phase": phase, "victim": victim, "timeout_s": timeout_s, "survivor": s[1][0] if s[0] == "ok" else s[0],
               "seconds": round(s[1][2], 2) if s[0] == "ok" else None, "committed": committed}
        out.append(row)
        if row["survivor"] != "CoordinationError" or committed or row["seconds"] > 2 * timeout_s + 1:
            fail.append(f"hang {row}")
        print(f"  hang {phase:14s} victim r{victim}: survivor {row['survivor']} after {row['seconds']} s "
              f"(timeout {timeout_s} s), committed {committed}", flush=True)
    report["hang"] = out
    del shardckpt


def _races(root, trials, report, fail):
    import faultkit
    from harness import run_ranks
    per_rank = run_ranks(4, faultkit.race_worker, root, trials, 1)
    both = exactly_one = 0
    for t in range(trials):
        outs = sorted({per_rank[r][t][1] for r in (0, 2)})
        exactly_one += outs == ["CheckpointExistsError", "saved"]
        both += outs == ["saved"]
    report["race"] = {"trials": trials, "exactly_one_committed": exactly_one, "both_committed": both}
    if exactly_one != trials:
        fail.append(f"race: {report['race']}")
    print(f"  race: {trials} trials, exactly one job committed in {exactly_one}, both in {both}", flush=True)


def _rot(root, flips, report, fail):
    import faultkit
    import test_faults
    from harness import run_ranks
    from shardckpt.native import kernels as _ext
    path = os.path.join(root, "rot")
    run_ranks(2, test_faults._two_rank_save, path)
    verify = test_faults._verify_cli()
    out = {}
    for backend in ("native", "python"):
        try:
            k = _ext.backend(backend)
        except ImportError as e:
            out[backend] = {"skipped": str(e)}
            continue
        saved = _ext.decode_frames, _ext.crc32c
        _ext.decode_frames, _ext.crc32c = k.decode_frames, k.crc32c
        try:
            t0 = time.monotonic()
            s = faultkit.corruption_sweep(path, faultkit.corruption_state(), flips_per_file=flips, truncs_per_file=8,
                                          seed=5, verify=verify if backend == "native" else None)
        finally:
            _ext.decode_frames, _ext.crc32c = saved
        detected = sum(n for k_, n in s["outcomes"].items() if k_.endswith(":detected"))
        benign = sum(n for k_, n in s["outcomes"].items() if k_.endswith(":benign"))
        out[backend] = {"flips": s["flips"], "truncations": s["truncations"], "detected": detected,
                        "benign_manifest_whitespace": benign, "failures": s["failures"][:20],
                        "outcomes": s["outcomes"], "verify_cli": verify is not None and backend == "native",
                        "seconds": round(time.monotonic() - t0, 1)}
        if s["failures"]:
            fail.append(f"rot {backend}: {s['failures'][:5]}")
        print(f"  rot {backend:6s}: {s['flips']} flips + {s['truncations']} truncations tried, {detected} detected "
              f"(typed, naming file and key), {benign} benign manifest edits (JSON whitespace: loads bit-exactly), "
              f"{len(s['failures'])} missed; verify CLI checked: {out[backend]['verify_cli']}", flush=True)
    report["rot"] = out


def _fuzz(cases, report, fail):
    import test_fuzz
    out = {}
    for name in test_fuzz.TARGETS:
        t0 = time.monotonic()
        try:
            if name == "decode_native":
                from shardckpt.native import kernels as _ext
                _ext.backend("native")
            n = test_fuzz.run_target(name, cases)
            out[name] = {"cases": n, "seconds": round(time.monotonic() - t0, 1)}
        except ImportError as e:
            out[name] = {"cases": 0, "skipped": str(e)}
        except Exception as e:  # noqa: BLE001 - a falsifying example is the finding
            out[name] = {"cases": 0, "error": f"{type(e).__name__}: {e}"[:2000]}
            fail.append(f"fuzz {name}: {out[name]['error'][:300]}")
        print(f"  fuzz {name:20s}: {out[name]}", flush=True)
    report["fuzz"] = out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="SIGKILL trials per phase and mode")
    ap.add_argument("--modes", default="sync,async,manager")
    ap.add_argument("--flips-per-file", type=int, default=400)
    ap.add_argument("--race-trials", type=int, default=20)
    ap.add_argument("--fuzz-cases", type=int, default=10_000)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: kill,hang,race,rot,fuzz")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "faults.json"))
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    import shardckpt
    report = {"backend": shardckpt.backend, "trials_per_phase": args.trials, "phases": None}
    fail: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shardckpt-faults-") as root:
        import faultkit
        report["phases"] = list(faultkit.PHASES)
        if "kill" not in skip:
            print("SIGKILL of one rank per trial (2 ranks, coordinator included):", flush=True)
            _kills(root, args.trials, [m for m in args.modes.split(",") if m], report, fail)
        if "hang" not in skip:
            print("hung rank:", flush=True)
            _hangs(root, report, fail)
        if "race" not in skip:
            print("two jobs, one path:", flush=True)
            _races(root, args.race_trials, report, fail)
        if "rot" not in skip:
            print("single-byte flips and truncations:", flush=True)
            _rot(root, args.flips_per_file, report, fail)
    if "fuzz" not in skip:
        print("fuzz (hypothesis):", flush=True)
        _fuzz(args.fuzz_cases, report, fail)
    partials = sum(r["partials_committed"] for m in report.get("kill", {}).values() for r in m.values())
    report["summary"] = {"partials_committed": partials, "broken_guarantees": fail,
                         "seconds": round(time.monotonic() - t0, 1)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"partials committed: {partials}; broken guarantees: {len(fail)}; {report['summary']['seconds']} s; "
          f"wrote {args.out}")
    for line in fail[:20]:
        print("  BROKEN:", line[:500])
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
