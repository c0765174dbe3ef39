"""Saved programs: a program compiled once runs in every SavedProgram of the process with the
same name and identity; with the compilation cache on it is also kept on disk and a later
process (here: the process's programs forgotten, `forget_programs`) loads it instead of tracing
and compiling; anything that changes the program gives a new one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax import compile_cache
from magi_jax.compile_cache import SavedProgram


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    compile_cache.enable(str(tmp_path / "cache"))
    compile_cache.forget_programs()
    yield tmp_path / "cache"
    compile_cache.enable(before or "off")


@pytest.fixture
def cache_off():
    """No cache on disk (the session's is on): what a process compiles is all it has."""
    before = jax.config.jax_compilation_cache_dir
    compile_cache.enable("off")
    yield
    compile_cache.enable(before or "off")


def _program(traces: list, scale: float):
    def f(x, power, y):
        traces.append(1)  # runs only while tracing
        return {"out": (x**power) * scale + y}

    return SavedProgram(f, "scaled_power", identity=scale, static_argnums=(1,), donate_argnums=(2,))


def test_a_new_process_loads_the_executable_without_tracing(cache_dir):
    x, y = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    traces = []
    first = _program(traces, 2.0)
    want = first(x, 3, jnp.asarray(y))["out"]
    assert len(traces) == 1 and first.programs == 1
    assert [p.name.split("-")[0] for p in (cache_dir / "executables").iterdir()] == ["scaled_power"]

    compile_cache.forget_programs()
    later = _program(traces, 2.0)  # nothing in memory: as a fresh process
    with compile_cache.recording() as stats:
        got = later(x, 3, jnp.asarray(y))["out"]
    assert len(traces) == 1, "loaded, not traced again"
    assert stats.cache_hits == ["scaled_power"] and stats.compiled == []
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), x**3 * 2 + 1)


@pytest.mark.parametrize(
    "change",
    ["identity", "static argument", "shape", "dtype"],
)
def test_anything_that_changes_the_program_compiles_a_new_one(cache_dir, change):
    x, y = np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
    traces = []
    _program(traces, 2.0)(x, 3, jnp.asarray(y))
    scale, power = (5.0 if change == "identity" else 2.0), (2 if change == "static argument" else 3)
    if change == "shape":
        x, y = np.ones((4, 3), np.float32), np.ones((4, 3), np.float32)
    if change == "dtype":
        x = x.astype(np.float16)
    got = _program(traces, scale)(x, power, jnp.asarray(y))["out"]
    assert len(traces) == 2, "traced anew"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.float32(x) ** power * scale + y, rtol=1e-3)
    assert len(list((cache_dir / "executables").iterdir())) == 2


def test_a_broken_file_is_compiled_again(cache_dir, capsys):
    x, y = np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
    traces = []
    _program(traces, 2.0)(x, 3, jnp.asarray(y))
    (saved,) = (cache_dir / "executables").iterdir()
    saved.write_bytes(b"not an executable")
    for entry in cache_dir.glob("jit_*"):  # JAX's own entry too: XLA compiles the program again
        entry.unlink()
    compile_cache.forget_programs()
    jax.clear_caches()
    got = _program(traces, 2.0)(x, 3, jnp.asarray(y))["out"]
    assert len(traces) == 2 and "ignoring saved program" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(got), x**3 * 2 + y)
    assert saved.read_bytes() != b"not an executable", "replaced by the new executable"


def test_a_program_jaxs_cache_served_is_never_saved_from_that_copy(cache_dir):
    """XLA:CPU serializes an executable it deserialized without part of its machine code, and
    a process that loads such a copy fails at its first call ("Function ... not found"). Our
    file gone but JAX's cache entry there (a new release of this package whose programs did
    not change): the program JAX's cache serves runs, and the next process still runs it."""
    x, y = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    traces = []
    _program(traces, 2.0)(x, 3, jnp.asarray(y))  # compiled: our file and JAX's entry written
    for saved in (cache_dir / "executables").iterdir():
        saved.unlink()
    for _ in range(2):  # the process JAX's cache serves, then a later one
        compile_cache.forget_programs()
        jax.clear_caches()
        device_y = jnp.asarray(y)
        with compile_cache.recording() as stats:
            got = _program(traces, 2.0)(x, 3, device_y)["out"]
        assert stats.compiled == [], "from a cache, not compiled"
        np.testing.assert_array_equal(np.asarray(got), x**3 * 2 + y)


