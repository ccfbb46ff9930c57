"""Stop requests: a pre-emption warning, a time limit, Ctrl-C, or a flag set by whatever hosts the ranks.

A request only sets a flag; the trainer polls `StopSource.requested()` at each step boundary and the
ranks agree (one all-reduce on the control group) before acting, so a signal that reached one rank
stops every rank at the same step.

- `SignalStop` (the torchrun entry, main thread): SIGTERM (Slurm's time limit and pre-emption by another
  partition, `kill`), SIGINT (Ctrl-C), SIGUSR2 (Slurm's `--signal` warning), SIGHUP.
- `PolledStop` (the function entry: Ray Train runs it in a non-main thread, where `signal.signal`
  raises): a callable the host provides, polled every step.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Callable, Protocol

# The signals FTL documents as "save at the next step and exit with EXIT_PREEMPTED". `ftl run` passes
# them to torchrun's --signals-to-handle so they reach the ranks (torchrun forwards only SIGTERM,
# SIGINT, SIGHUP and SIGQUIT by default, and SIGUSR2 would kill it and orphan the ranks).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP)


class StopSource(Protocol):
    def requested(self) -> str | None:
        """Why this rank was asked to stop (e.g. 'SIGUSR2'), or None. Cheap: called every step."""

    def save_requested(self) -> str | None:
        """Why the host wants a checkpoint now while training goes on (Ray's notice that a node is about to
        be reclaimed: it restarts the run from that checkpoint itself), or None. Called once per step on
        every rank; the source returns the same answer on every rank."""

    def close(self) -> None: ...


class SignalStop:
    """Installs handlers for STOP_SIGNALS that only record the signal; restores the previous ones on close."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, parent_pid: int | None = None) -> None:
        """`parent_pid`: the pid of the process that started this one (torchrun); if it is gone by the time
        the handlers are in place (a death signal asked for too late is never sent), that is a stop too."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed in the main thread; use PolledStop")
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        self._parent_pid = parent_pid

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def requested(self) -> str | None:
        if self.received is None and self._parent_pid is not None and os.getppid() != self._parent_pid:
            self.received = "parent process exited"
        return self.received

    def save_requested(self) -> str | None:
        return None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class PolledStop:
    """A stop request the host signals through `should_stop()` (a threading.Event's is_set, Ray's
    pre-emption notice, a file's existence)."""

    def __init__(self, should_stop: Callable[[], bool], reason: str = "stop requested by the host") -> None:
        self.should_stop = should_stop
        self.reason = reason

    def requested(self) -> str | None:
        return self.reason if self.should_stop() else None

    def save_requested(self) -> str | None:
        return None

    def close(self) -> None:
        pass


_PR_SET_PDEATHSIG = 1
# Resolved once at import: `signal_when_parent_dies` also runs between fork and exec (`preexec_fn`),
# where loading a library could deadlock on a lock another thread of the parent held.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def signal_when_parent_dies(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl; a no-op elsewhere).
    A rank whose torchrun was SIGKILLed then saves and exits instead of training on as an orphan, and a
    torchrun whose `ftl run` was killed shuts its ranks down the same way."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
