"""MAGI-1's training objective: chunk-wise flow matching, block-causal, one forward per clip.

Conventions (from the inference code, which the technical report leaves implicit):
  * flow time t per chunk, t = 0 pure noise, t = 1 clean (upstream's `init_t` and the
    sampler, which walk t from 0 up to 1);
  * x_t = t * x1 + (1 - t) * x0 for clean latents x1 and Gaussian noise x0, and the model
    predicts the velocity v = dx_t/dt = x1 - x0: the sampler's Euler step is
    x <- x + v * (t_next - t) (`sampler.advance`, upstream's `integrate`);
  * times are drawn as u ~ U(0, 1) and warped with the sampler's own schedule (upstream's
    "sd3" transform of u^2 with shift 3, `warp_time`), so training sees noise levels with the
    density the sampler visits them; optionally (`window_prob`) a clip's times are a moment
    of the sampler's window instead (`sampler_window_times`).

A training clip of R chunks runs through the DiT once: every chunk gets its own time, the
times decrease (noise increases) monotonically from the first chunk to the last, as in the
sampler's window where older chunks are further along; the attention is block-causal over
the clip (chunk c sees chunks 0..c, `block_causal_ranges`) - the mask the KV-cached sampler
realises chunk by chunk. Optionally the first k chunks are clean context (the I2V / V2V
prefix and the sampler's cached chunks): they sit at `clean_t` with x = x1 exactly, and are
left out of the loss.

Captions: each chunk has its own caption; with probability `caption_dropout` a clip's
caption is replaced by the model's learned null caption with the null-caption mask (its
first 50 tokens) and the dropped-caption AdaLN token, exactly what the unconditional
guidance pass feeds at inference, so classifier-free guidance has a trained null branch.

Shortcut distillation (distilled models): the DiT also reads a step-size embedding; upstream
feeds `t_embedder(e)` with e = num_steps / 2 (for the 12-step shortcut schedule, e = 8 for a
16-step-sized step and 4 for an 8-step-sized one). A step "of n steps" advances u by 1/n.
Training cycles the step counts `shortcut_steps` (the report's 64, 32, 16, 8): the finest
(64) learns the flow-matching velocity; a coarser count n learns, by self-consistency, the
average velocity of two steps at 2n taken by the model itself, with stop-gradient:
    v_n(x_u) := (v_2n(x_u) * d1 + v_2n(x') * d2) / (d1 + d2),  x' = x_u + v_2n(x_u) * d1,
with d1 = T(u + 1/2n) - T(u), d2 = T(u + 1/n) - T(u + 1/2n) in the warped time T, so one
step of size 1/n lands where two steps of 1/2n land (the sampler integrates in warped time).

Shapes: C latent channels, T latent frames (R chunks of W frames), h x w latent size,
L caption tokens, Cc caption channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.config import MagiConfig
from magi_jax.forward_call import Captions, ForwardCall, Window
from magi_jax.special_tokens import NULL_CAPTION_TOKENS

f32 = jnp.float32
NULL_CAPTION_PATH = ("y_embedder", "null_caption")


@dataclass(frozen=True)
class ObjectiveConfig:
    """How clips are noised and scored (static: part of the compiled step)."""

    shift: float = 3.0  # the sd3 warp of the sampler's schedule
    clean_context_prob: float = 0.3  # chance a clip starts with k >= 1 clean context chunks
    # chance a clip's times are a moment of the sampler's window instead (sampler_window_times)
    window_prob: float = 0.0
    window: int = 4  # the sampler's window_size, for window_prob
    caption_dropout: float = 0.1
    kv_span: int | None = None  # chunks a chunk attends to (itself included); None: all earlier
    shortcut: bool = False  # shortcut-distillation loss (distilled models)
    shortcut_steps: tuple = (64, 32, 16, 8)


def warp_time(u, shift: float = 3.0):
    """The sampler's time warp (schedule.init_t, "sd3"): u in [0, 1] -> t in [0, 1]."""
    inv = 1.0 / shift
    u2 = u * u
    return inv * u2 / (1.0 + (inv - 1.0) * u2)


def block_causal_ranges(chunks: int, tokens: int, span: int | None = None) -> np.ndarray:
    """(R, 2) int32 key ranges [start, end) in tokens: chunk c sees chunks max(0, c+1-span)..c."""
    ends = np.arange(1, chunks + 1)
    starts = np.zeros_like(ends) if span is None else np.maximum(ends - span, 0)
    return (np.stack([starts, ends], 1) * tokens).astype(np.int32)


