"""The DiT's learnable 3-D rotary embedding (time, height, width).

Each axis gets `rope_dim // 8` learned frequencies (`bands`), so the rotation covers the
first 2 * 3 * (rope_dim // 8) channels of a head; the rest pass through.

Positions, per token of a chunk:
  * time: the absolute latent-frame index (frames of cached chunks count), rescaled by
    x / (T_total - 1) * (T_total - 1) - an identity up to float32 rounding that upstream
    performs and we keep, because it moves values by an ulp;
  * height/width: centred `i - (n - 1) / 2`, then rescaled to a 256x256-pixel reference
    grid: x / (n - 1) * (ref - 1) with ref = n / sqrt(H * W / 256) (H, W the token grid),
    so resolution changes keep the same angular range.
Each chunk carries its own (first frame, T_total): the unconditional CFG pass runs every
chunk alone at frame 0, and the distill near-clean copy sits after the last chunk.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def _centred_axis(n: int, ref: float) -> np.ndarray:
    """Height or width positions in float32, in upstream's op order; `ref` = reference size."""
    x = np.arange(n).astype(np.float32) - np.float32((n - 1) / 2)
    if n != 1:
        x = x / np.float32(n - 1) * np.float32(ref - 1)
    return x.astype(np.float32)


def rope_tables(bands, frame0, t_total, frames: int, height: int, width: int):
    """sin, cos tables (S, 3*nb) for R chunks of `frames` x height x width tokens.

    bands: (nb,) learned frequencies; frame0, t_total: (R,) int per chunk.
    Layout along the last axis: [t bands | h bands | w bands], token order (chunk, t, h, w).
    """
    rescale = math.sqrt(height * width / (16 * 16))
    hy = _centred_axis(height, height / rescale)
    wx = _centred_axis(width, width / rescale)
    # time positions: (R, frames)
    t = (frame0[:, None] + jnp.arange(frames)[None, :]).astype(f32)
    tt = t_total[:, None]
    t = jnp.where(tt == 1, t, t / (tt - 1).astype(f32) * (tt - 1).astype(f32))
    r = t.shape[0]
    grid_t = jnp.broadcast_to(t[:, :, None, None], (r, frames, height, width))
    grid_h = jnp.broadcast_to(jnp.asarray(hy)[None, None, :, None], (r, frames, height, width))
    grid_w = jnp.broadcast_to(jnp.asarray(wx)[None, None, None, :], (r, frames, height, width))
    grid = jnp.stack([grid_t, grid_h, grid_w], axis=-1).reshape(-1, 3, 1)
    pos = (grid * bands.astype(f32)).reshape(grid.shape[0], -1)  # (S, 3*nb)
    return jnp.sin(pos), jnp.cos(pos)


def apply_rope(x, sin, cos):
    """Rotates the first 2*sin.shape[-1] channels of x (..., heads, D) in GPT-NeoX halves;
    sin, cos (..., 2*nb) per token."""
    half = sin.shape[-1]
    x = x.astype(f32)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    s, c = sin[..., None, :], cos[..., None, :]
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c, rest], axis=-1)
