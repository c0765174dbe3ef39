"""Loading `dit` fixtures: config, converted weights and the recorded call arguments."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import parity

from magi_jax.config import from_dict
from magi_jax.dit_weights import build_dit, convert_dit
from magi_jax.forward_call import Captions, Window
from magi_jax.guidance import ChunkGeometry, DispatchStep, plan_call
from magi_jax.kv_cache import KVCache
from magi_jax.sampler_plan import kv_span
from magi_jax.schedule import distill_dt


def config_of(fx, env: dict | None = None):
    return from_dict(fx.meta["config"], fx.name).apply_env(env or {})


@functools.cache
def model_of(fx):
    """The fixture's DiT, weights moved by the real converter (once per fixture)."""
    cfg = config_of(fx)
    return build_dit(cfg, convert_dit(fx.weights, cfg))


def _as(arr, dtype_name):
    if dtype_name == "bfloat16":
        return arr.astype(ml_dtypes.bfloat16)
    return arr.astype(np.dtype(dtype_name))


def kwarg_interval(kwargs):
    iv = kwargs.get("distill_interval")
    if isinstance(iv, dict):
        return np.array(iv["tensor"], dtype=np.dtype(iv["dtype"]))
    return iv


def call_inputs(fx, call):
    """(config, (x, captions, forward call), KVCache, arrays) replaying one recorded
    forward_dispatcher call: `jit_guided(model, config)(*args, cache)` runs it."""
    a = {k.split("/", 2)[2]: fx.arrays[k] for k in fx.arrays.files if k.startswith(f"calls/{call['name']}/")}
    kw = call["kwargs"]
    dt = call["arg_dtypes"]
    cfg = config_of(fx, call.get("env"))
    r = kw["denoising_range_num"]
    x = _as(a["x"][0], dt["x"])
    m = cfg.model
    frames = x.shape[1] // r // m.t_patch_size
    chunk = ChunkGeometry(frames, frames * (x.shape[2] // m.patch_size) * (x.shape[3] // m.patch_size))
    window = Window(
        chunks=r,
        extra_clean_chunk=kw["fwd_extra_1st_chunk"],
        near_clean_copy=cfg.runtime.cfg_number == 1 and kw.get("distill_nearly_clean_chunk", False),
        kv_span=kv_span(cfg, chunk.tokens),  # as the sampler plans it: each chunk reads its span's slice
    )
    step = DispatchStep(
        first_chunk=kw["slice_point"],
        t=_as(a["timestep"][0], dt["timestep"]),
        kv_range=a["kv_range"].astype(np.int32),
        near_clean=kw.get("distill_nearly_clean_chunk", False),
        encodes_prefix=kw.get("extract_prefix_video_feature", False),
        distill_dt=distill_dt(kw["num_steps"], kwarg_interval(kw)) if cfg.engine.distill else None,
    )
    # upstream's (2R, L, Cc): R caption rows, then R null-caption rows
    y, mask = _as(a["y"][:, 0], dt["y"]), _as(a["mask"][:, 0], dt["mask"])
    captions = Captions(y.reshape(2, r, *y.shape[1:]), mask.reshape(2, r, *mask.shape[1:]))
    args = (x, captions, plan_call(cfg, window, step, chunk))
    rows = call["max_sequence_length"] * call["max_batch_size"]
    # a call that never touched the cache recorded an empty one: size it from the model
    m = cfg.model
    layers = call["num_cache_layers"] or m.num_layers
    g = call["kv_cache_groups"] or m.num_query_groups
    width = call["kv_cache_width"] or 2 * m.kv_channels
    dtype = ml_dtypes.bfloat16 if call["kv_cache_dtype"] == "bfloat16" else np.dtype(call["kv_cache_dtype"])
    k = np.full((layers, rows, g, width // 2), np.nan, np.float32)
    v = k.copy()
    n = call["kv_read_rows"]
    if n:
        before = a["kv_cache_before"]
        k[:, :n], v[:, :n] = before[..., : width // 2], before[..., width // 2 :]
    cache = KVCache(k.astype(dtype), v.astype(dtype))
    return cfg, args, cache, a


def check_call(fx, call, out, cache, ref):
    """Hold one replayed call to the fixture: the velocity, the cache rows it wrote (each at
    its per-array tolerance), and no row written past `kv_write_end` (those keep their NaN).
    Raises AssertionError naming the first array out of tolerance."""
    tol = fx.meta["tolerance"]
    key = f"calls/{call['name']}"
    parity.check_array(out, ref["out"][0], tol[f"{key}/out"], f"{fx.id}/{call['name']} out")
    lo, hi = call["kv_read_rows"], call["kv_write_end"]
    k, v = np.asarray(cache.k.astype(np.float32)), np.asarray(cache.v.astype(np.float32))
    if hi > lo:
        written = np.concatenate([k[:, lo:hi], v[:, lo:hi]], axis=-1)
        what = f"{fx.id}/{call['name']} kv_cache_written"
        parity.check_array(written, ref["kv_cache_written"], tol[f"{key}/kv_cache_written"], what)
    assert np.isnan(k[:, hi:]).all() and np.isnan(v[:, hi:]).all(), "cache rows written past kv_write_end"