def test_cache_off_is_a_plain_jit(cache_off):
    traces = []
    p = _program(traces, 2.0)
    p(np.ones(3, np.float32), 2, jnp.ones(3))
    p(np.ones(3, np.float32), 2, jnp.ones(3))
    assert len(traces) == 1 and p.programs == 1 and compile_cache.saved_dir() is None


def test_a_sharded_program_loads_onto_its_devices(cache_dir):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("seq",), devices=jax.devices()[2:4])
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("seq")))
    y = lambda: jax.device_put(jnp.ones(8), x.sharding)  # noqa: E731  (donated: one per call)
    traces = []
    want = _program(traces, 2.0)(x, 2, y())["out"]
    compile_cache.forget_programs()
    got = _program(traces, 2.0)(x, 2, y())["out"]
    assert len(traces) == 1
    assert got.sharding.device_set == want.sharding.device_set == set(jax.devices()[2:4])
    np.testing.assert_array_equal(np.asarray(got), np.arange(8.0) ** 2 * 2 + 1)


def test_programs_are_shared_in_the_process_with_the_cache_off(cache_off):
    """A second object of the same name and identity (a second Sampler of the same model) runs
    the first one's executable: nothing traced or compiled again, even with no cache on disk."""
    compile_cache.forget_programs()
    traces = []
    first, second = _program(traces, 3.0), _program(traces, 3.0)
    first(np.ones(3, np.float32), 2, jnp.ones(3))
    got = second(np.full(3, 2.0, np.float32), 2, jnp.ones(3))["out"]
    assert len(traces) == 1 and (first.compiled, second.compiled) == (1, 0)
    assert first.programs == second.programs == 1  # both ran one program
    np.testing.assert_array_equal(np.asarray(got), np.full(3, 13.0))
    _program(traces, 4.0)(np.ones(3, np.float32), 2, jnp.ones(3))  # another identity: its own
    assert len(traces) == 2


@pytest.mark.parametrize("setting", ["attention implementation", "matmul precision"])
def test_settings_that_change_tracing_make_a_new_program(setting, cache_off):
    """Switched inside a process (attention.using, jax.default_matmul_precision): not the old one."""
    from magi_jax import attention

    compile_cache.forget_programs()
    traces = []
    x = np.ones(3, np.float32)
    _program(traces, 6.0)(x, 2, jnp.ones(3))
    if setting == "attention implementation":
        with attention.using("dpa"):
            _program(traces, 6.0)(x, 2, jnp.ones(3))
    else:
        with jax.default_matmul_precision("bfloat16"):
            _program(traces, 6.0)(x, 2, jnp.ones(3))
    assert len(traces) == 2


def test_run_once_programs_compile_with_the_options_this_xla_knows(monkeypatch):
    """Random-weight initialisers compile with RUN_ONCE_OPTIONS; one option this XLA does not
    know is dropped (the program is the same), the others stay."""
    wanted = dict(compile_cache.RUN_ONCE_OPTIONS)
    lowered = jax.jit(lambda x: x * 2).lower(np.ones(3, np.float32))
    tried = []
    real = type(lowered).compile

    def spy(self, compiler_options=None):
        tried.append(dict(compiler_options or {}))
        return real(self, compiler_options=compiler_options)

    monkeypatch.setattr(type(lowered), "compile", spy)
    out = compile_cache.compile_with(lowered, {**wanted, "xla_no_such_option": 1})(np.ones(3, np.float32))
    np.testing.assert_array_equal(np.asarray(out), np.full(3, 2.0))
    assert tried == [{**wanted, "xla_no_such_option": 1}, wanted]


def test_a_saved_program_holds_its_executables_only_through_the_process(cache_off):
    """Every executable held keeps its machine code mapped; so a SavedProgram holds its
    programs weakly and the process's table owns them: forgetting the programs frees them
    (a live SavedProgram does not keep them), and the next call compiles again."""
    import gc
    import weakref

    compile_cache.forget_programs()
    program = _program([], 7.0)
    x, y = np.ones((2, 3), np.float32), jnp.ones((2, 3), np.float32)
    program(x, 2, y)
    held = weakref.ref(next(iter(compile_cache._compiled.values())))
    program(x, 2, jnp.ones((2, 3), np.float32))  # the fast path: nothing new
    assert program.compiled == 1 and program.programs == 1
    compile_cache.forget_programs()
    gc.collect()
    assert held() is None, "the SavedProgram kept its executable alive"
    out = program(x, 2, jnp.ones((2, 3), np.float32))["out"]
    assert program.compiled == 2 and program.programs == 1
    np.testing.assert_array_equal(np.asarray(out), np.full((2, 3), 8.0, np.float32))


