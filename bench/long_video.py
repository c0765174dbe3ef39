"""Constant memory for any length: the sampler's peak memory and time per chunk at 8, 64, 512 chunks.

    python bench/long_video.py                       # TINY runs + compile-only 4.5B 720x720
    python bench/long_video.py --chunks 8 64 --skip_4p5b

Each TINY run (random weights, per-chunk noise, 4 steps) is its own child process so its
peak memory is its own. Peak device memory is the backend's peak_bytes_in_use where it
reports one (GPU/TPU); on CPU, which has no such counter, the most bytes of live device
arrays seen at any chunk (the KV ring, the latent slots, the stage inputs, the parameters),
with the process's peak RSS (host memory, compilation included) beside it. The run is done
twice with the same sampler and the second is timed, so no compilation is counted. Time per
chunk is the wall time between handed-out chunks, the median of each quarter of the run
after the ramp-up (the first window of chunks), so a flat row means constant cost. The goal: peak
memory at 512 chunks within 5% of 8 chunks, flat time per chunk.

The 4.5B 720x720 rows compile the sampler's largest step on abstract shapes (nothing is
allocated or run) for 8 and 512 chunks and print XLA's own memory account, next to the KV
cache a whole-video buffer (upstream's, and ours before the ring) would need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(chunks: int, size: int) -> dict:
    import jax
    import numpy as np
    from common import peak_memory_bytes
    from flax import nnx

    from magi_jax.config import load_config
    from magi_jax.dit import DiT
    from magi_jax.sampler import Sampler
    from magi_jax.sampler_plan import cache_rows

    base = load_config("tiny")
    cw, tdf = base.runtime.chunk_width, base.runtime.temporal_downsample_factor
    cfg = base.replace(runtime=dict(num_frames=chunks * cw * tdf, video_size_h=size, video_size_w=size, num_steps=4))
    m = cfg.model
    sampler = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg, noise_draw="chunk")
    lay = sampler.layout()
    cap = np.zeros((2, lay.chunk_num, m.caption_max_length, m.caption_channels), np.float32)
    mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
    mask[:, :, :8] = 1
    # the bench reads captions per chunk, as the timeline does: no whole-video array on the device
    captions = lambda i: (cap[:, i], mask[:, i])  # noqa: E731

    def live() -> int:
        return sum(a.nbytes for a in jax.live_arrays())

    for c in sampler.chunks(captions, seed=0):  # compiles every window shape
        c.block_until_ready()
    times, peak_live = [], 0
    t0 = time.perf_counter()
    for c in sampler.chunks(captions, seed=0):
        c.block_until_ready()  # chunks are handed out before the device is done with them
        times.append(time.perf_counter() - t0)
        peak_live = max(peak_live, live())
        t0 = time.perf_counter()
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        chunks=chunks,
        device_peak=int(stats.get("peak_bytes_in_use", peak_live)),
        host_peak=peak_memory_bytes() if "peak_bytes_in_use" not in stats else None,
        peak_live=peak_live,
        cache_rows=cache_rows(cfg, lay),
        whole_rows=lay.chunk_num * lay.chunk_tokens,
        times=times,
        window=cfg.runtime.window_size,
        device=jax.devices()[0].platform,
    )


def compile_only(chunks: int) -> dict:
    import jax.numpy as jnp

    from magi_jax.aot import compiled_step_memory
    from magi_jax.config import load_config
    from magi_jax.memory_plan import plan_memory
    from magi_jax.sampler_plan import cache_rows, layout

    base = load_config("4.5B_base")
    rt = base.runtime
    cfg = base.replace(
        runtime=dict(
            num_frames=chunks * rt.chunk_width * rt.temporal_downsample_factor, video_size_h=720, video_size_w=720
        )
    )
    lay = layout(cfg)
    m = cfg.model
    row_bytes = 2 * m.num_layers * m.num_query_groups * m.kv_channels * jnp.dtype(m.dtype).itemsize  # k and v
    t0 = time.perf_counter()
    compiled = compiled_step_memory(cfg)
    return dict(
        chunks=chunks,
        compiled=compiled,
        plan=plan_memory(cfg).total,
        ring=cache_rows(cfg, lay) * row_bytes,
        whole=lay.chunk_num * lay.chunk_tokens * row_bytes,
        seconds=time.perf_counter() - t0,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--size", type=int, default=32, help="TINY video size in pixels")
    ap.add_argument("--skip_4p5b", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, n = args.child.split(":")
        out = child(int(n), args.size) if kind == "tiny" else compile_only(int(n))
        print("RESULT " + json.dumps(out))
        return

    import numpy as np
    from common import device_name, fmt_bytes

    def run(kind, n):
        cmd = [sys.executable, __file__, "--child", f"{kind}:{n}", "--size", str(args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{kind} {n} chunks failed:\n{proc.stderr[-3000:]}")
        return json.loads(line[0][7:])

    print(f"device: {device_name()}  (TINY {args.size}x{args.size}, 4 steps, random weights)")
    print(
        f"{'chunks':>7} {'device peak':>12} {'host RSS':>12} {'KV rows':>8} {'whole-video rows':>17}"
        "  time per chunk by quarter"
    )
    rows = [run("tiny", n) for n in args.chunks]
    for r in rows:
        steady = r["times"][r["window"] :] or r["times"]
        q = [float(np.median(p)) for p in _quarters(steady)]
        print(
            f"{r['chunks']:>7} {fmt_bytes(r['device_peak']):>12} {fmt_bytes(r['host_peak'] or 0):>12} "
            f"{r['cache_rows']:>8} {r['whole_rows']:>17}  " + " ".join(f"{t * 1e3:.1f}ms" for t in q)
        )
    first, last = rows[0], rows[-1]
    print(
        f"peak device memory {last['chunks']} / {first['chunks']} chunks: "
        f"{last['device_peak'] / first['device_peak']:.3f} (goal <= 1.05)"
    )
    if args.skip_4p5b:
        return
    print("4.5B_base 720x720, compile only (largest sampler step, XLA memory analysis):")
    for n in (8, 512):
        r = run("4p5b", n)
        print(
            f"{n:>7} chunks: compiled step {fmt_bytes(r['compiled'])}, plan {fmt_bytes(r['plan'])}, "
            f"KV ring {fmt_bytes(r['ring'])} (a whole-video cache: {fmt_bytes(r['whole'])}), "
            f"compiled in {r['seconds']:.0f}s"
        )


def _quarters(xs):
    n = max(1, len(xs) // 4)
    return [xs[i : i + n] for i in range(0, len(xs), n)][:4]


if __name__ == "__main__":
    main()
