"""Fast starts: JAX's persistent compilation cache, and counting what was compiled.

A real config compiles 7-11 sampler window programs, the VAE decoder and the text encoder
on every run; with the cache on, a second run loads the executables from disk instead.
The cache is on by default for the generate command and `pipeline.run`:

  * folder: `$MAGI_JAX_CACHE_DIR`, else `<user cache dir>/magi_jax/jax_cache`
    (`$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on macOS,
    `%LOCALAPPDATA%` on Windows);
  * `--compilation_cache DIR` moves it, `--compilation_cache off` (or
    `MAGI_JAX_CACHE_DIR=off`) disables it;
  * a folder the user configured for JAX itself (`JAX_COMPILATION_CACHE_DIR`,
    `jax.config.update("jax_compilation_cache_dir", ...)`) wins over our default.

Every program is cached, however quick to compile (JAX's default skips programs under a
second, which would be every program of a TINY run). The cache is trusted code: keep it in
a folder only you can write.

`CompileStats` counts, from JAX's monitoring events, the XLA compilations (programs not
served by the cache), the cache hits, and the seconds spent tracing, lowering, compiling or
loading executables - by program name, so a test can tell that the sampler's programs came
from the cache.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "MAGI_JAX_CACHE_DIR"
OFF = ("off", "none", "0", "false", "no", "disable", "disabled")

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # an XLA compile, or a cache load
_HIT = "/jax/compilation_cache/cache_hits"


def user_cache_root() -> Path:
    """The platform's per-user cache folder."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_dir() -> Path:
    return user_cache_root() / "magi_jax" / "jax_cache"


def resolve_dir(choice: str | None = None) -> Path | None:
    """The cache folder for a `--compilation_cache` value (None: the environment / default);
    None when disabled."""
    value = choice if choice is not None else os.environ.get(ENV_VAR)
    if value is None or value == "":
        return default_dir()
    if value.strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def enable(choice: str | None = None) -> Path | None:
    """Turns the persistent cache on (before the first compilation, ideally); returns its
    folder, or None when disabled. Idempotent; safe to call from the Python API."""
    import jax

    path = resolve_dir(choice)
    current = jax.config.jax_compilation_cache_dir
    if choice is None and os.environ.get(ENV_VAR) is None and current:
        path = Path(current)  # the user set up JAX's cache themselves: keep theirs
    if path is None:
        if current:
            jax.config.update("jax_compilation_cache_dir", None)
            _reset()
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache disabled, cannot create {path}: {e}", file=sys.stderr)
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if current != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        _reset()
    return path


def _reset():
    """JAX decides once per process whether the cache is used (at the first compilation):
    forget that decision so a folder set later still takes effect."""
    try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # a JAX without it: the setting applies to new processes
        pass


# ----------------------------------------------------------------------------- counting


@dataclass
class CompileStats:
    """What JAX compiled while this recorder was active (see `recording`)."""

    def overlap(self, start: float, end: float) -> float:
        """Seconds of compilation inside [start, end] (perf_counter clock)."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.spans)

    compiled: list = field(default_factory=list)  # program names XLA compiled
    cache_hits: list = field(default_factory=list)  # program names loaded from the cache
    seconds: float = 0.0  # tracing + lowering + compiling / loading, all threads
    spans: list = field(default_factory=list)  # (start, end) of each, time.perf_counter() clock

    @property
    def compilations(self) -> int:
        return len(self.compiled)

    def as_dict(self) -> dict:
        return {
            "compilations": self.compilations,
            "cache_hits": len(self.cache_hits),
            "compile_seconds": round(self.seconds, 4),
            "compiled_programs": sorted(set(self.compiled)),
        }


_lock = threading.Lock()
_active: list[CompileStats] = []
_listening = False
_tls = threading.local()  # per thread: did the compile in progress hit the cache?


def _on_event(event: str, **_):
    if event == _HIT:
        _tls.hit = True


def _on_duration(event: str, seconds: float, **kw):
    if event not in (_TRACE, _LOWER, _BACKEND):
        return
    end = time.perf_counter()
    with _lock:
        for stats in _active:
            stats.seconds += seconds
            stats.spans.append((end - seconds, end))
            if event == _BACKEND:
                name = str(kw.get("fun_name", "?"))
                (stats.cache_hits if getattr(_tls, "hit", False) else stats.compiled).append(name)
    if event == _BACKEND:
        _tls.hit = False


class recording:
    """`with recording() as stats:` counts compilations and cache hits inside the block
    (JAX's monitoring listeners are process-wide and cannot be removed: they are added once
    and forward to the active recorders)."""

    def __init__(self):
        self.stats = CompileStats()

    def __enter__(self) -> CompileStats:
        global _listening
        import jax

        with _lock:
            if not _listening:
                jax.monitoring.register_event_listener(_on_event)
                jax.monitoring.register_event_duration_secs_listener(_on_duration)
                _listening = True
            _active.append(self.stats)
        return self.stats

    def __exit__(self, *exc):
        with _lock:
            _active.remove(self.stats)
