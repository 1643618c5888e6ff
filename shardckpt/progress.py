"""The progress bar that long library calls (verify, diff, export) draw on stderr, and the byte formatter
they and the CLI share.

It is a small built-in printer, not tqdm, so shardckpt needs no extra dependency. It draws only when its
stream is a terminal and only once the task has run for a second, so logs and pipes never see it.
"""
from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    """`n` bytes in binary units ("702.0 KiB"); whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """A tiny progress bar: call it with the units just done, then close() it.

    Created by verify_checkpoint, diff_checkpoints and the CLI's export before their loop, called from
    that loop's thread. Draws on `stream` (stderr) only when that is a terminal (or `enabled` is True) and
    only once the task has run for `delay` seconds, at most 10 times a second.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "B", stream=None, enabled: bool | None = None,
                 delay: float = 1.0):
        self.stream = stream or sys.stderr
        self.enabled = (self.stream.isatty() if enabled is None else enabled) and total > 0
        self.total, self.desc, self.unit, self.delay = total, desc, unit, delay
        self.done, self.start, self._last, self._drawn = 0, time.monotonic(), 0.0, False

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start >= self.delay and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total)
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0
        bar = "#" * int(frac * 24)
        fmt = human_bytes if self.unit == "B" else str
        self.stream.write(f"\r{self.desc} [{bar:<24}] {frac * 100:5.1f}% {fmt(self.done)}/{fmt(self.total)} "
                          f"{fmt(int(rate))}/s eta {eta:4.0f}s ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
