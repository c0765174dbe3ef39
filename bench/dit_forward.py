"""Time one jitted DiT forward over a window of chunks and compare to the device's matmul rate.

    python bench/dit_forward.py --config tiny
    python bench/dit_forward.py --config 4.5B_base --layers 2 --height 360 --width 640 --chunks 4

Prints the device, the pass's FLOPs (computed from the config), the achieved FLOP/s, the
FLOP/s of a large matmul in the same dtype measured in the same run, their ratio (MFU
against what this device really does), and peak memory. Weights are random. With --profile,
one more run under JAX's profiler prints where its time went, kernel by kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    datasheet_bf16_flops,
    device_name,
    fmt_bytes,
    matmul_flops,
    peak_memory_bytes,
    time_by_op,
    timeit,
)
from flax import nnx  # noqa: E402

from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT, forward_flops  # noqa: E402
from magi_jax.forward_call import Captions, ForwardCall, Rows  # noqa: E402
from magi_jax.kv_cache import KVCache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (fewer layers of a big shape)")
    ap.add_argument("--height", type=int, default=None, help="video height in pixels (default: config)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=4, help="denoising chunks in the window")
    ap.add_argument("--cached", type=int, default=1, help="clean chunks in the KV cache before the window")
    ap.add_argument("--dtype", default=None, help="params dtype (default: config)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up (best is kept)")
    ap.add_argument("--profile", metavar="DIR", help="then one profiled run: time by kernel / op, trace kept in DIR")
    args = ap.parse_args()

    cfg = load_config(args.config)
    changes = {}
    if args.layers:
        changes["num_layers"] = args.layers
    if args.dtype:
        changes["params_dtype"] = args.dtype
    cfg = cfg.replace(model=changes) if changes else cfg
    m, rt = cfg.model, cfg.runtime
    h, w = (args.height or rt.video_size_h) // 8, (args.width or rt.video_size_w) // 8
    cw, r, cached = rt.chunk_width, args.chunks, args.cached
    tokens = cw * (h // m.patch_size) * (w // m.patch_size)
    model = DiT(m, fp8_quant=cfg.engine.fp8_quant, distill=cfg.engine.distill, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rows = (cached + r) * tokens
    cache = KVCache.create(m.num_layers, rows, m.num_query_groups, m.kv_channels, m.dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m.latent_channels, r * cw, h, w)), jnp.float32)
    t = jnp.linspace(0.1, 0.9, r, dtype=jnp.float32)
    cap = jnp.asarray(rng.standard_normal((r, m.caption_max_length, m.caption_channels)), jnp.float32)
    mask = jnp.ones((r, m.caption_max_length), jnp.float32)
    kv = np.stack([np.zeros(r), (cached + np.arange(r) + 1) * tokens], 1).astype(np.int32)
    frame0 = (cached + np.arange(r)) * cw
    t_total = np.full(r, (cached + r) * cw)

    call = ForwardCall(
        t=t,
        kv_range=kv,
        frame0=frame0,
        t_total=t_total,
        first_chunk=np.int32(cached),
        write_count=np.int32(r * tokens),
        distill_dt=np.float32(4.0) if cfg.engine.distill else None,
        rows=Rows(read_cache=True, write_row=0),
    )
    captions = Captions(cap[None], mask[None])

    @jax.jit
    def forward(state, cache):
        return nnx.merge(graphdef, state)(x, captions, call, cache)

    seconds = timeit(forward, state, cache, repeat=args.repeat)
    visible = (cached + (r + 1) / 2) * tokens  # mean keys per query over the block-causal window
    flops = forward_flops(m, r, tokens, int(visible), m.caption_max_length)
    ref = matmul_flops(m.dtype)
    print(f"device           {device_name()}")
    print(f"config           {args.config}: {m.num_layers} layers, hidden {m.hidden_size}, {m.params_dtype}")
    print(f"window           {r} chunks x {tokens} tokens ({cw} latent frames {h}x{w}), {cached} cached")
    print(f"forward          {seconds * 1e3:.2f} ms, {flops / 1e9:.2f} GFLOP")
    print(f"achieved         {flops / seconds / 1e12:.3f} TFLOP/s")
    print(f"matmul {m.params_dtype:9s} {ref / 1e12:.3f} TFLOP/s (same device, same run)")
    print(f"ratio            {flops / seconds / ref:.3f}")
    sheet = datasheet_bf16_flops()
    if sheet and m.params_dtype == "bfloat16":
        print(
            f"MFU              {flops / seconds / sheet:.3f} of the datasheet's dense bf16 {sheet / 1e12:.0f} TFLOP/s"
        )
    print(f"peak memory      {fmt_bytes(peak_memory_bytes())}")
    if args.profile:
        print("\n".join(time_by_op(forward, state, cache, folder=args.profile)))


if __name__ == "__main__":
    main()
