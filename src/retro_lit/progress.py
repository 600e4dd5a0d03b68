"""Progress a person can follow in any log.

On a terminal, `progress(...)` is a tqdm bar. Anywhere else (a log file, a pipe, CI) a redrawn bar is one
long line of carriage returns, so it is a `ProgressLog`: a plain `logging` line every ~10 % of the work or
every ~30 s, whichever comes first, with the rate and the time left, and a last line with the total time
(lines are at least a second apart, so a stage that takes a second says only its last line):

    embed: 9216/30011 chunk (31%), 267 chunk/s, 00:34 elapsed, ETA 01:18
"""

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


class ProgressLog:
    """A counter with tqdm's `update`/iteration/`with` interface that logs lines instead of drawing a bar.

    `total` None or infinite: no percentage and no ETA, only the 30-s lines. `initial`: work done before
    (a resumed run); the rate counts only what is done here.
    """

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, every_fraction: float = 0.1,
                 every_seconds: float = 30.0, min_seconds: float = 1.0):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None and math.isfinite(total) and total > 0 else None
        self.n = self.initial = initial
        self.every_fraction, self.every_seconds, self.min_seconds = every_fraction, every_seconds, min_seconds
        self.postfix = ""
        self._logged = (initial, "")  # (n, postfix) of the last line
        self._start = self._logged_at = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, text: str) -> None:
        """Text at the end of each line (the training loss, say)."""
        self.postfix = text

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable or (self.total and self.n >= self.total):  # close() writes the last line, once
            return
        now = time.monotonic()
        step = self.every_fraction * self.total if self.total else math.inf
        waited = now - self._logged_at
        if waited >= self.every_seconds or (self.n - self._logged[0] >= step and waited >= self.min_seconds):
            self._log(now)

    def close(self) -> None:
        """The last line, unless it would repeat the previous one (so a second close says nothing)."""
        if not self.disable and (self.n, self.postfix) != self._logged:
            self._log(time.monotonic())

    def _log(self, now: float) -> None:
        elapsed = now - self._start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n:g}/{self.total:g} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n:g} {self.unit}"
        parts = [f"{self.desc}: {done}", format_rate(rate, self.unit), f"{tqdm.format_interval(elapsed)} elapsed"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        log.info("%s", ", ".join(parts + ([self.postfix] if self.postfix else [])))
        self._logged, self._logged_at = (self.n, self.postfix), now


def format_rate(rate: float, unit: str) -> str:
    """`267 chunk/s`, `12.3k chunk/s`, or `2.5 s/step` below one per second (a CPU training step)."""
    if rate >= 1:
        return f"{tqdm.format_sizeof(rate)} {unit}/s"
    return f"{1 / rate:.3g} s/{unit}" if rate > 0 else f"- {unit}/s"


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, stream: TextIO | None = None):
    """A tqdm bar when `stream` (default stderr) is a terminal, else a `ProgressLog` of the same work."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream)
    return ProgressLog(iterable, total=total, desc=desc, unit=unit, disable=disable)