def sample_chunk_times(key, chunks: int, ocfg: ObjectiveConfig, clean_t: float):
    """Per-chunk (u, t, clean): u decreasing from chunk 0 to R-1 (noise increases with time),
    t = warp(u), and the leading `clean` chunks at clean_t. With probability window_prob the
    times are instead a moment of the sampler's window (sampler_window_times)."""
    ku, kc, kk, kw, kp = jax.random.split(key, 5)
    u = -jnp.sort(-jax.random.uniform(ku, (chunks,), f32))
    k = jnp.where(
        jax.random.bernoulli(kc, ocfg.clean_context_prob) & (chunks > 1),
        jax.random.randint(kk, (), 1, max(chunks, 2)),
        0,
    )
    clean = jnp.arange(chunks) < k
    u = jnp.where(clean, 1.0, u)
    if ocfg.window_prob > 0:
        wu, wclean = sampler_window_times(kp, chunks, ocfg.window)
        use = jax.random.bernoulli(kw, ocfg.window_prob)
        u, clean = jnp.where(use, wu, u), jnp.where(use, wclean, clean)
    t = jnp.where(clean, f32(clean_t), warp_time(u, ocfg.shift))
    return u, t, clean


def sampler_window_times(key, chunks: int, window: int):
    """(u, clean) of a moment the chunk-pipelined sampler passes through: the chunks in its
    window are staggered by 1/window in u (a chunk enters at u = 0 when the one before it is
    1/window along, and leaves clean after `window` stages), earlier chunks are clean (in the
    KV cache), later ones have not started (u = 0). A moment is the newest chunk's index
    (from 0, the video's first chunk alone in the window, to the last) and the phase within
    the stage. Sorted uniform times almost never put the first chunks near pure noise, which
    is where every generation starts."""
    kn, kph = jax.random.split(key)
    newest = jax.random.randint(kn, (), 0, chunks)
    phase = jax.random.uniform(kph, (), f32)
    age = (newest - jnp.arange(chunks)).astype(f32) + phase  # stages since the chunk entered
    u = jnp.clip(age / window, 0.0, 1.0)
    clean = age >= window
    return jnp.where(clean, 1.0, u), clean


def per_frame(v, width: int):
    """(R,) per chunk -> (1, R*W, 1, 1), to broadcast over (C, T, h, w)."""
    return jnp.repeat(v, width)[None, :, None, None]


def drop_caption(params: nnx.State, caption, mask, drop):
    """Caption dropout without a retrace: a dropped clip reads the learned null caption (with
    the null mask) for cross-attention, and its AdaLN token becomes the dropped-caption one.

    The DiT takes the AdaLN row as a static choice (row -2 kept, row -1 dropped); here row -2
    of the null caption is replaced by row -1 for a dropped clip, in the parameters handed to
    this clip's forward, so gradients still reach the right row. Returns (params, caption, mask).
    """
    flat = dict(nnx.to_flat_state(params))
    var = flat[NULL_CAPTION_PATH]
    null = var.get_value()
    kept_row = jnp.where(drop, null[-1], null[-2])
    flat[NULL_CAPTION_PATH] = var.replace(value=null.at[-2].set(kept_row))
    params = nnx.from_flat_state(list(flat.items()))
    null_mask = (jnp.arange(mask.shape[-1]) < NULL_CAPTION_TOKENS).astype(mask.dtype)
    caption = jnp.where(drop, null.astype(caption.dtype)[None], caption)
    mask = jnp.where(drop, null_mask[None], mask)
    return params, caption, mask


def null_caption_of(*states):
    for st in states:
        flat = dict(nnx.to_flat_state(st))
        if NULL_CAPTION_PATH in flat:
            return st, flat[NULL_CAPTION_PATH].get_value()
    raise KeyError("the model has no y_embedder.null_caption")


def clip_call(t, frames: int, tokens: int, span: int | None = None, distill_dt=None) -> ForwardCall:
    """The forward call of a whole clip: R chunks of `frames` token frames (`tokens` tokens)
    each, block-causal key ranges (at most `span` chunks back), rope positions of a sampler
    window that starts at the video's first chunk, no KV cache."""
    r = t.shape[0]
    return ForwardCall(
        t=t,
        kv_range=jnp.asarray(block_causal_ranges(r, tokens, span)),
        frame0=jnp.arange(r, dtype=jnp.int32) * frames,
        t_total=jnp.full((r,), r * frames, jnp.int32),
        first_chunk=jnp.int32(0),
        write_count=jnp.int32(0),
        distill_dt=distill_dt,
        window=Window(r, kv_span=None if span is None else min(span, r) * tokens),
    )


