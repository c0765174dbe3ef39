"""Sampler overhead: wall time of a whole run over the forwards its schedule really needs.

    python bench/sampler.py                      # TINY
    python bench/sampler.py --config 4.5B_base --layers 2 --height 256 --width 256 --frames 96

The schedule needs one guided forward per step at that step's window shape (chunks in the
window, the re-encoded clean chunk, the near-clean copy). We time each distinct shape's
forward alone (jitted, warmed up), add them up over the plan, and divide the sampler's
wall time for the whole run (compiled beforehand) by that sum: the cost of the loop
itself - window slicing, prefix writes, integration, dispatch - on top of the model. The
goal is <= 1.05. Also printed: the number of compilations (one per distinct shape).
Weights are random.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import device_name, fmt_bytes, peak_memory_bytes, timeit  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT  # noqa: E402
from magi_jax.forward_call import Captions  # noqa: E402
from magi_jax.guidance import jit_guided  # noqa: E402
from magi_jax.kv_cache import KVCache  # noqa: E402
from magi_jax.sampler import Sampler  # noqa: E402
from magi_jax.sampler_plan import plan  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()

    cfg = load_config(args.config)
    if args.layers:
        cfg = cfg.replace(model=dict(num_layers=args.layers))
    rt = {
        k: v
        for k, v in dict(
            video_size_h=args.height, video_size_w=args.width, num_frames=args.frames, num_steps=args.steps
        ).items()
        if v
    }
    cfg = cfg.replace(runtime=rt) if rt else cfg
    m = cfg.model
    model = DiT(m, fp8_quant=cfg.engine.fp8_quant, distill=cfg.engine.distill, rngs=nnx.Rngs(0))
    sampler = Sampler(model, cfg)
    lay = sampler.layout()
    rng = np.random.default_rng(0)
    cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = np.ones((2, lay.chunk_num, m.caption_max_length), np.float32)

    t0 = time.perf_counter()
    for c in sampler.chunks(cap, mask, seed=0):
        c.block_until_ready()
    first = time.perf_counter() - t0
    compilations = sampler.compilations
    t0 = time.perf_counter()
    chunks = [np.asarray(c) for c in sampler.chunks(cap, mask, seed=0)]  # read on the host: the run is done
    wall = time.perf_counter() - t0

    # the forwards the schedule needs, each distinct shape timed alone
    steps = Counter()
    calls = {}
    for stage in plan(cfg, lay):
        for g in stage.groups:
            steps[g.window] += int(g.count)
            calls.setdefault(g.window, jax.tree.map(lambda a: a[0], g.steps.call))
    guided = jit_guided(model, cfg)
    cache = KVCache.create(m.num_layers, lay.chunk_num * lay.chunk_tokens, m.num_query_groups, m.kv_channels, m.dtype)
    c, _, h, w = lay.latent_shape
    needed = 0.0
    for window, n in steps.items():
        r = window.chunks
        x = jnp.asarray(rng.standard_normal((c, r * lay.chunk_width, h, w)), jnp.float32)
        captions = Captions(jnp.asarray(cap[:, :r]), jnp.asarray(mask[:, :r]))
        needed += n * timeit(lambda x=x, y=captions, call=calls[window]: guided(x, y, call, cache)[0])

    print(f"device           {device_name()}")
    print(f"config           {args.config}: {m.num_layers} layers, hidden {m.hidden_size}, {m.params_dtype}")
    print(
        f"video            {lay.latent_shape} latents, {lay.chunk_num} chunks, {cfg.runtime.num_steps} steps, "
        f"window {cfg.runtime.window_size}"
    )
    print(f"first run        {first:.2f} s (compiles {compilations} window shapes)")
    print(f"sampler wall     {wall:.3f} s")
    print(f"needed forwards  {needed:.3f} s ({sum(steps.values())} steps over {len(steps)} shapes)")
    print(f"ratio            {wall / needed:.3f} (goal <= 1.05)")
    print(f"compilations     {compilations} ({len(chunks)} chunks)")
    print(f"peak memory      {fmt_bytes(peak_memory_bytes())}")


if __name__ == "__main__":
    main()
