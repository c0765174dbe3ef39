"""Guidance around the DiT forward: upstream's `forward_dispatcher`, one call per sampler step.

A guided call sees a window of R chunks (x, one flow time per chunk, the caption and the
null caption of each chunk, each chunk's key range) and returns the velocity of its
denoising chunks, with the frames it does not denoise passed through.

Base models (cfg_number 3, `three_way_cfg`) mix three passes per chunk with the scales of
the chunk's t range:  (1 - p) * uncond + (p - s) * cond_pre + s * cond
  cond     caption, attends to previous chunks (cache) - reads the cache
  cond_pre null caption, attends to previous chunks    - reads and WRITES the cache
  uncond   null caption, every denoising chunk alone at rope frame 0, no cache
cond and cond_pre are two guidance rows of one batched DiT pass.
Distilled models (cfg_number 1, `distilled`) run one caption pass that writes the cache.
When the first denoising chunk is nearly clean, a copy of it is appended after the last
chunk (so it gets the rope frames after the window) attending only to itself, and its
output is blended in: prev_chunks_scale * with_context + (1 - prev_chunks_scale) * alone.

The cache-write contract lives in `plan_call`: writes happen only when a prefix is being
encoded, the extra clean chunk is present or earlier chunks exist (upstream's rule), and
skip the last chunk under 3-way guidance when the near-clean flag is set. Those counts are
traced, so a sampler compiles once per `Window`.

Shapes: C latent channels, T latent frames of the window, H x W latent size, R chunks,
D denoising chunks, L caption tokens, Cc caption channels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax import schedule
from magi_jax.attention import used_caption_tokens
from magi_jax.config import MagiConfig
from magi_jax.dit import DiT
from magi_jax.forward_call import CAPTION_ROW, NULL_ROW, Captions, ForwardCall, Rows, Window
from magi_jax.kv_cache import KVCache, plan_slots

f32 = jnp.float32


@dataclass(frozen=True)
class ChunkGeometry:
    """Token frames and tokens of one chunk, and the chunks the run's KV cache ring holds
    (static for a run; ring_chunks None: calls carry no cache slots, the cache is read by
    position)."""

    frames: int
    tokens: int
    ring_chunks: int | None = None


@dataclass(frozen=True)
class DispatchStep:
    """One step as upstream's dispatcher is called (host values): the input of `plan_call`."""

    first_chunk: int  # upstream's slice_point: chunks before the window (in the cache)
    t: np.ndarray  # (R,) flow time per chunk
    kv_range: np.ndarray  # (R, 2) int32
    near_clean: bool = False  # t of the first denoising chunk above the distill threshold
    encodes_prefix: bool = False  # this call writes clean prefix-video chunks to the cache
    distill_dt: float | None = None


