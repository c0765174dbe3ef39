"""Loading `dit` fixtures: config, converted weights and the recorded call arguments."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from magi_jax.config import from_dict
from magi_jax.dit_weights import build_dit, convert_dit
from magi_jax.guidance import CallInputs, CallShape
from magi_jax.kv_cache import KVCache
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
    """(CallShape, CallInputs, KVCache, arrays) replaying one recorded forward_dispatcher call."""
    a = {k.split("/", 2)[2]: fx.arrays[k] for k in fx.arrays.files if k.startswith(f"calls/{call['name']}/")}
    kw = call["kwargs"]
    dt = call["arg_dtypes"]
    cfg = config_of(fx, call.get("env"))
    r = kw["denoising_range_num"]
    interval = kwarg_interval(kw)
    shape = CallShape(
        chunks=r,
        fwd_extra_1st_chunk=kw["fwd_extra_1st_chunk"],
        near_clean_copy=cfg.runtime.cfg_number == 1 and kw.get("distill_nearly_clean_chunk", False),
    )
    inp = CallInputs(
        x=_as(a["x"][0], dt["x"]),
        t=_as(a["timestep"][0], dt["timestep"]),
        caption=_as(a["y"][:, 0], dt["y"]),
        caption_mask=_as(a["mask"][:, 0], dt["mask"]),
        kv_range=a["kv_range"].astype(np.int32),
        slice_point=np.int32(kw["slice_point"]),
        near_clean=np.bool_(kw.get("distill_nearly_clean_chunk", False)),
        extract_prefix=np.bool_(kw.get("extract_prefix_video_feature", False)),
        distill_dt=distill_dt(kw["num_steps"], interval) if cfg.engine.distill else None,
    )
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
    return cfg, shape, inp, cache, a
