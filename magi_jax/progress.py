"""What a run shows while it works.

On a terminal: one bar over chunks with elapsed and remaining time, and under it a bar over
the sampler's steps. In a log file (stderr not a terminal): plain lines, one per chunk
written, with elapsed and estimated remaining time - no carriage returns, no escape codes.
On a pod only process 0 reports.

Steps are counted on the host as the device finishes them: with a step bar, the sampler
dispatches one step at a time and hands over a small device array per step
(`Sampler.chunks(on_dispatch=...)` -> `Progress.dispatched`), which a watcher thread waits
on. There is no host callback compiled into the program: such programs cannot be stored in
the compilation cache, and ordered callbacks fail on more than one device.
"""

from __future__ import annotations

import queue
import sys
import threading
import time


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """chunk_written(index, frames, elapsed), steps(n) and dispatched(n, marker) may be
    called from any thread."""

    def __init__(
        self,
        chunks: int,
        steps: int,
        *,
        enabled: bool = True,
        stream=None,
        interactive: bool | None = None,
        mininterval: float = 0.1,
    ):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)()) if interactive is None else interactive
        self.chunks, self.total_steps = chunks, steps
        self.done = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._bar = self._steps = None
        self._watcher = None
        if enabled and self.interactive:
            from tqdm import tqdm

            kw = dict(file=self.stream, mininterval=mininterval)
            self._bar = tqdm(total=chunks, desc="chunks", unit="chunk", position=0, **kw)
            self._steps = tqdm(total=steps, desc="steps ", unit="step", position=1, leave=False, **kw)

    @property
    def wants_steps(self) -> bool:
        """Whether a step bar is shown (the sampler then reports steps as they are dispatched)."""
        return self._steps is not None

    def steps(self, n: int):
        if self._steps is not None:
            with self._lock:
                self._steps.update(n)

    def dispatched(self, n: int, marker):
        """`n` steps were dispatched; `marker` (a device array) is ready when they are done.
        A watcher thread waits on the markers in order and advances the step bar."""
        if self._steps is None:
            return
        if self._watcher is None:
            self._pending = queue.Queue()
            self._watcher = threading.Thread(target=self._watch, name="magi-steps", daemon=True)
            self._watcher.start()
        self._pending.put((n, marker))

    def _watch(self):
        while True:
            item = self._pending.get()
            if item is None:
                return
            n, marker = item
            try:
                marker.block_until_ready()
            except Exception:  # a failed run: the main thread reports it
                return
            self.steps(n)

    def chunk_written(self, index: int, frames: int, elapsed: float):
        if not self.enabled:
            return
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(1)
                return
            spent = time.perf_counter() - self._t0
            left = spent / self.done * (self.chunks - self.done)
            print(
                f"chunk {self.done}/{self.chunks} written ({frames} frames), {_clock(spent)} elapsed, "
                f"about {_clock(left)} left",
                file=self.stream,
                flush=True,
            )

    def close(self):
        if self._watcher is not None:
            self._pending.put(None)
            self._watcher.join(timeout=5)
            self._watcher = None
        for bar in (self._steps, self._bar):
            if bar is not None:
                bar.close()
        self._bar = self._steps = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
