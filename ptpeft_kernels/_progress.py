"""Progress of long loops: a tqdm bar on a terminal, one plain line per interval elsewhere.

A tqdm bar redraws itself with carriage returns; written into a log file (``> run.log 2>&1``,
CI, ``nohup``) every redraw becomes a line: a 4-minute default training run wrote 118 KB,
about 1,360 bar lines. Where the stream is not a terminal, :func:`progress` returns a
:class:`LineProgress` instead, which prints ``desc: n/total (pct%) ...`` at each tenth of the
total and at least every ``interval_s`` seconds (and once at the end), and nothing else.
Both offer the part of tqdm's interface the package uses: iteration, ``update``,
``set_postfix``, ``close`` and the context-manager protocol.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

# A plain line at least this often (seconds) even when a tenth of the total takes longer.
DEFAULT_INTERVAL_S = 30.0


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """tqdm's interface, printing one plain line per interval (for streams that are no terminal)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        disable: bool = False,
        stream: TextIO | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.n = initial
        self.disable = disable
        self.stream = stream
        self.interval_s = interval_s
        self.postfix = ""
        self._start_n = initial
        self._t0 = time.monotonic()
        self._last_t = self._t0
        self._last_n = initial
        self._last_tenth = self._tenth(initial)
        self._closed = False

    def _tenth(self, n: int) -> int:
        return (10 * n) // self.total if self.total else 0

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n // self.total}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if rate > 0:
            parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
            if self.total and self.n < self.total:
                parts.append(f"{_clock((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _emit(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self._line(), file=stream, flush=True)
        self._last_t = time.monotonic()
        self._last_n = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        tenth = self._tenth(self.n)
        if tenth > self._last_tenth or time.monotonic() - self._last_t >= self.interval_s:
            self._last_tenth = tenth
            self._emit()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_n:
            self._emit()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (created without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    stream: TextIO | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> Any:
    """A tqdm bar over ``iterable`` (or counting to ``total``) when ``stream`` (default
    ``sys.stderr``) is a terminal, else a :class:`LineProgress` with the same interface."""
    out = stream if stream is not None else sys.stderr
    if is_terminal(out):
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc,
            initial=initial,
            disable=disable,
            leave=leave,
            file=out,
            dynamic_ncols=True,
        )
    return LineProgress(
        iterable, total=total, desc=desc, initial=initial, disable=disable, stream=out, interval_s=interval_s
    )
