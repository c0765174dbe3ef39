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
import weakref
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
_tls = threading.local()  # per thread: did the compile in progress (`hit`) / the last one (`served`) hit the cache?


def _on_event(event: str, **_):
    if event == _HIT:
        _tls.hit = _tls.served = True


def _listen():
    """Adds this module's listeners to JAX's monitoring (process-wide; once)."""
    global _listening
    import jax

    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True


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
        _listen()
        with _lock:
            _active.append(self.stats)
        return self.stats

    def __exit__(self, *exc):
        with _lock:
            _active.remove(self.stats)


# ----------------------------------------------------------------------------- run-once programs

# A program that runs once and briefly (the random weights of a small model:
# pipeline.random_init) is compiled for compile speed: XLA's backend optimisations and (on
# CPU) its MLIR fusion emitters off. TINY's DiT, VAE and T5 initialisers: 8.9 s of
# compilation -> 2.7 s.
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def compile_with(lowered, options: dict):
    """`lowered.compile(options)`, keeping only the options this XLA knows (one it does not
    know is dropped: the program is the same without it)."""
    import jax

    options = dict(options)
    while True:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as e:
            unknown = [k for k in options if f"'{k}'" in str(e)]
            if "No such compile option" not in str(e) or not unknown:
                raise
            del options[unknown[0]]


# ----------------------------------------------------------------------------- 16-bit weights on CPU

# XLA:CPU computes a bfloat16 / float16 slice in float32 (its float normalization wraps the
# slice in converts), and loop-invariant code motion then hoists the conversion of a whole
# stacked weight out of the layer loop: every call first writes a float32 copy of all layers'
# weights (twice the model's 16-bit bytes: about 17 GB at 4.5B), and each layer then converts
# its slice back for a 16-bit matmul. With that pass off, each layer converts only its own
# slice. 4.5B layer shapes, 2 layers, bf16, one chunk of 4 steps: 3.3 s -> 1.3 s per run.
CPU_16BIT_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def program_options(args) -> dict:
    """Compiler options for a program called with `args` (arrays, or ShapeDtypeStructs with
    shardings): CPU_16BIT_OPTIONS when it runs on CPU devices and takes 16-bit floats."""
    import jax
    import numpy as np

    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "dtype")]
    half = any(np.dtype(x.dtype) in (np.dtype(jax.numpy.bfloat16), np.dtype(np.float16)) for x in leaves)
    if not half:
        return {}
    platforms = {d.platform for x in leaves if getattr(x, "sharding", None) is not None for d in x.sharding.device_set}
    return dict(CPU_16BIT_OPTIONS) if platforms == {"cpu"} else {}


# ----------------------------------------------------------------------------- saved programs
# The persistent cache above skips XLA's compilation, but every process still traces and
# lowers each program again: for a TINY run that is most of a warm start (about 10 s of
# Python). `SavedProgram` keeps the compiled executable itself next to the cache, keyed by
# everything that decides the program without tracing it: the function's name and identity
# (what it closes over), its static arguments, the structure, shapes, dtypes and shardings
# of its inputs, the source of this package, the JAX version, the devices and the flags that
# change code generation. A warm process loads the executable and calls it, no tracing.

_EXECUTABLES = "executables"
_source_digest: str | None = None


def _package_digest() -> str:
    """sha256 of this package's Python sources: any code change makes new programs."""
    global _source_digest
    if _source_digest is None:
        import hashlib

        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def _environment() -> tuple:
    """What decides code generation besides the program and the settings a process can change
    (`_traced_settings`, part of every key): versions, devices, flags, this package's source."""
    from importlib.metadata import PackageNotFoundError, version

    import jax

    try:
        jaxlib = version("jaxlib")
    except PackageNotFoundError:
        jaxlib = "?"
    devices = jax.devices()
    return (
        jax.__version__,
        jaxlib,
        (jax.process_index(), jax.process_count()),  # each host's executable drives its own devices
        tuple((d.platform, d.device_kind, d.id) for d in devices),
        os.environ.get("XLA_FLAGS", ""),
        os.environ.get("LIBTPU_INIT_ARGS", ""),
        _package_digest(),
    )


