"""Whole upstream sampler runs (kind `dit`, `runs[]`) replay end to end.

Each run feeds the recorded noise, processed captions and prefix latents to our sampler and
compares every yielded clean chunk with upstream's, at the fixture's tolerance.
"""

import jax
import ml_dtypes
import numpy as np
import parity
import pytest
from dit_fixtures import config_of, model_of

from magi_jax.sampler import Sampler, layout


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

    sampler = Sampler(model_of(fx), cfg)
    chunks = list(sampler.chunks(a["y"], a["emb_masks_processed"], prefix=prefix, noise=a["noise"][0]))
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


@pytest.mark.parametrize("fx,run", parity.cases("dit", _runs))
def test_run_plan_matches_recorded_calls(fx, run):
    """Every model call upstream made in the run, in order: window, times, key ranges, flags."""
    from dit_fixtures import kwarg_interval

    from magi_jax.sampler import plan, prefix_kv_ranges
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
