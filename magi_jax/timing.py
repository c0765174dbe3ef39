"""Where a run's time went: a timeline of exclusive phases, and the summary printed at the end.

The main thread is always in exactly one phase (setup, loading each model, text encoding,
prefix encoding, the sampling/decoding pipeline); the seconds JAX spends tracing, lowering
and compiling inside a phase are moved to `compilation`, so the phases add up to the wall
time. Inside the pipeline the device samples and decodes while the host waits, so that
span is split by what the consumer of the chunks waited for: the sampler's latents
(`sampling`), the decoded frames (`decoding`) or the mp4 encoder (`writing`) - see
chunk_sink.py.

`--json_summary FILE` writes the same numbers machine-readable (`summary()`):

    frames, fps, chunks, output
    seconds: total, setup, load_t5, load_dit, load_vae, text_encoding, prefix_encoding,
             warmup (--profile only), compilation, sampling, decoding, writing, other
    time_to_first_chunk, per_chunk: [{chunk, frames, sampling, decoding, writing}]
    compilations, cache_hits, compiled_programs, compilation_cache
    peak_device_memory_bytes (null where the backend does not report it),
    peak_host_memory_bytes, devices, overlap
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from magi_jax.compile_cache import CompileStats

PHASES = (
    "setup",
    "load_t5",
    "load_dit",
    "load_vae",
    "text_encoding",
    "prefix_encoding",
    "warmup",
    "compilation",
    "sampling",
    "decoding",
    "writing",
)


class Timeline:
    """Exclusive wall-clock phases of one run, compile time set apart.

    `start` is the run's origin (e.g. when the command began), so setup before the
    timeline object existed is counted too.
    """

    def __init__(self, stats: CompileStats, start: float | None = None, clock=time.perf_counter):
        self.clock = clock
        self.start = clock() if start is None else start
        self.stats = stats
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.first_chunk: float | None = None  # seconds from start to the first chunk written
        self.end: float | None = None

    def now(self) -> float:
        return self.clock() - self.start

    @contextlib.contextmanager
    def phase(self, name: str):
        t0, c0 = self.clock(), self.stats.seconds
        try:
            yield
        finally:
            compiled = self.stats.seconds - c0
            self.seconds[name] += max(0.0, self.clock() - t0 - compiled)
            self.seconds["compilation"] += compiled

    def mark_setup_done(self):
        """Everything from `start` until now is setup (argument checks, imports, devices)."""
        self.seconds["setup"] += self.now()

    def add_pipeline(self, chunk_times: list[dict]) -> list[dict]:
        """Pipeline seconds as the chunks' consumer saw them; returns the per-chunk rows.

        The consumer's wait for a chunk is sampling, except where the main thread was
        compiling meanwhile (that is compilation). Compilation while the consumer decoded or
        wrote was hidden behind that work and is not counted again.
        """
        rows = []
        for c in chunk_times:
            start, end = c["waiting"]
            compiled = self.stats.overlap(start, end)
            row = {k: v for k, v in c.items() if k != "waiting"}
            row["sampling"] = max(0.0, end - start - compiled)
            row["compilation"] = compiled
            for name in ("sampling", "decoding", "writing", "compilation"):
                self.seconds[name] += row[name]
            rows.append(row)
        return rows

    def finish(self):
        self.end = self.now()


def peak_device_memory() -> int | None:
    """Largest peak allocation over this process's devices (None: the backend does not say)."""
    import jax

    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # backends without memory statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def peak_host_memory() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def summary(timeline: Timeline, chunk_times: list[dict], *, frames: int, fps: int, output, cache_dir, overlap: bool):
    import jax

    total = timeline.end if timeline.end is not None else timeline.now()
    seconds = {k: round(v, 4) for k, v in timeline.seconds.items()}
    seconds["other"] = round(max(0.0, total - sum(timeline.seconds.values())), 4)
    seconds = {"total": round(total, 4), **seconds}
    stats = timeline.stats.as_dict()
    return {
        "output": str(output),
        "frames": frames,
        "fps": fps,
        "chunks": len(chunk_times),
        "seconds": seconds,
        "time_to_first_chunk": None if timeline.first_chunk is None else round(timeline.first_chunk, 4),
        "per_chunk": [{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items()} for c in chunk_times],
        **stats,
        "compilation_cache": None if cache_dir is None else str(cache_dir),
        "peak_device_memory_bytes": peak_device_memory(),
        "peak_host_memory_bytes": peak_host_memory(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "overlap": overlap,
    }


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def render(s: dict) -> str:
    """The human summary printed at the end of a run."""
    sec = s["seconds"]
    lines = [f"timing ({s['devices']}, {s['frames']} frames, {s['chunks']} chunks):"]
    loads = ", ".join(f"{k[5:]} {sec[k]:.2f}s" for k in ("load_t5", "load_dit", "load_vae"))
    lines.append(f"  setup          {sec['setup']:8.2f}s")
    lines.append(f"  loading        {sec['load_t5'] + sec['load_dit'] + sec['load_vae']:8.2f}s  ({loads})")
    cache = "off" if s["compilation_cache"] is None else f"{s['cache_hits']} cache hits"
    lines.append(f"  compilation    {sec['compilation']:8.2f}s  ({s['compilations']} compiled, {cache})")
    lines.append(f"  text encoding  {sec['text_encoding']:8.2f}s")
    if sec["prefix_encoding"]:
        lines.append(f"  prefix (VAE)   {sec['prefix_encoding']:8.2f}s")
    if sec["warmup"]:
        lines.append(f"  warm-up pass   {sec['warmup']:8.2f}s  (before the profile)")
    lines.append(f"  sampling       {sec['sampling']:8.2f}s")
    lines.append(f"  decoding       {sec['decoding']:8.2f}s")
    lines.append(f"  writing        {sec['writing']:8.2f}s")
    if sec["other"] >= 0.01:
        lines.append(f"  other          {sec['other']:8.2f}s")
    lines.append(f"  total          {sec['total']:8.2f}s")
    if s["time_to_first_chunk"] is not None:
        lines.append(f"  first chunk written after {s['time_to_first_chunk']:.2f}s")
    per = s["per_chunk"]
    if per:
        samp = " ".join(f"{c['sampling']:.2f}" for c in per)
        dec = " ".join(f"{c['decoding']:.2f}" for c in per)
        lines.append(f"  per chunk: sampling [{samp}] s, decoding [{dec}] s")
    lines.append(
        f"  peak memory: device {_gib(s['peak_device_memory_bytes'])}, host {_gib(s['peak_host_memory_bytes'])}"
    )
    return "\n".join(lines)


def write_json(path, data: dict):
    """Written under a temporary name and renamed, as every output."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
