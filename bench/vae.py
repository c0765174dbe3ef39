"""Time the VAE's tiled decode of one chunk and compare to the device's matmul rate.

    python bench/vae.py                                   # TINY and RELEASED (1 layer), 720p
    python bench/vae.py --configs released --layers 4 --height 720 --width 1280 --frames 24

For each config: the device, the chunk (frames and latent grid), the tiles, the decode's
FLOPs (counted from the tile shapes), the time per chunk (best of --repeat, compiled and
warmed up first), achieved FLOP/s, the FLOP/s of a large matmul in the same dtype measured
in the same run and their ratio, the device memory one tile's compiled decode needs
(arguments + temporaries + output: what the device holds beyond the weights and the
host-side output) and the process's peak memory. Weights are random; the pipeline's
tiles are upstream's (256x256 px, fps/2 frames, overlap 0.25).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import device_name, fmt_bytes, matmul_flops, peak_memory_bytes  # noqa: E402

from magi_jax.vae import RELEASED, TINY, VaeConfig  # noqa: E402
from magi_jax.vae_tiling import TileConfig, flattens_to_view, plan  # noqa: E402
from magi_jax.vae_weights import random_vae  # noqa: E402

CONFIGS = {"tiny": TINY, "released": RELEASED}


def decode_tiles(cfg: VaeConfig, tiles: TileConfig, grid: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Latent shapes (t, h, w) of every tile the decode of `grid` runs."""
    axes = plan(tiles, cfg.patch_length, cfg.patch_size, decode=True)
    per_axis = [[min(ax.size, n - s) for s in ax.starts(n)] for ax, n in zip(axes, grid)]
    return list(itertools.product(*per_axis))


def decode_flops(cfg: VaeConfig, tile: tuple[int, int, int]) -> int:
    """Multiply-adds x 2 of one tile's decode (linears, attention, the last conv)."""
    t, h, w = tile
    n, d, m = t * h * w + 1, cfg.embed_dim, cfg.mlp_hidden
    per_layer = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * m
    pixels = t * cfg.patch_length * h * cfg.patch_size * w * cfg.patch_size
    return cfg.depth * per_layer + 2 * (n - 1) * cfg.z_chans * d + 2 * 27 * cfg.unpatch_channels * 3 * pixels


def tile_device_bytes(vae, tile: tuple[int, int, int], strided: bool) -> int | None:
    z = jax.ShapeDtypeStruct((1, vae.config.z_chans, *tile), jnp.float32)
    compiled = vae._jit["decode"].lower(vae.state, z, strided).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    weights = sum(x.nbytes for x in jax.tree.leaves(vae.state))
    return int(mem.argument_size_in_bytes - weights + mem.temp_size_in_bytes + mem.output_size_in_bytes)


def bench(name: str, cfg: VaeConfig, args, roof: float):
    vae = random_vae(cfg, jnp.bfloat16)
    tiles = TileConfig.for_fps(args.fps)
    grid = (args.frames // cfg.patch_length, args.height // cfg.patch_size, args.width // cfg.patch_size)
    lat = np.random.default_rng(0).standard_normal((cfg.z_chans, *grid)).astype(np.float32) * 0.18215

    t0 = time.perf_counter()
    frames = vae.decode_latents(lat, tiles)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        vae.decode_latents(lat, tiles)
        best = min(best, time.perf_counter() - t0)

    shapes = decode_tiles(cfg, tiles, grid)
    flops = sum(decode_flops(cfg, s) for s in shapes)
    largest = max(set(shapes), key=lambda s: s[0] * s[1] * s[2])
    per_tile = tile_device_bytes(vae, largest, flattens_to_view(grid, largest))
    weights = sum(x.nbytes for x in jax.tree.leaves(vae.state))
    print(f"[{name}] width {cfg.embed_dim}, {cfg.depth}+{cfg.depth} blocks, {fmt_bytes(weights)} of weights (bf16)")
    print(f"  chunk: {args.frames} frames {args.height}x{args.width} -> latents {grid} -> frames {frames.shape}")
    print(f"  tiles: {len(shapes)} ({len(set(shapes))} shapes, one compilation each), largest latent tile {largest}")
    print(f"  decode: {best:.3f} s per chunk (first call incl. compilation {first:.1f} s), {flops / 1e12:.3f} TFLOP")
    print(f"  achieved {flops / best / 1e12:.3f} TFLOP/s = {flops / best / roof:.1%} of the matmul rate")
    if per_tile is not None:
        print(f"  device memory per tile beyond the weights: {fmt_bytes(per_tile)}")
    print(f"  peak memory so far: {fmt_bytes(peak_memory_bytes())}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,released", help="comma-separated: tiny, released")
    ap.add_argument("--layers", type=int, default=1, help="blocks per half for the released config")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=24, help="pixel frames of the chunk (a multiple of 4)")
    ap.add_argument("--fps", type=int, default=24, help="tiles hold fps // 2 frames, as upstream")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    print(f"device: {device_name()}")
    roof = matmul_flops(jnp.bfloat16)
    print(f"large bf16 matmul: {roof / 1e12:.3f} TFLOP/s")
    for name in args.configs.split(","):
        cfg = CONFIGS[name.strip()]
        if name.strip() == "released":
            cfg = cfg.replace(depth=args.layers)
            name = f"released, {args.layers} layer(s) per half"
        bench(name, cfg, args, roof)


if __name__ == "__main__":
    main()
