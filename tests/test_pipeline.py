"""A run's speed machinery: the compilation cache, the timing summary, overlap, profiles, progress.

Everything on TINY with random weights; the cache runs are fresh processes, as a user's
second run is.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax import pipeline
from magi_jax.compile_cache import CompileStats
from magi_jax.generate import main, options_from_args, parse_args, resolve
from magi_jax.pipeline import _pipeline, load_parts, sampler_steps
from magi_jax.progress import Progress
from magi_jax.timing import PHASES, Timeline

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--num_frames", "16", "--num_steps", "4", "--size", "32x32"]
SUMMARY_FIELDS = {
    "output",
    "frames",
    "fps",
    "chunks",
    "seconds",
    "time_to_first_chunk",
    "per_chunk",
    "compilations",
    "cache_hits",
    "compile_seconds",
    "compiled_programs",
    "compilation_cache",
    "peak_device_memory_bytes",
    "peak_host_memory_bytes",
    "devices",
    "overlap",
}


def _command(tmp_path, name, cache, *extra):
    out, summary = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
    argv = ["--prompt", "a fox", "--output_path", str(out), *FAST, "--json_summary", str(summary)]
    run = subprocess.run(
        [sys.executable, "-m", "magi_jax.generate", *argv, "--compilation_cache", str(cache), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(summary.read_text()), run.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same command twice in fresh processes, sharing a new cache folder."""
    tmp = tmp_path_factory.mktemp("cache_runs")
    cache = tmp / "jax_cache"
    first = _command(tmp, "first", cache)
    second = _command(tmp, "second", cache)
    return cache, first, second


@pytest.mark.slow
def test_second_run_loads_every_program_from_the_cache(two_runs):
    cache, (first, _), (second, _) = two_runs
    assert first["compilation_cache"] == str(cache) == second["compilation_cache"]
    assert first["compilations"] > 0 and first["cache_hits"] == 0
    assert any("advance" in name for name in first["compiled_programs"]), first["compiled_programs"]
    # nothing compiled again, the sampler's window programs included: all came from disk
    assert second["compilations"] == 0 and second["compiled_programs"] == []
    assert second["cache_hits"] == first["compilations"]
    assert any(cache.iterdir())


@pytest.mark.slow
def test_summary_has_every_field_and_adds_up(two_runs):
    _, (first, _), (second, _) = two_runs
    for s in (first, second):
        assert set(s) == SUMMARY_FIELDS, set(s) ^ SUMMARY_FIELDS
        assert s["frames"] == 16 and s["chunks"] == 2 and s["fps"] == 24 and s["overlap"] is True
        sec = s["seconds"]
        assert set(sec) == {"total", "other", *PHASES}
        named = sum(sec[k] for k in PHASES)
        assert abs(named - sec["total"]) <= 0.05 * sec["total"], sec
        assert 0 < s["time_to_first_chunk"] <= sec["total"]
        assert [c["chunk"] for c in s["per_chunk"]] == [0, 1]
        assert sum(c["frames"] for c in s["per_chunk"]) == 16
        assert s["peak_host_memory_bytes"] > 0
    assert second["seconds"]["compilation"] < first["seconds"]["compilation"]


@pytest.mark.slow
def test_log_file_gets_plain_progress_lines(two_runs):
    _, (_, stderr), _ = two_runs  # stderr was a pipe, as a log file is
    assert "\r" not in stderr and "\x1b" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("chunk ")]
    assert len(lines) == 2 and lines[-1].startswith("chunk 2/2 written (8 frames)"), stderr
    assert "elapsed" in lines[0] and "left" in lines[0]
    assert "timing (" in stderr and "first chunk written after" in stderr


class _Frames:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.chunks = []

    def write(self, frames):
        self.chunks.append(np.array(frames))


