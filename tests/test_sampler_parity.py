"""Whole upstream sampler runs (kind `dit`, `runs[]`) replay end to end.

Each run feeds the recorded noise, processed captions and prefix latents to our sampler (its
default ring buffers) and compares every yielded clean chunk with upstream's, at the fixture's
tolerance; the same run checks the ring buffers against whole-video buffers (issue 13).
"""

import jax
import ml_dtypes
import numpy as np
import parity
import pytest
from dit_fixtures import config_of, model_of

from magi_jax.sampler import Sampler
from magi_jax.sampler_plan import cache_rows, latent_slots, layout, plan, prefix_call


def _runs(fx):
    for run in fx.meta["runs"]:
        yield run["name"], run


def run_config(fx, run):
    cfg = config_of(fx, run.get("env"))
    changes = dict(num_frames=run["num_frames"], num_steps=run["num_steps"], window_size=run["window_size"])
    changes.update(run.get("runtime_overrides") or {})
    return cfg.replace(runtime=changes)


def run_arrays(fx, run):
    prefix = f"runs/{run['name']}/"
    return {k[len(prefix) :]: fx.arrays[k] for k in fx.arrays.files if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("fx,run", parity.cases("dit", _runs))
def test_generate_run(fx, run):
    cfg = run_config(fx, run)
    a = run_arrays(fx, run)
    prefix = a.get("prefix_video")
    if prefix is not None:  # the bf16 VAE's output, stored exactly as float32
        prefix = prefix[0].astype(ml_dtypes.bfloat16)
    lay = layout(cfg, 0 if prefix is None else prefix.shape[1])
    assert [1, *lay.latent_shape] == run["latent_size"] and lay.chunk_num == run["chunk_num"]

    model = model_of(fx)
    sampler = Sampler(model, cfg)  # the ring buffers
    inputs = dict(caption=a["y"], caption_mask=a["emb_masks_processed"], prefix=prefix, noise=a["noise"][0])
    chunks = list(sampler.chunks(**inputs))
    assert sampler.cache_shape[1] == cache_rows(cfg, lay)
    assert [c.shape[2] for c in chunks] == run["yielded_chunk_frames"]
    tol = fx.meta["tolerance"]
    failures = []
    for i, got in enumerate(chunks):  # every chunk is compared (and reported) before the verdict
        key = f"chunk_{i:02d}"
        try:
            parity.check_array(got, a[key], tol[f"runs/{run['name']}/{key}"], f"{fx.id}/{run['name']} {key}")
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)
    _check_ring_equals_whole_video(model, cfg, lay, chunks, inputs)


def _host_plan(cfg, lay, ring: bool):
    """The sampler's host plan (every call's records, cache slots included) as flat leaves and structure."""
    stages = [(s.groups, s.done_chunk) for s in plan(cfg, lay, ring)]
    return jax.tree.flatten((stages, prefix_call(cfg, lay, ring) if lay.clean_chunks else None))


def _check_ring_equals_whole_video(model, cfg, lay, ring_chunks, inputs):
    """Issue 13 item 2: the ring-buffer sampler gives the whole-video sampler's chunks (same
    noise) within 1e-6 relative.

    Where the ring holds the whole video (as many KV rows and latent slots as whole-video
    buffers) the two samplers allocate the same buffers and plan the same calls: one code path
    and the same compiled programs, so the host plans are compared and nothing runs twice.
    Where it is smaller (the window-2 runs: 3 latent slots for 4 chunks) a whole-video run is
    compared chunk by chunk."""
    whole_rows, whole_slots = cache_rows(cfg, lay, ring=False), latent_slots(cfg, lay, ring=False)
    assert whole_rows == lay.chunk_num * lay.chunk_tokens and whole_slots == lay.chunk_num
    if cache_rows(cfg, lay) == whole_rows and latent_slots(cfg, lay) == whole_slots:
        (ring, ring_tree), (whole, whole_tree) = _host_plan(cfg, lay, True), _host_plan(cfg, lay, False)
        assert ring_tree == whole_tree
        for x, y in zip(ring, whole, strict=True):
            np.testing.assert_array_equal(x, y)
        return
    sampler = Sampler(model, cfg, ring=False)
    whole = list(sampler.chunks(**inputs))
    assert sampler.cache_shape[1] == whole_rows
    for i, (got, want) in enumerate(zip(ring_chunks, whole, strict=True)):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=f"chunk {i}")


@pytest.mark.parametrize("fx,run", parity.cases("dit", _runs))
def test_run_plan_matches_recorded_calls(fx, run):
    """Every model call upstream made in the run, in order: window, times, key ranges, flags."""
    from dit_fixtures import kwarg_interval

    from magi_jax.sampler_plan import plan, prefix_kv_ranges
    from magi_jax.schedule import distill_dt

    cfg = run_config(fx, run)
    lay = layout(cfg, run["prefix_latent_frames"])
    calls = run["forward_dispatcher_calls"]
    if lay.clean_chunks:  # the prefix-encoding call comes first
        first = calls[0]
        assert first["kwargs"]["extract_prefix_video_feature"]
        assert first["kwargs"]["denoising_range_num"] == lay.clean_chunks
        np.testing.assert_array_equal(prefix_kv_ranges(cfg, lay), first["kv_range"])
        calls = calls[1:]
    steps = [
        jax.tree.map(lambda a, i=i: a[i], g.steps) for s in plan(cfg, lay) for g in s.groups for i in range(g.count)
    ]
    assert len(steps) == len(calls)
    for step, rec in zip(steps, calls):
        kw, call = rec["kwargs"], step.call
        assert call.window.chunks == kw["denoising_range_num"]
        assert call.window.extra_clean_chunk == kw["fwd_extra_1st_chunk"]
        assert int(call.first_chunk) == kw["slice_point"]
        assert bool(step.near_clean) == kw.get("distill_nearly_clean_chunk", False)
        np.testing.assert_array_equal(call.t, np.float32(rec["timestep"]))
        np.testing.assert_array_equal(call.kv_range, rec["kv_range"])
        if cfg.engine.distill:
            assert call.distill_dt == distill_dt(kw["num_steps"], kwarg_interval(kw))