def plan_call(config: MagiConfig, window: Window, step: DispatchStep, chunk: ChunkGeometry) -> ForwardCall:
    """The ForwardCall of one guided step (host numpy), the cache-write contract included."""
    r, sp = window.chunks, int(step.first_chunk)
    writes = step.encodes_prefix or window.extra_clean_chunk or sp > 0
    count = r * chunk.tokens if writes else 0
    t = np.asarray(step.t, np.float32)
    if config.runtime.cfg_number == 3:
        if writes and step.near_clean:
            count -= chunk.tokens  # upstream leaves the last chunk's rows to the next call
        rows = Rows(drop_caption=(False, True), read_cache=True, write_row=1)
    else:
        rows = Rows(drop_caption=(False,), read_cache=True, write_row=0)
    slots = None
    if chunk.ring_chunks is not None:
        seen = window.cache_window or chunk.ring_chunks * chunk.tokens
        if seen % chunk.tokens:
            raise ValueError(f"cache window of {seen} rows is not a whole number of {chunk.tokens}-token chunks")
        slots = plan_slots(sp, r, min(seen // chunk.tokens, chunk.ring_chunks), chunk.ring_chunks, chunk.tokens)
    return ForwardCall(
        t=t,
        kv_range=np.asarray(step.kv_range, np.int32),
        frame0=((sp + np.arange(r)) * chunk.frames).astype(np.int32),
        t_total=np.full((r,), (sp + r) * chunk.frames, np.int32),
        first_chunk=np.int32(sp),
        write_count=np.int32(count),
        distill_dt=None if step.distill_dt is None else np.float32(step.distill_dt),
        cfg_scales=np.stack(schedule.cfg_scales(t[r - window.denoising :], config.runtime))
        if config.runtime.cfg_number == 3
        else None,
        cache_slots=slots,
        window=window,
        rows=rows,
    )


def _geometry(model: DiT, x, chunks: int) -> tuple[int, ChunkGeometry]:
    """(latent frames per chunk, token geometry) of a window x (C, T, H, W) of `chunks` chunks."""
    cfg = model.cfg
    _, t, h, w = x.shape
    frames = t // chunks // cfg.t_patch_size
    return t // chunks, ChunkGeometry(frames, frames * (h // cfg.patch_size) * (w // cfg.patch_size))


def three_way_cfg(model: DiT, x, captions: Captions, call: ForwardCall, cache: KVCache):
    """Base models: cond + cond_pre (one batched pass over the window, the cache pass) and
    uncond (the denoising chunks alone), mixed per chunk. Returns (out (C, T, H, W), cache)."""
    r, d = call.chunks, call.window.denoising
    width, chunk = _geometry(model, x, r)
    with jax.named_scope("cond_rows"):
        both, cache = model(x, captions, call, cache)
    with jax.named_scope("uncond_row"):
        alone = ForwardCall(
            t=call.t[r - d :],
            kv_range=jnp.stack([jnp.arange(d) * chunk.tokens, (jnp.arange(d) + 1) * chunk.tokens], axis=1),
            frame0=jnp.zeros((d,), jnp.int32),
            t_total=jnp.full((d,), chunk.frames, jnp.int32),
            first_chunk=jnp.int32(0),
            write_count=jnp.int32(0),
            distill_dt=call.distill_dt,
            window=dataclasses.replace(call.window, kv_span=chunk.tokens),  # each chunk sees itself only
            rows=Rows(drop_caption=(True,)),
        )
        uncond, _ = model(x[:, (r - d) * width :], captions.row(NULL_ROW).chunks(r - d), alone, None)
    with jax.named_scope("cfg_mix"):
        p, s = call.cfg_scales[0], call.cfg_scales[1]
        per_chunk = lambda a: a.reshape(a.shape[0], d, width, *a.shape[2:])  # noqa: E731
        bc = lambda v: v[None, :, None, None, None]  # noqa: E731
        cond, cond_pre, uncond = both[0, :, (r - d) * width :], both[1, :, (r - d) * width :], uncond[0]
        mixed = bc(1 - p) * per_chunk(uncond) + bc(p - s) * per_chunk(cond_pre) + bc(s) * per_chunk(cond)
        out = mixed.reshape(uncond.shape)
    return jnp.concatenate([x[:, : (r - d) * width].astype(f32), out], axis=1), cache


def distilled(model: DiT, x, captions: Captions, call: ForwardCall, cache: KVCache, prev_chunks_scale: float):
    """Distilled models: one caption pass that writes the cache, with the near-clean copy
    blended in when `call.window.near_clean_copy`. Returns (out (C, T, H, W), cache)."""
    r = call.chunks
    first = int(call.window.extra_clean_chunk)  # index of the first denoising chunk
    width, chunk = _geometry(model, x, r)
    captions = captions.row(CAPTION_ROW)
    if not call.window.near_clean_copy:
        with jax.named_scope("caption_row"):
            out, cache = model(x, captions, call, cache)
        out, denoise_width = out[0], width * (r - first)
    else:
        with jax.named_scope("caption_row_near_clean_copy"):
            sl = slice(first * width, (first + 1) * width)
            kv_end = jnp.max(call.kv_range)
            extended = call.replace(
                t=jnp.concatenate([call.t, call.t[first : first + 1]]),
                kv_range=jnp.concatenate([call.kv_range, jnp.stack([kv_end, kv_end + chunk.tokens])[None]]),
                frame0=jnp.concatenate([call.frame0, call.frame0[-1:] + chunk.frames]),
                t_total=jnp.broadcast_to(call.t_total[0] + chunk.frames, (r + 1,)),
                rows=dataclasses.replace(call.rows, write_bound=r * chunk.tokens),  # the copy is never cached
            )
            xx = jnp.concatenate([x, x[:, sl]], axis=1)
            out, cache = model(xx, captions.concat(captions.chunks(first, first + 1)), extended, cache)
            out = out[0]
            blended = out[:, sl] * f32(prev_chunks_scale) + out[:, r * width :] * f32(1 - prev_chunks_scale)
            out = out[:, : r * width].at[:, sl].set(blended)
        denoise_width = width * (r + 1) - width * first  # upstream counts the copy here
    keep = max(0, x.shape[1] - denoise_width)
    return jnp.concatenate([x[:, :keep].astype(f32), out[:, keep:]], axis=1), cache


def guided_velocity(model: DiT, config: MagiConfig, x, captions: Captions, call: ForwardCall, cache: KVCache):
    """x (C, T, H, W), captions (2, R, L, Cc) caption / null rows -> (out (C, T, H, W) float32,
    cache): passthrough frames, then velocities of the denoising chunks."""
    if config.runtime.cfg_number == 3:
        return three_way_cfg(model, x, captions, call, cache)
    return distilled(model, x, captions, call, cache, config.runtime.prev_chunks_scale)


def jit_guided(model: DiT, config: MagiConfig):
    """`f(x, captions, call, cache) -> (out, cache)`: a jitted guided forward, compiled once per
    `call.window` / `call.rows` and input shapes (they are part of the call's pytree). The
    caption padding no chunk reads is cut off on the host first (attention.used_caption_tokens;
    concrete masks only), so neither the caption projection nor the caption keys are computed
    over it."""
    from flax import nnx

    from magi_jax.compile_cache import program_options

    graphdef, state = nnx.split(model)

    def forward(state, x, captions, call, cache):
        return guided_velocity(nnx.merge(graphdef, state), config, x, captions, call, cache)

    run = jax.jit(forward, compiler_options=program_options(state))  # the parameters decide them

    def call_guided(x, captions: Captions, call: ForwardCall, cache: KVCache):
        if not isinstance(captions.mask, jax.core.Tracer):  # concrete masks (not inside an outer jit)
            captions = captions.leading(used_caption_tokens(captions.mask))
        return run(state, x, captions, call, cache)

    return call_guided
