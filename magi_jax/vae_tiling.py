"""The VAE's pixel pipeline: input checks, pixel mapping, tiled encode and decode.

Upstream encodes a prefix video and decodes every generated chunk in overlapping tiles
(256x256 pixels, fps/2 frames, spatial overlap 0.25, no temporal overlap by default), so a
720p chunk never needs more than one tile's activations. This module reproduces that
exactly, including its rounding: encode on the host (numpy) around a per-tile device call,
decode as one traced program per chunk (`decode_tiles_traced`, jitted in vae_runtime.py):

  * tiles start every `stride` units and span `size` units (the last ones are shorter);
    a tile's output is blended with the previous tile along t, then h, then w over
    `blend` output units with linear weights (1 - k/e, k/e), and its first `keep` output
    units are kept; the kept parts are concatenated.
  * encode blends in place, eagerly in the latents' dtype (each product and the sum
    rounded), so a tile blends against neighbours that were already blended;
  * decode blends against the neighbours' raw outputs, in float32 with one rounding
    (upstream compiles its blend).

Because kept sizes are fixed per tile while the last tiles are shorter, the output can be
larger than the input's latent grid (upstream's quirk, kept): e.g. 80 px wide with 48 px
tiles encodes to 11 latent columns, not 10. Tiles that do not fill a patch are cropped
like a strided Conv3d.

Pixel mapping: uint8 -> x / 127.5 - 1 rounded to bfloat16 (upstream always rounds the
input to bfloat16); model output -> uint8 by truncating clamp(x * 127.5 + 127.5, 0, 255),
each step rounded to the output's dtype.

Layouts: video (T, H, W, 3) uint8 as decoded by ffmpeg; model tensors (B, C, T, H, W).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

SCALE_FACTOR = 0.18215  # runtime_config.scale_factor of every released config
f32 = np.float32
bf16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes in pixels / frames and overlap fractions (upstream's pipeline at 24 fps)."""

    sample_height: int = 256
    sample_width: int = 256
    sample_length: int = 12
    spatial_overlap: float = 0.25
    temporal_overlap: float = 0.0

    def __post_init__(self):
        if min(self.sample_height, self.sample_width, self.sample_length) <= 0:
            raise ValueError(f"tile sizes must be positive: {self}")
        if not (0 <= self.spatial_overlap < 1 and 0 <= self.temporal_overlap < 1):
            raise ValueError(f"tile overlaps must be in [0, 1): {self}")

    @classmethod
    def for_fps(cls, fps: int, **kw) -> TileConfig:
        """Upstream's pipeline tiles: fps // 2 frames per tile for encode and decode."""
        return cls(sample_length=fps // 2, **kw)

    @classmethod
    def from_upstream(cls, d: dict) -> TileConfig:
        """From upstream's keyword names (tile_sample_min_height, ..., *_tile_overlap_factor)."""
        return cls(
            sample_height=int(d["tile_sample_min_height"]),
            sample_width=int(d["tile_sample_min_width"]),
            sample_length=int(d["tile_sample_min_length"]),
            spatial_overlap=float(d.get("spatial_tile_overlap_factor", 0.25)),
            temporal_overlap=float(d.get("temporal_tile_overlap_factor", 0.0)),
        )


# --------------------------------------------------------------------------------------
# Input checks and pixel mapping
# --------------------------------------------------------------------------------------


def _nearest(n: int, valid) -> str:
    """The valid value(s) closest to n, e.g. '248 or 256'."""
    best = min(abs(v - n) for v in valid)
    return " or ".join(str(v) for v in sorted(set(valid)) if abs(v - n) == best)


def check_video(video, patch: int, patch_length: int) -> np.ndarray:
    """Rejects, before any device work, what the VAE cannot encode (names the fix)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video (T, H, W, 3), got shape {video.shape}")
    if video.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {video.dtype}")
    t, h, w, _ = video.shape
    problems = []
    for name, n in (("height", h), ("width", w)):
        if n % patch or n == 0:
            valid = [v for v in (n // patch * patch, (n // patch + 1) * patch) if v > 0]
            problems.append(f"{name} {n} is not a multiple of {patch} (nearest valid: {_nearest(n, valid)})")
    if t != 1 and (t % patch_length or t == 0):
        valid = [1] + [v for v in (t // patch_length * patch_length, (t // patch_length + 1) * patch_length) if v > 0]
        problems.append(
            f"{t} frames: the VAE takes 1 frame or a multiple of {patch_length} (nearest valid: {_nearest(t, valid)})"
        )
    if problems:
        raise ValueError(f"video of shape {video.shape} cannot be encoded: " + "; ".join(problems))
    return video


def check_latents(latents, z_chans: int):
    """(z, t, h, w) or (1, z, t, h, w) -> (z, t, h, w); a device array stays on its device."""
    lat = latents if hasattr(latents, "shape") and hasattr(latents, "dtype") else np.asarray(latents)
    if lat.ndim == 5 and lat.shape[0] == 1:
        lat = lat[0]
    if lat.ndim != 4 or lat.shape[0] != z_chans or 0 in lat.shape:
        raise ValueError(f"expected latents ({z_chans}, t, h, w) or (1, {z_chans}, t, h, w), got shape {lat.shape}")
    if not np.issubdtype(np.dtype(lat.dtype), np.floating) and lat.dtype != bf16:
        raise ValueError(f"expected float latents, got {lat.dtype}")
    return lat


def frames_to_model(video: np.ndarray, dtype) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (1, 3, T, H, W) = bf16(x / 127.5 - 1), held in `dtype`."""
    x = video.transpose(3, 0, 1, 2)[None].astype(f32) / f32(127.5) - f32(1.0)
    return x.astype(bf16).astype(dtype)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    dt = x.dtype
    y = (x.astype(f32) * f32(127.5)).astype(dt)
    y = (y.astype(f32) + f32(127.5)).astype(dt)
    return np.clip(np.nan_to_num(y.astype(f32)), 0, 255).astype(np.uint8)


@functools.cache
def _bf16_uint8_table() -> np.ndarray:
    """The uint8 of every bfloat16 bit pattern (a 64 KiB table beats float math per pixel)."""
    with np.errstate(over="ignore", invalid="ignore"):  # the table spans inf / nan patterns too
        return _to_uint8(np.arange(2**16, dtype=np.uint16).view(bf16))


def model_to_uint8(x: np.ndarray) -> np.ndarray:
    """Model output in about [-1, 1] -> uint8, trunc(clamp(x*127.5 + 127.5)) in x's dtype."""
    if x.dtype == bf16:
        return _bf16_uint8_table()[x.view(np.uint16)]
    return _to_uint8(x)


# --------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """Tiling along one axis: tiles of `size` input units every `stride`; `blend` and `keep`
    are in output units."""

    size: int
    stride: int
    blend: int
    keep: int

    def starts(self, n: int) -> list[int]:
        return list(range(0, n, self.stride))


def _axis(name: str, sample: int, down: int, overlap: float, decode: bool) -> Axis:
    latent = sample // down
    if decode:  # tiles counted in latents, blended in pixels
        size, stride, out = latent, int(latent * (1 - overlap)), latent * down
    else:  # tiles counted in pixels, blended in latents
        size, stride, out = sample, int(sample * (1 - overlap)), latent
    blend = int(out * overlap)
    if stride <= 0 or latent <= 0:
        raise ValueError(f"tile {name} {sample} with overlap {overlap} is too small for a {down}x downsampling")
    return Axis(size, stride, blend, out - blend)


def plan(tiles: TileConfig, patch_length: int, patch: int, decode: bool) -> tuple[Axis, Axis, Axis]:
    return (
        _axis("length", tiles.sample_length, patch_length, tiles.temporal_overlap, decode),
        _axis("height", tiles.sample_height, patch, tiles.spatial_overlap, decode),
        _axis("width", tiles.sample_width, patch, tiles.spatial_overlap, decode),
    )


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int, fused: bool):
    """b's first e units along `axis` <- a's last e units * (1 - k/e) + b's * (k/e), in place."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return
    shape = [1] * b.ndim
    shape[axis] = e
    # python doubles handed to torch as float32 scalars
    w_b = np.array([k / e for k in range(e)], f32).reshape(shape)
    w_a = np.array([1 - k / e for k in range(e)], f32).reshape(shape)
    tail = [slice(None)] * b.ndim
    tail[axis] = slice(a.shape[axis] - e, None)
    head = [slice(None)] * b.ndim
    head[axis] = slice(0, e)
    old, new = a[tuple(tail)].astype(f32), b[tuple(head)].astype(f32)
    dt = b.dtype
    if fused:
        mixed = old * w_a + new * w_b
    else:  # eager ops in dt: both products and the sum are rounded
        mixed = (old * w_a).astype(dt).astype(f32) + (new * w_b).astype(dt).astype(f32)
    b[tuple(head)] = mixed.astype(dt)


def run_tiles(
    x: np.ndarray,
    fn: Callable[[np.ndarray], np.ndarray],
    axes: tuple[Axis, Axis, Axis],
    *,
    raw_neighbours: bool,
) -> np.ndarray:
    """Applies `fn` tile by tile to x (B, C, T, H, W) and blends / assembles the outputs.

    raw_neighbours: blend against the neighbours' raw outputs in float32 with one rounding
    (decode); otherwise blend in place with eager rounding against the already blended
    neighbours (encode).

    Holds at most the tiles a later tile still blends against (the previous row, and the
    previous time slice when there is temporal overlap) plus the kept parts.
    """
    starts = [ax.starts(n) for ax, n in zip(axes, x.shape[2:])]
    counts = [len(s) for s in starts]
    order = list(itertools.product(*map(range, counts)))
    rank = {key: n for n, key in enumerate(order)}

    def users(key):
        """Tiles that blend against `key` (only along axes that blend at all)."""
        out = []
        for ax_i, ax in enumerate(axes):
            nxt = list(key)
            nxt[ax_i] += 1
            if ax.blend > 0 and nxt[ax_i] < counts[ax_i]:
                out.append(tuple(nxt))
        return out

    held: dict[tuple, np.ndarray] = {}
    slices, rows, row = [], [], []
    for n, key in enumerate(order):
        lo = [s[k] for s, k in zip(starts, key)]
        tile_in = x[:, :, lo[0] : lo[0] + axes[0].size, lo[1] : lo[1] + axes[1].size, lo[2] : lo[2] + axes[2].size]
        raw = np.asarray(fn(tile_in))
        tile = raw.copy()
        neighbours = []
        for ax_i, ax in enumerate(axes):
            if key[ax_i] > 0:
                prev = list(key)
                prev[ax_i] -= 1
                prev = tuple(prev)
                if ax.blend > 0:
                    _blend(held[prev], tile, ax.blend, 2 + ax_i, fused=raw_neighbours)
                    neighbours.append(prev)
        if users(key):
            held[key] = raw if raw_neighbours else tile
        for prev in neighbours:
            if max(rank[u] for u in users(prev)) <= n:
                del held[prev]
        row.append(tile[:, :, : axes[0].keep, : axes[1].keep, : axes[2].keep])
        if key[2] == counts[2] - 1:
            rows.append(np.concatenate(row, axis=4))
            row = []
            if key[1] == counts[1] - 1:
                slices.append(np.concatenate(rows, axis=3))
                rows = []
    return np.concatenate(slices, axis=2)


def _check_encode_tiles(shape, axes, patch_length: int, patch: int):
    """Every tile must hold a whole patch (or be a single frame): fail before device work."""
    t, h, w = shape[2:]
    for name, n, ax, unit, single_ok in (
        ("frames", t, axes[0], patch_length, True),
        ("height", h, axes[1], patch, False),
        ("width", w, axes[2], patch, False),
    ):
        for s in ax.starts(n):
            extent = min(ax.size, n - s)
            if extent < unit and not (single_ok and extent == 1):
                raise ValueError(
                    f"tiling {name} {n} with tiles of {ax.size} (stride {ax.stride}) leaves a tile of {extent} "
                    f"at {s}, smaller than the patch ({unit}); choose another tile size"
                )


def tiled_encode(x: np.ndarray, encode_tile, tiles: TileConfig, patch_length: int, patch: int) -> np.ndarray:
    """Normalised video (B, 3, T, H, W) -> blended posterior mode (B, z, t, h, w)."""
    axes = plan(tiles, patch_length, patch, decode=False)
    _check_encode_tiles(x.shape, axes, patch_length, patch)
    return run_tiles(x, encode_tile, axes, raw_neighbours=False)


def flattens_to_view(parent: tuple[int, ...], window: tuple[int, ...]) -> bool:
    """Whether torch flattens a `window` of a contiguous `parent` array (same rank) into one
    axis as a view, without a copy: every non-unit axis must be dense over the inner ones."""
    strides = np.cumprod((1, *parent[::-1]))[:-1][::-1]
    inner, base = 1, None
    for size, stride in reversed(list(zip(window, strides))):
        if size == 1:
            continue
        if base is None:
            base = stride
        elif stride != inner * base:
            return False
        inner *= size
    return True


def decode_tiles_traced(z, decode_tile, tiles: TileConfig, patch_length: int, patch: int):
    """Traced (inside jit): unscaled latents z (B, zc, t, h, w) float32 -> blended frames
    (B, 3, T, H, W) in the decoder's dtype, as `run_tiles(..., raw_neighbours=True)` does on
    the host, but as one device program: no host round trip per tile.

    Tiles of one shape (and one `strided` flag, see `flattens_to_view`) run through one
    `lax.map` over a stack of their windows, so the program holds one decoder per tile
    shape and only one tile's activations are live at a time, as with per-tile calls.
    Blending reads the neighbours' raw outputs in float32 and rounds once per axis.
    `decode_tile(tile, strided)` is the untiled decoder (B, zc, t', h', w') -> frames.
    """
    import jax
    import jax.numpy as jnp

    axes = plan(tiles, patch_length, patch, decode=True)
    grid = tuple(z.shape[2:])
    starts = [ax.starts(n) for ax, n in zip(axes, grid)]
    counts = [len(s) for s in starts]
    order = list(itertools.product(*map(range, counts)))

    def window(key):
        lo = [s[k] for s, k in zip(starts, key)]
        return tuple(slice(a, min(a + ax.size, n)) for a, ax, n in zip(lo, axes, grid))

    groups: dict[tuple, list] = {}
    for key in order:
        w = window(key)
        shape = tuple(s.stop - s.start for s in w)
        groups.setdefault((shape, flattens_to_view(grid, shape)), []).append(key)
    raw = {}
    for (_, strided), keys in groups.items():
        if len(keys) == 1:
            raw[keys[0]] = decode_tile(z[(slice(None), slice(None), *window(keys[0]))], strided)
            continue
        stack = jnp.stack([z[(slice(None), slice(None), *window(k))] for k in keys])
        out = jax.lax.map(lambda tile, strided=strided: decode_tile(tile, strided), stack)
        raw.update({k: out[i] for i, k in enumerate(keys)})

    def blend(a, b, extent: int, axis: int):
        e = min(a.shape[axis], b.shape[axis], extent)
        if e <= 0:
            return b
        shape = [1] * b.ndim
        shape[axis] = e
        w_b = np.array([k / e for k in range(e)], f32).reshape(shape)
        w_a = np.array([1 - k / e for k in range(e)], f32).reshape(shape)
        old = widened(jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis))
        new = widened(jax.lax.slice_in_dim(b, 0, e, axis=axis))
        mixed = (old * w_a + new * w_b).astype(b.dtype)  # its readers widen it with `widened`
        return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis=axis)

    slices, rows, row = [], [], []
    for key in order:
        tile = raw[key]
        for ax_i, ax in enumerate(axes):
            if key[ax_i] > 0 and ax.blend > 0:
                prev = list(key)
                prev[ax_i] -= 1
                tile = blend(raw[tuple(prev)], tile, ax.blend, 2 + ax_i)
        row.append(tile[:, :, : axes[0].keep, : axes[1].keep, : axes[2].keep])
        if key[2] == counts[2] - 1:
            rows.append(jnp.concatenate(row, axis=4))
            row = []
            if key[1] == counts[1] - 1:
                slices.append(jnp.concatenate(rows, axis=3))
                rows = []
    return jnp.concatenate(slices, axis=2)


def rounded_to(x, dtype):
    """Traced: float32 x rounded to `dtype`'s precision, still float32.

    `x.astype(bf16).astype(f32)` is not a rounding XLA keeps: with excess precision allowed
    (XLA:GPU's default) it drops such conversion pairs, and on an H200 the chunk decode then
    differed from the host path in 16% of its uint8 values (2026-12-04; equal with
    `--xla_allow_excess_precision=false`). `reduce_precision` is an op XLA keeps."""
    import jax
    import jax.numpy as jnp

    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def widened(x):
    """Traced: x (16-bit) as float32, holding x's own values even where XLA skipped the rounding
    that produced x (see `rounded_to`)."""
    import jax.numpy as jnp

    return rounded_to(x.astype(jnp.float32), x.dtype)


def to_uint8_traced(x):
    """`model_to_uint8` inside jit: trunc(clamp(x*127.5 + 127.5)), each step rounded to x's dtype."""
    import jax.numpy as jnp

    dt = x.dtype
    y = rounded_to(widened(x) * f32(127.5), dt)
    y = rounded_to(y + f32(127.5), dt)
    return jnp.clip(jnp.nan_to_num(y), 0, 255).astype(jnp.uint8)
