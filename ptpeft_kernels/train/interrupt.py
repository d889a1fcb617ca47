"""SIGINT / SIGTERM: stop at the next safe point instead of dying mid-step.

While :func:`handle_signals` is active, the first SIGINT (Ctrl-C) or SIGTERM only records
the request; the training loop finishes its current optimizer step, writes a checkpoint
(atomically, as always) and raises :class:`Interrupted`, which the command line turns into
a message saying how to resume and the exit status a shell expects from that signal
(130 for SIGINT, 143 for SIGTERM). Loops with nothing to save (pre-training the built-in
model, checking images, evaluating) call :func:`check` and stop at once. A second signal
restores the default behaviour, so pressing Ctrl-C twice stops immediately.

DataLoader worker processes ignore SIGINT and exit quietly on SIGTERM (:func:`init_worker`):
a Ctrl-C reaches the terminal's whole process group, and a worker that died of it would
turn the orderly stop into "DataLoader worker exited unexpectedly". Where a worker is gone
all the same (a SIGTERM to the whole group) while the main process waits for its batch,
the loop stops at the last finished step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None


class Interrupted(Exception):
    """The run stopped on a signal; ``message`` says what was saved and how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> int | None:
    """The signal number received since :func:`handle_signals` began, or ``None``."""
    return _requested


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def check(where: str) -> None:
    """Raise :class:`Interrupted` if a stop was requested (for loops with nothing to save)."""
    if _requested is not None:
        raise Interrupted(_requested, f"interrupted by {signal_name(_requested)} {where}; nothing was saved")


def _handler(signum: int, frame: object) -> None:
    global _requested
    if _requested is None:
        _requested = signum
        # os.write, not print: a handler that prints while the main code prints raises
        # "reentrant call" inside the buffered stream.
        os.write(
            2,
            f"\n[ptpeft] {signal_name(signum)} received: stopping at the next safe point (after the "
            "current step, with a checkpoint); send it again to stop at once\n".encode(),
        )
        for s in _SIGNALS:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Record SIGINT / SIGTERM instead of acting on them (main thread only; elsewhere a no-op)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _requested = None
    for s in _SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested = None


def _quiet_exit(signum: int, frame: object) -> None:
    os._exit(0)


def init_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoaders. SIGINT (a Ctrl-C reaches the whole process group) is
    ignored: the main process decides when to stop. SIGTERM ends the worker with status 0: the
    loader's own shutdown terminates workers with it (so it must not be ignored: the join would
    wait forever), and a status 0 keeps a SIGTERM sent to the whole group from raising "worker
    killed by signal" in the middle of the main process's step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _quiet_exit)
