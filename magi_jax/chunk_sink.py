"""The consumer end of the pipeline: finished chunks -> frames on the host -> the mp4.

The main thread only dispatches: the sampler's next stage and each chunk's VAE decode are
queued on the device without waiting. The sink's writer thread is the one place that
waits: it reads a chunk's decoded frames (which blocks until the device has them) and
feeds them to ffmpeg, while the main thread is already dispatching the next stage. The
queue is short (`depth`), so decoded frames never pile up in device memory: when the
writer falls behind, the main thread waits at `put`.

`overlap=False` does the same work inline, in order (the sequential reference the tests
compare against, and what `bench/generate_e2e.py` measures overlap against).

Per chunk it records where the consumer's time went - `waiting` (the interval spent waiting
for the next chunk and its latents: sampling, and any compilation meanwhile, see
timing.Timeline.add_pipeline), `decoding` (waiting for the decoded frames), `writing` (the
mp4 encoder) - so these cover the pipeline's span.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class _Item:
    latents: object  # device array (or numpy): waited on to time sampling
    frames: object  # decoded uint8 frames (T, H, W, 3), device array or numpy


_DONE = object()


class ChunkSink:
    """`put(latents, frames, compiled)` per chunk, then `close()` (or `abort()` on error).

    writer: a video_io.VideoWriter (or None on hosts that do not write).
    on_written(chunk_index, frames, seconds_since_start): progress, from the writer thread.
    """

    def __init__(
        self,
        writer,
        *,
        overlap: bool = True,
        depth: int = 2,
        on_written: Callable[[int, int, float], None] | None = None,
        clock=time.perf_counter,
        start: float | None = None,
    ):
        self.writer = writer
        self.overlap = overlap
        self.on_written = on_written
        self.clock = clock
        self.start = clock() if start is None else start
        self.times: list[dict] = []  # per chunk: chunk, frames, waiting (start, end), decoding, writing
        self.frames = 0
        self.first_written: float | None = None  # seconds from `start`
        self._error: BaseException | None = None
        self._last = clock()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = None
        if overlap:
            self._thread = threading.Thread(target=self._loop, name="magi-writer", daemon=True)
            self._thread.start()

    # main thread -------------------------------------------------------------------------
    def put(self, latents, frames):
        self._raise()
        item = _Item(latents, frames)
        if not self.overlap:
            self._consume(item, waiting_since=self._last)
            return
        while True:  # wait for room, but notice a writer that died meanwhile
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                self._raise()

    def close(self):
        """Waits until every chunk is written; raises the writer thread's error, if any."""
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
            self._thread = None
        self._raise()

    def abort(self):
        """Stops the writer thread without writing what is still queued."""
        if self._thread is not None:
            self._error = self._error or _Aborted()
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._queue.put(_DONE)
            self._thread.join()
            self._thread = None

    def _raise(self):
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error

    # writer thread ----------------------------------------------------------------------
    def _loop(self):
        while True:
            t0 = self.clock()
            item = self._queue.get()
            if item is _DONE or self._error is not None:
                return
            try:
                self._consume(item, waiting_since=t0)
            except BaseException as e:  # handed to the main thread at its next put/close
                self._error = e
                return

    def _consume(self, item: _Item, waiting_since: float):
        if hasattr(item.latents, "block_until_ready"):
            item.latents.block_until_ready()
        t1 = self.clock()
        frames = None if item.frames is None else np.asarray(item.frames)
        t2 = self.clock()
        n = 0
        if frames is not None and self.writer is not None:
            self.writer.write(frames)
            n = len(frames)
        t3 = self.clock()
        self._last = t3
        self.frames += n
        index = len(self.times)
        self.times.append(
            dict(
                chunk=index,
                frames=n,
                waiting=(waiting_since, t1),  # for the chunk and its latents: the sampler's time
                decoding=t2 - t1,
                writing=t3 - t2,
            )
        )
        if self.first_written is None:
            self.first_written = t3 - self.start
        if self.on_written is not None:
            self.on_written(index, n, t3 - self.start)


class _Aborted(Exception):
    pass
