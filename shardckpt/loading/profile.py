"""Where a load's time goes: light timers on the load path, off unless a caller switches them on.

Who calls it: bench.compare --profile-load calls start() before a load and stop() after it; load.py,
reader.py and exchange.py wrap their phases in `phase(name)`. Off (the default) a phase costs one global
read on entry and one on exit; the phases are coarse (per load, per fetch batch of up to 32 MB, per decode call), so
even on they cost microseconds per load. Totals are per process (per rank) and summed over threads:
"read_io" runs on the fetch threads, overlapped with the rest, so it is reported beside the wall time,
not as a share of it.
"""
from __future__ import annotations

import threading
import time

PHASES = ("group", "metadata", "planning", "collectives", "read_wait", "decode", "copy", "read_io")

_totals: dict[str, float] | None = None
_lock = threading.Lock()


def start() -> None:
    """Switch the timers on (all phases at zero). Called by the bench before the load it profiles."""
    global _totals
    _totals = dict.fromkeys(PHASES, 0.0)


def stop() -> dict[str, float]:
    """Switch the timers off and return the seconds spent per phase since start()."""
    global _totals
    out, _totals = _totals or dict.fromkeys(PHASES, 0.0), None
    return out


class phase:
    """`with phase("decode"): ...` adds the block's wall time to that phase while the timers are on."""
    __slots__ = ("name", "t0")

    def __init__(self, name: str):
        self.name = name
        self.t0 = 0.0

    def __enter__(self):
        if _totals is not None:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        totals = _totals
        if totals is not None and self.t0:
            dt = time.perf_counter() - self.t0
            with _lock:
                totals[self.name] = totals.get(self.name, 0.0) + dt
