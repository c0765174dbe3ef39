"""A run either writes a complete video or nothing: signals become exceptions, exits get codes.

SIGTERM's default action kills the process on the spot, leaving the temporary mp4 behind;
SIGINT's raises KeyboardInterrupt wherever Python happens to be. While `signals_as_exceptions()`
is active both raise `Interrupted`, which unwinds through the `with VideoWriter(...)` block
(removing its temporary file) and reaches `main`, which exits with the shell's convention,
128 + signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(BaseException):  # noqa: N818 - not an error of the run, like KeyboardInterrupt
    """The run was stopped by a signal; `exit_code` is 128 + its number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_received: int | None = None  # the signal caught while guarded, until the guard ends


def _raise(signum, _frame):
    global _received
    _received = signum
    raise Interrupted(signum)


def check():
    """Raises `Interrupted` if a guarded signal arrived, even one whose exception was lost.

    Python runs signal handlers between bytecodes of the main thread; when that happens inside
    a garbage-collection callback or a `__del__` (JAX has both), the exception is printed as
    "ignored" and the run goes on. Calling this at each chunk and before the output is renamed
    into place makes such a signal stop the run all the same."""
    if _received is not None:
        raise Interrupted(_received)


@contextlib.contextmanager
def signals_as_exceptions(signums=(signal.SIGINT, signal.SIGTERM)):
    """Turn `signums` into `Interrupted` for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    _received = None
    previous = {s: signal.signal(s, _raise) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None