@pytest.mark.slow
def test_overlapped_run_writes_the_frames_of_the_sequential_run(tmp_path):
    """The sampler hands out device arrays and dispatches on; decoding and writing happen
    behind it - and the frames are exactly those of sampling, decoding, writing in turn."""
    plan = resolve(parse_args(["--prompt", "a fox", "--output_path", str(tmp_path / "x.mp4"), *FAST]))
    parts = load_parts(plan, Timeline(CompileStats()))
    runs, steps = {}, []
    for name, overlap, on_dispatch in (
        ("sequential", False, None),
        ("overlapped", True, None),
        # with a step bar: every step dispatched on its own, a marker per step
        ("overlapped, step by step", True, lambda n, marker: steps.append((n, marker))),
    ):
        writer = _Frames()
        sink = _pipeline(parts.sampler, parts.vae, parts.inputs, writer, {"overlap": overlap}, on_dispatch)
        assert sink.overlap is overlap and len(sink.times) == 2
        runs[name] = writer.chunks
    assert {n for n, _ in steps} == {1} and len(steps) == sampler_steps(plan.config, parts.layout)
    assert all(m.is_ready() for _, m in steps)
    reference = runs.pop("sequential")
    assert len(reference) == 2 and reference[0].shape == (8, 32, 32, 3)
    for name, chunks in runs.items():
        assert len(chunks) == 2, name
        for a, b in zip(reference, chunks):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_unwritable_summary_path_is_refused_before_work(tmp_path, capsys):
    argv = ["--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), "--json_summary"]
    assert main([*argv, str(tmp_path / "no" / "s.json")]) == 2
    assert "--json_summary: folder" in capsys.readouterr().err
    assert main([*argv, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_no_overlap_flag(tmp_path):
    args = parse_args(["--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), "--no_overlap"])
    assert options_from_args(args).overlap is False
    assert options_from_args(parse_args(["--prompt", "p", "--output_path", "x.mp4"])).overlap is True


@pytest.mark.slow
def test_profile_writes_a_trace(tmp_path):
    trace = tmp_path / "trace"
    argv = ["--prompt", "a fox", "--output_path", str(tmp_path / "p.mp4"), *FAST, "--profile", str(trace)]
    assert main([*argv, "--json_summary", str(tmp_path / "p.json")]) == 0
    files = [p for p in trace.rglob("*") if p.is_file()]
    assert any(p.name.endswith((".xplane.pb", ".trace.json.gz")) for p in files), files
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["seconds"]["warmup"] > 0  # the traced pass ran after a warm-up pass


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_shows_a_chunk_bar_and_a_step_bar():
    """Steps are counted as the device finishes them: markers (device arrays) handed over at
    dispatch are waited on by a watcher thread, not by a callback compiled into the program."""
    term = _Terminal()
    progress = Progress(2, 8, stream=term, mininterval=0)
    assert progress.wants_steps
    progress.dispatched(4, jnp.zeros(()))
    progress.chunk_written(0, 8, 1.0)
    progress.dispatched(4, jnp.ones(()) * 2)
    progress.chunk_written(1, 8, 2.0)
    progress.close()
    text = term.getvalue()
    assert "chunks" in text and "2/2" in text and "steps" in text and "8/8" in text
    assert "<" in text  # tqdm's elapsed<remaining


def test_log_progress_estimates_the_time_left():
    log = io.StringIO()
    with Progress(4, 16, stream=log) as progress:
        assert not progress.wants_steps  # no step bar in a log
        progress.dispatched(8, jnp.zeros(()))
        progress.chunk_written(0, 8, 1.0)
    assert log.getvalue().startswith("chunk 1/4 written (8 frames), 00:00 elapsed, about 00:00 left")
    assert log.getvalue().count("\n") == 1


def test_pipeline_seconds_partition_the_consumer_timeline():
    """Compilation while the consumer waited for a chunk is compilation, not sampling;
    compilation hidden behind decoding or writing is not counted twice."""
    stats = CompileStats(spans=[(1.0, 3.0), (6.0, 7.0)], seconds=3.0)
    timeline = Timeline(stats, start=0.0, clock=lambda: 10.0)
    chunks = [
        dict(chunk=0, frames=8, waiting=(0.0, 4.0), decoding=1.0, writing=1.5),  # compiled 1..3 meanwhile
        dict(chunk=1, frames=8, waiting=(6.5, 8.0), decoding=0.5, writing=1.0),  # 6..7 half hidden by writing
    ]
    rows = timeline.add_pipeline(chunks)
    assert [r["sampling"] for r in rows] == [2.0, 1.0]
    assert [r["compilation"] for r in rows] == [2.0, 0.5]
    sec = timeline.seconds
    assert (sec["sampling"], sec["compilation"], sec["decoding"], sec["writing"]) == (3.0, 2.5, 1.5, 2.5)
    consumer_span = sum(c["waiting"][1] - c["waiting"][0] + c["decoding"] + c["writing"] for c in chunks)
    assert sum(sec.values()) == consumer_span


def test_small_random_models_compile_for_compile_speed(monkeypatch):
    """A random initialiser under RUN_ONCE_PARAMETERS compiles with the run-once options (it
    runs once, briefly); a larger one is compiled as usual (unoptimised, it would draw slower
    than its compilation saves). Either way the weights come out the same shape."""
    from flax import nnx

    from magi_jax import compile_cache, pipeline

    used = []
    real = compile_cache.compile_with
    monkeypatch.setattr(compile_cache, "compile_with", lambda lowered, o: used.append(o) or real(lowered, o))
    monkeypatch.setattr(pipeline, "RUN_ONCE_PARAMETERS", 100)
    compile_cache.forget_programs()
    small = pipeline.random_init(lambda: nnx.Linear(4, 4, rngs=nnx.Rngs(0)), "linear", (4, 4))  # 20 values
    large = pipeline.random_init(lambda: nnx.Linear(16, 16, rngs=nnx.Rngs(0)), "linear", (16, 16))  # 272 values
    assert used == [compile_cache.RUN_ONCE_OPTIONS, {}]
    assert small.kernel[...].shape == (4, 4) and large.kernel[...].shape == (16, 16)
    assert np.abs(np.asarray(small.kernel[...])).max() > 0


def test_a_warm_start_loads_random_weights_without_tracing_their_initialiser(tmp_path):
    """Random weights (TINY) are drawn by a saved program: a new process loads it from the
    cache instead of tracing and compiling the model's initialiser again."""
    from flax import nnx

    from magi_jax import compile_cache, pipeline

    before = jax.config.jax_compilation_cache_dir
    compile_cache.enable(str(tmp_path / "cache"))
    traced = []

    def build():
        traced.append(1)  # eval_shape traces once per call for the structure; jit once more
        return nnx.Linear(8, 8, rngs=nnx.Rngs(0))

    try:
        compile_cache.forget_programs()
        first = pipeline.random_init(build, "warm_linear", 8)
        assert len(traced) == 2
        compile_cache.forget_programs()  # as a new process starts
        with compile_cache.recording() as stats:
            again = pipeline.random_init(build, "warm_linear", 8)
        assert len(traced) == 3 and stats.cache_hits == ["random_warm_linear"]
        np.testing.assert_array_equal(np.asarray(again.kernel[...]), np.asarray(first.kernel[...]))
    finally:
        compile_cache.enable(before or "off")
        compile_cache.forget_programs()


def test_a_vae_whose_patch_is_not_the_configs_factor_is_refused():
    """The sampler lays out latents at spatial_downsample_factor; a VAE with other patches
    (or other latent channels) would decode a grid the DiT never made."""
    from magi_jax.config import load_config
    from magi_jax.vae import VaeConfigError

    tiny = load_config("tiny")
    assert pipeline.vae_model(tiny, True).model.cfg.patch_size == tiny.runtime.spatial_downsample_factor
    with pytest.raises(VaeConfigError, match="spatial_downsample_factor"):
        pipeline.vae_model(tiny.replace(runtime={"spatial_downsample_factor": 8}), True)