def clip_velocity(model, config: MagiConfig, x, t, caption, mask, span: int | None, distill_e=None):
    """The training forward: one block-causal DiT pass over a whole clip (no KV cache).

    x (C, T, h, w) noisy latents, t (R,) per-chunk flow times, caption (R, L, Cc) and mask
    (R, L) per chunk, distill_e the step-size embedding value (distilled models).
    -> velocity (C, T, h, w) float32.
    """
    m = config.model
    r = t.shape[0]
    c, frames_all, h, w = x.shape
    frames = frames_all // r // m.t_patch_size
    tokens = frames * (h // m.patch_size) * (w // m.patch_size)
    call = clip_call(t, frames, tokens, span, distill_e)
    out, _ = model(x, Captions(caption[None], mask[None]), call)
    return out[0]


@dataclass(frozen=True)
class Clip:
    """One training example (a pytree; a batch stacks these on a leading axis)."""

    latents: jax.Array  # (C, T, h, w) clean latents x1
    caption: jax.Array  # (R, L, Cc)
    caption_mask: jax.Array  # (R, L)


jax.tree_util.register_dataclass(Clip, data_fields=["latents", "caption", "caption_mask"], meta_fields=[])


def clip_loss(graphdef, trainable, frozen, config: MagiConfig, ocfg: ObjectiveConfig, clip: Clip, key, steps_n):
    """Mean squared velocity error over the noisy chunks of one clip; returns (loss, aux).

    `steps_n` (traced scalar) is the shortcut step count of this training step (ignored
    without shortcut training)."""
    width = config.runtime.chunk_width
    x1 = clip.latents.astype(f32)
    r = x1.shape[1] // width
    kt, kn, kd = jax.random.split(key, 3)
    u, t, clean = sample_chunk_times(kt, r, ocfg, config.runtime.clean_t)
    x0 = jax.random.normal(kn, x1.shape, f32)
    xt = jnp.where(per_frame(clean, width), x1, per_frame(t, width) * x1 + (1 - per_frame(t, width)) * x0)
    drop = jax.random.bernoulli(kd, ocfg.caption_dropout)

    holder, _ = null_caption_of(trainable, frozen)
    dropped, caption, mask = drop_caption(holder, clip.caption, clip.caption_mask, drop)
    if holder is trainable:
        trainable = dropped
    else:
        frozen = dropped
    model = nnx.merge(graphdef, trainable, frozen)  # latents stay float32, as the sampler feeds them

    if not ocfg.shortcut:
        target = x1 - x0
        pred = clip_velocity(model, config, xt, t, caption, mask, ocfg.kv_span)
    else:
        finest = max(ocfg.shortcut_steps)
        n = jnp.asarray(steps_n, f32)
        teacher = nnx.merge(graphdef, jax.lax.stop_gradient(trainable), jax.lax.stop_gradient(frozen))

        def self_consistent():
            half = 1.0 / (2 * n)
            u2, u3 = jnp.minimum(u + half, 1.0), jnp.minimum(u + 2 * half, 1.0)
            t2, t3 = warp_time(u2, ocfg.shift), warp_time(u3, ocfg.shift)
            t1 = warp_time(u, ocfg.shift)
            d1 = jnp.where(clean, 0.0, t2 - t1)
            d2 = jnp.where(clean, 0.0, t3 - t2)
            v1 = clip_velocity(teacher, config, xt, t, caption, mask, ocfg.kv_span, n)
            x_mid = xt + v1 * per_frame(d1, width)
            t_mid = jnp.where(clean, t, t2)
            v2 = clip_velocity(teacher, config, x_mid, t_mid, caption, mask, ocfg.kv_span, n)
            total = jnp.where(d1 + d2 > 0, d1 + d2, 1.0)
            return (v1 * per_frame(d1 / total, width) + v2 * per_frame(d2 / total, width)).astype(f32)

        target = jax.lax.cond(n >= finest, lambda: (x1 - x0).astype(f32), self_consistent)
        target = jax.lax.stop_gradient(target)
        pred = clip_velocity(model, config, xt, t, caption, mask, ocfg.kv_span, n / 2)

    weight = per_frame(~clean, width).astype(f32)
    err = jnp.square(pred.astype(f32) - target) * weight
    count = jnp.sum(weight) * x1.shape[0] * x1.shape[2] * x1.shape[3]
    loss = jnp.sum(err) / jnp.maximum(count, 1.0)
    return loss, {"dropped": drop.astype(f32), "clean_chunks": jnp.sum(clean).astype(f32)}