def _traced_settings() -> tuple:
    """Settings that can change while a process runs and change what a program traces to:
    JAX's numerics switches and the attention implementation (attention.using)."""
    import jax

    return (
        jax.config.jax_default_matmul_precision,
        jax.config.jax_enable_x64,
        str(jax.config.jax_default_prng_impl),
        os.environ.get("MAGI_ATTENTION", ""),
    )


def _leaf_signature(x):
    """A hashable description of one input as jit sees it (aval and placement); cheap, as it
    runs on every call. The text the disk key needs is made only on a miss (`_leaf_text`)."""
    import jax
    import numpy as np

    if isinstance(x, jax.Array):
        return (jax.typeof(x), x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return ("np", x.shape, str(x.dtype))
    return ("py", type(x).__name__)  # Python scalars: weakly typed by their kind


def _leaf_text(signature) -> str:
    """A signature as stable text, with the device ids of a mesh (its repr leaves them out)."""
    if signature[0] in ("np", "py"):
        return repr(signature)
    aval, s = signature
    mesh = getattr(s, "mesh", None)
    ids = tuple(int(d.id) for d in mesh.devices.flat) if mesh is not None and hasattr(mesh, "devices") else ()
    return repr((str(aval), s, ids))


def saved_dir() -> Path | None:
    """Where executables are kept: inside JAX's compilation cache folder, when it is on."""
    import jax

    root = jax.config.jax_compilation_cache_dir
    return None if not root else Path(root) / _EXECUTABLES


# Compiled programs of this process, shared by every SavedProgram: a second sampler (or VAE,
# or text encoder) of the same model and shapes runs the first one's executables, with or
# without the cache on disk. Keyed like the files on disk, minus what cannot change in a
# process (versions, devices, flags, sources).
_compiled: dict = {}


def forget_programs():
    """Drops the programs compiled in this process (as a new process would start)."""
    with _lock:
        _compiled.clear()


# Every executable a process holds keeps its machine code mapped: XLA:CPU maps a few pages per
# kernel, hundreds of regions per sampler program, and JAX's own caches keep every program a
# process ever compiled. Linux refuses a process more than vm.max_map_count regions (65530 by
# default), and XLA's next compile then aborts or segfaults. A process that runs many shapes
# (a notebook, a server, a test worker) gets there; so past half that, a SavedProgram about to
# compile a new program first drops the compiled ones (they come back from the compilation
# cache, or compile again).
MAPPINGS_HIGH = 32_768


def mapped_regions() -> int | None:
    """Memory regions this process maps (Linux; None elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def relieve_mappings(limit: int | None = None) -> bool:
    """Drops every compiled program of the process (ours and JAX's caches) when it maps more
    than `limit` regions (default MAPPINGS_HIGH); returns whether it did."""
    import gc

    import jax

    regions = mapped_regions()
    if regions is None or regions <= (MAPPINGS_HIGH if limit is None else limit):
        return False
    forget_programs()
    jax.clear_caches()
    gc.collect()
    return True


class SavedProgram:
    """`jax.jit(fn, static_argnums, donate_argnums)` whose executables are shared by every
    SavedProgram of the process with the same name and identity, and saved to disk and loaded
    from there by later processes when the cache is on (see above).

    `identity`: a value whose repr names everything `fn` closes over that changes its program
    (a graphdef, a scale): two functions with equal name and identity must trace alike.
    `options`: compiler options (e.g. RUN_ONCE_OPTIONS), on top of `program_options`.
    `programs` counts the distinct programs this object has run (compiled here, loaded, or
    compiled earlier by another SavedProgram of the process); `compiled` those it compiled.
    The object holds its executables weakly: the process's table (above) owns them, so
    forget_programs / relieve_mappings free them.
    """

    def __init__(self, fn, name: str, identity=None, static_argnums=(), donate_argnums=(), options=None):
        import jax

        self.name = name
        self.identity = identity
        self.options = dict(options or {})
        self.static = tuple(static_argnums)
        self.jitted = jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums)
        self._mine: dict = {}  # key -> weakref to the executable: this object's programs (the fast path)
        self.compiled = 0

    @property
    def programs(self) -> int:
        return len(self._mine) + self.jitted._cache_size()

    def __call__(self, *args):
        import jax

        if jax.process_count() > 1:  # several hosts: a plain jit (and JAX's persistent cache)
            return self.jitted(*args)
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static)
        statics = tuple(args[i] for i in self.static)
        leaves, tree = jax.tree.flatten(dynamic)
        key = (statics, tree, tuple(_leaf_signature(x) for x in leaves), _traced_settings())
        ref = self._mine.get(key)
        executable = None if ref is None else ref()
        if executable is None:
            shared = (self.name, self.identity, key)
            with _lock:
                executable = _compiled.get(shared)
            if executable is None:
                relieve_mappings()  # a new program: first make room if the process maps too much
                executable = self._load_or_compile(saved_dir(), key, args)
                with _lock:
                    _compiled[shared] = executable
            self._mine[key] = weakref.ref(executable)
        return executable(*dynamic)

    def _file(self, folder: Path, key) -> Path:
        import hashlib

        statics, tree, leaves, settings = key
        leaves = [_leaf_text(x) for x in leaves]
        text = repr((self.name, self.identity, statics, str(tree), leaves, settings, _environment()))
        return folder / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.bin"

    def _load_or_compile(self, folder: Path | None, key, args):
        import pickle

        import jax
        from jax.experimental import serialize_executable

        path = None if folder is None else self._file(folder, key)  # None: this process only
        start = time.perf_counter()
        if path is not None and path.exists():
            try:
                payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
                by_id = {d.id: d for d in jax.devices()}
                devices = [by_id[i] for i in device_ids]  # the devices it was compiled for, in order
                compiled = serialize_executable.deserialize_and_load(
                    payload, in_tree, out_tree, execution_devices=devices
                )
            except Exception as e:  # a stale or broken file: compile again and replace it
                print(f"warning: ignoring saved program {path.name}: {e}", file=sys.stderr)
                path.unlink(missing_ok=True)  # (not replaced when JAX's cache serves the program)
            else:
                _record_load(self.name, start, time.perf_counter())
                return compiled
        _listen()
        _tls.served = False
        compiled = compile_with(self.jitted.lower(*args), {**self.options, **program_options(args)})
        if getattr(_tls, "served", False):
            # JAX's cache had it (our file was missing: a new release whose programs did not
            # change). Not saved from this copy: XLA:CPU serializes a deserialized executable
            # without part of its machine code, and the process loading that file would fail
            # at its first call ("Function ... not found"). Later processes load it from JAX's
            # cache in the same way (traced and lowered, not compiled).
            return compiled
        self.compiled += 1
        if path is None:
            return compiled
        try:
            device_ids = [d.id for d in compiled._executable.xla_executable.local_devices()]
            data = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers see a whole file or none
        except Exception as e:  # a full disk or an executable that cannot be serialized
            print(f"warning: could not save program {self.name}: {e}", file=sys.stderr)
        return compiled


def broken_program_hint(error: BaseException, cache_dir: Path | None) -> str | None:
    """What to tell the user when a program read from the compilation cache cannot run:
    XLA:CPU's "Function <kernel> not found" means an executable was stored without part of its
    machine code (see SavedProgram._load_or_compile). None for any other error."""
    import re

    found = re.search(r"Function \S+ not found", str(error))
    if cache_dir is None or found is None:
        return None
    return (
        f"a compiled program in the compilation cache {cache_dir} is incomplete ({found.group(0)}); "
        f"delete that folder, or run with --compilation_cache off"
    )


def _record_load(name: str, start: float, end: float):
    """A saved program loaded: counted as a cache hit by the active recorders."""
    with _lock:
        for stats in _active:
            stats.seconds += end - start
            stats.spans.append((start, end))
            stats.cache_hits.append(name)