@pytest.mark.skipif(compile_cache.mapped_regions() is None, reason="needs /proc/self/maps (Linux)")
def test_relieving_mappings_unmaps_the_programs_of_the_process():
    """Compiled programs stay mapped (JAX caches them too) until the process drops them:
    relieve_mappings does, past its limit, and the programs still run afterwards."""
    compile_cache.forget_programs()
    jax.clear_caches()
    program = _program([], 11.0)
    before = compile_cache.mapped_regions()
    for rows in range(1, 9):
        program(np.ones((rows, 3), np.float32), 2, jnp.ones((rows, 3), np.float32))
    grown = compile_cache.mapped_regions() - before
    assert grown > 8, "each executable maps regions of its own"
    assert not compile_cache.relieve_mappings(limit=10**9)  # below the limit: nothing dropped
    assert compile_cache.relieve_mappings(limit=0)
    assert compile_cache.mapped_regions() - before < grown / 2
    out = program(np.ones((2, 3), np.float32), 2, jnp.ones((2, 3), np.float32))["out"]
    np.testing.assert_array_equal(np.asarray(out), np.full((2, 3), 12.0, np.float32))


def _stack_converts(text: str, args) -> list[str]:
    """Conversions in a compiled CPU program (outside fused computations, so each writes a
    buffer) to a float32 array shaped like one of the 16-bit weight stacks in `args` (layer
    axis first): a whole stack, converted."""
    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "dtype")]
    stacks = {x.shape for x in leaves if x.dtype == jnp.bfloat16 and x.ndim == 3}
    shapes = "|".join(re.escape("f32[" + ",".join(map(str, s)) + "]") for s in stacks)
    fused = set(re.findall(r"fusion\(.*calls=(%[\w.\-]+)", text))
    found, inside = [], None
    for line in text.splitlines():
        head = re.match(r"(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if head:
            inside = head.group(1)
        elif inside not in fused and re.search(rf"%[\w.\-]*convert[\w.\-]* = ({shapes})\{{", line):
            found.append(line.strip()[:160])
    return found


def test_16bit_layer_weights_are_never_converted_as_a_whole_stack_on_cpu():
    # XLA:CPU slices bfloat16 through float32, and hoisting that out of the layer loop
    # would write a float32 copy of every layer's weights on every call (see program_options)
    layers, d = 3, 64
    x = jnp.ones((4, d), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((layers, d, d)) * 0.1, jnp.bfloat16)

    def deep(x, w):
        def body(h, wl):
            return jnp.matmul(h, wl, preferred_element_type=jnp.float32).astype(jnp.bfloat16), None

        return jax.lax.scan(body, x, w)[0]

    assert compile_cache.program_options((x, w)) == compile_cache.CPU_16BIT_OPTIONS
    assert compile_cache.program_options((x.astype(jnp.float32), w.astype(jnp.float32))) == {}
    plain = jax.jit(deep).lower(x, w).compile().as_text()
    assert _stack_converts(plain, w), "XLA no longer hoists the conversion: the options may go"

    saved = SavedProgram(deep, "deep_bf16")
    got = saved(x, w)
    [executable] = [ref() for ref in saved._mine.values()]
    assert _stack_converts(executable.as_text(), w) == []
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jax.jit(deep)(x, w), np.float32))


def test_the_window_program_of_a_bf16_model_converts_no_weight_stack_on_cpu():
    from magi_jax import aot, sharding
    from magi_jax.config import load_config

    cfg = load_config("tiny").replace(runtime=dict(num_frames=16, num_steps=4), model=dict(params_dtype="bfloat16"))
    mesh = sharding.make_mesh({"seq": 1}, jax.devices()[:1])
    p = aot.sampler_programs(cfg, mesh, "xla", prefix_frames=0)[0]
    compiled, _ = aot.compile_program(p, mesh, "xla")
    assert _stack_converts(compiled.as_text(), p.args) == []
