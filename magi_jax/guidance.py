"""Guidance around the DiT forward: upstream's `forward_dispatcher`, one call per sampler step.

A call sees a window of R chunks (x, one flow time per chunk, one caption + one null
caption per chunk, each chunk's key range) and returns the velocity of its denoising
chunks, with the frames it does not denoise passed through.

Base models (cfg_number 3) run three passes and mix them per chunk with the scales of the
chunk's t range:  (1 - p) * uncond + (p - s) * cond_pre + s * cond
  cond     caption, attends to previous chunks (cache) - reads the cache
  cond_pre null caption, attends to previous chunks    - reads and WRITES the cache
  uncond   null caption, every denoising chunk alone at rope frame 0, no cache
Distilled models (cfg_number 1) run one caption pass that writes the cache. When the
first denoising chunk is nearly clean, a copy of it is appended after the last chunk
(so it gets the rope frames after the window) attending only to itself, and its output is
blended in: prev_chunks_scale * with_context + (1 - prev_chunks_scale) * alone.

With `fwd_extra_1st_chunk` the first chunk is a just-cleaned chunk run again (at clean
time) only to refresh its cache rows. Cache writes happen only when a prefix is being
encoded, the extra chunk is present or earlier chunks exist (upstream's rule), and skip
the last chunk when the near-clean flag is set.

Static (compile-time) choices: R, fwd_extra_1st_chunk, and for distilled models whether
the near-clean copy is appended. Everything else (slice point, times, ranges, flags that
only change how many rows are written) is traced, so a sampler compiles once per window
shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.config import MagiConfig
from magi_jax.dit import DiT
from magi_jax.kv_cache import KVCache

f32 = jnp.float32


@dataclass(frozen=True)
class CallShape:
    """The static structure of a guided call."""

    chunks: int  # R: chunks in x, the extra clean chunk included
    fwd_extra_1st_chunk: bool
    near_clean_copy: bool  # distilled models: append the near-clean copy (ignored for cfg 3)
    cache_window: int | None = None  # cache rows visible below the window (None: all)


@dataclass(frozen=True)
class CallInputs:
    """Traced inputs of one call (single batch row; upstream's duplicate row is dropped)."""

    x: jax.Array  # (C, T, H, W)
    t: jax.Array  # (R,) flow time per chunk
    caption: jax.Array  # (2R, L, Cc): R caption rows, then R null-caption rows
    caption_mask: jax.Array  # (2R, L)
    kv_range: jax.Array  # (R, 2) int32
    slice_point: jax.Array  # () chunks before the window (in the cache)
    near_clean: jax.Array  # () bool, t of the first denoising chunk above the threshold
    extract_prefix: jax.Array  # () bool, this call encodes prefix-video chunks
    distill_dt: jax.Array | float | None = None


jax.tree_util.register_dataclass(
    CallInputs,
    data_fields=[
        "x",
        "t",
        "caption",
        "caption_mask",
        "kv_range",
        "slice_point",
        "near_clean",
        "extract_prefix",
        "distill_dt",
    ],
    meta_fields=[],
)


def _cfg_scales(t, config: MagiConfig):
    """(prev_chunk_scale, text_scale) for per-chunk times t, float32 lookup as upstream."""
    rt = config.runtime
    edges = jnp.asarray(np.asarray(rt.cfg_t_range, np.float32) - np.float32(1e-7))
    idx = jnp.searchsorted(edges, t.astype(f32), side="left") - 1
    idx = jnp.clip(idx, 0, len(rt.cfg_t_range) - 1)
    return jnp.asarray(rt.prev_chunk_scales, f32)[idx], jnp.asarray(rt.text_scales, f32)[idx]


def _chunk_geometry(model: DiT, x, chunks):
    cfg = model.cfg
    c, t, h, w = x.shape
    frames = t // chunks // cfg.t_patch_size  # token frames per chunk
    tokens = frames * (h // cfg.patch_size) * (w // cfg.patch_size)
    return t // chunks, frames, tokens


def guided_velocity(model: DiT, config: MagiConfig, shape: CallShape, inp: CallInputs, cache: KVCache):
    """Returns (out (C, T, H, W) float32, cache): passthrough frames, then velocities."""
    r = shape.chunks
    x = inp.x
    width, frames, tokens = _chunk_geometry(model, x, r)
    sp = jnp.asarray(inp.slice_point, jnp.int32)
    new_start = sp * tokens
    writes = inp.extract_prefix | shape.fwd_extra_1st_chunk | (sp > 0)
    window = dict(frame0=(sp + jnp.arange(r)) * frames, t_total=jnp.broadcast_to((sp + r) * frames, (r,)))
    common = dict(new_start=new_start, distill_dt=inp.distill_dt, cache_window=shape.cache_window)
    cap, null = (inp.caption[:r], inp.caption_mask[:r]), (inp.caption[r:], inp.caption_mask[r:])

    if config.runtime.cfg_number == 3:
        # cond (caption) and cond_pre (null caption, writes the cache) share one batched pass
        skip_last = jnp.where(inp.near_clean, tokens, 0)
        both, cache = model(
            x,
            inp.t,
            jnp.stack([cap[0], null[0]]),
            jnp.stack([cap[1], null[1]]),
            inp.kv_range,
            **window,
            cache=cache,
            read_cache=True,
            write_row=1,
            write_count=jnp.where(writes, r * tokens - skip_last, 0),
            drop_caption=(False, True),
            **common,
        )
        cond, cond_pre = both[0], both[1]
        d = r - int(shape.fwd_extra_1st_chunk)  # denoising chunks
        alone = jnp.stack([jnp.arange(d) * tokens, (jnp.arange(d) + 1) * tokens], axis=1)
        uncond, _ = model(
            x[:, (r - d) * width :],
            inp.t[r - d :],
            inp.caption[None, 2 * r - d :],
            inp.caption_mask[None, 2 * r - d :],
            alone,
            frame0=jnp.zeros((d,), jnp.int32),
            t_total=jnp.full((d,), frames, jnp.int32),
            distill_dt=inp.distill_dt,
            drop_caption=(True,),
        )
        uncond = uncond[0]
        p, s = _cfg_scales(inp.t[r - d :], config)
        per_chunk = lambda a: a.reshape(a.shape[0], d, width, *a.shape[2:])  # noqa: E731
        bc = lambda v: v[None, :, None, None, None]  # noqa: E731
        mixed = (
            bc(1 - p) * per_chunk(uncond)
            + bc(p - s) * per_chunk(cond_pre[:, (r - d) * width :])
            + bc(s) * per_chunk(cond[:, (r - d) * width :])
        )
        out = mixed.reshape(uncond.shape)
        return jnp.concatenate([x[:, : (r - d) * width].astype(f32), out], axis=1), cache

    # cfg_number 1: distilled / fp8 models
    first = int(shape.fwd_extra_1st_chunk)  # index of the first denoising chunk
    count = jnp.where(writes, r * tokens, 0)
    if shape.near_clean_copy:
        sl = slice(first * width, (first + 1) * width)
        kv_end = jnp.max(inp.kv_range)
        xx = jnp.concatenate([x, x[:, sl]], axis=1)
        tt = jnp.concatenate([inp.t, inp.t[first : first + 1]])
        yy = jnp.concatenate([inp.caption[:r], inp.caption[first : first + 1]])
        mm = jnp.concatenate([inp.caption_mask[:r], inp.caption_mask[first : first + 1]])
        kv = jnp.concatenate([inp.kv_range, jnp.stack([kv_end, kv_end + tokens])[None]])
        n = r + 1
        rope = dict(frame0=(sp + jnp.arange(n)) * frames, t_total=jnp.broadcast_to((sp + n) * frames, (n,)))
        out, cache = model(
            xx,
            tt,
            yy[None],
            mm[None],
            kv,
            **rope,
            cache=cache,
            read_cache=True,
            write_row=0,
            write_count=count,
            write_block=r * tokens,
            **common,
        )
        out = out[0]
        pcs = config.runtime.prev_chunks_scale
        blended = out[:, sl] * f32(pcs) + out[:, r * width :] * f32(1 - pcs)
        out = out[:, : r * width].at[:, sl].set(blended)
        denoise_width = width * (r + 1) - width * first  # upstream counts the copy here
    else:
        out, cache = model(
            x,
            inp.t,
            cap[0][None],
            cap[1][None],
            inp.kv_range,
            **window,
            cache=cache,
            read_cache=True,
            write_row=0,
            write_count=count,
            **common,
        )
        out = out[0]
        denoise_width = width * r - width * first
    keep = max(0, x.shape[1] - denoise_width)
    return jnp.concatenate([x[:, :keep].astype(f32), out[:, keep:]], axis=1), cache


def jit_guided(model: DiT, config: MagiConfig):
    """`f(shape, inputs, cache) -> (out, cache)`, compiled once per CallShape (and input shapes)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, inp, cache, shape_box):
        return guided_velocity(nnx.merge(graphdef, state), config, shape_box.shape, inp, cache)

    return lambda shape, inp, cache: run(state, inp, cache, _Static(shape))


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Static:
    shape: CallShape
