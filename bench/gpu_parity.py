"""On an accelerator: replay every DiT parity fixture call, then time a 4.5B-shaped bf16 forward.

    python bench/gpu_parity.py                     # all bundled fixtures + 4.5B shape, 4 layers
    python bench/gpu_parity.py --layers 34 --height 720 --width 720

Part 1 replays each `calls` entry of every `dit` fixture (tests/fixtures/parity, plus
MAGI_PARITY_DIR) with the attention implementation this backend picks (cuDNN on NVIDIA
GPUs for bf16, the reference for fp32) and prints max|diff| against the fixture's
tolerance. Part 2 times one guided window forward of a 4.5B-shaped model in bf16 and
reports MFU: achieved FLOP/s over the bf16 matmul FLOP/s measured in the same run. It runs
(slowly) on CPU as well. Exits 1 when any call fails (velocity, cache rows written, or a row
written past the call's end), before the timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import device_name, fmt_bytes, matmul_flops, peak_memory_bytes, timeit  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # the fp32 fixtures need full precision


def parity_part() -> int:
    """Replay every recorded call; returns how many failed (velocity, written cache rows, or a
    row written past the call's end)."""
    import parity
    from dit_fixtures import call_inputs, check_call, model_of

    from magi_jax.attention import implementation
    from magi_jax.guidance import jit_guided

    failures = 0
    for fx in parity.fixtures("dit"):
        jitted = {}  # a call's env can change the config: one program per config
        for call in fx.meta["calls"]:
            cfg, args, cache, ref = call_inputs(fx, call)
            if cfg not in jitted:
                jitted[cfg] = jit_guided(model_of(fx), cfg)
            out, cache = jitted[cfg](*args, cache)
            try:
                check_call(fx, call, out, cache, ref)
                verdict = "ok  "
            except AssertionError as e:
                failures += 1
                verdict = f"FAIL {e}"
            print(f"  {verdict[:4]} {fx.id}/{call['name']} (attention {implementation(cfg.model.dtype)}) {verdict[5:]}")
    return failures


def speed_part(layers: int, height: int, width: int, chunks: int):
    from magi_jax.config import load_config
    from magi_jax.dit import DiT, forward_flops
    from magi_jax.forward_call import Captions, Window
    from magi_jax.guidance import ChunkGeometry, DispatchStep, jit_guided, plan_call
    from magi_jax.kv_cache import KVCache

    cfg = load_config("4.5B_base").replace(model=dict(num_layers=layers))
    m = cfg.model
    cw, h, w = cfg.runtime.chunk_width, height // 8, width // 8
    tokens = cw * (h // 2) * (w // 2)
    cached = 4  # clean chunks in the cache before the window (the released kv range sees 4 back)
    model = DiT(m, rngs=nnx.Rngs(0))
    cache = KVCache.create(m.num_layers, (cached + chunks) * tokens, m.num_query_groups, m.kv_channels, m.dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m.latent_channels, chunks * cw, h, w)), jnp.float32)
    captions = Captions(
        jnp.asarray(rng.standard_normal((2, chunks, m.caption_max_length, m.caption_channels)), jnp.float32),
        jnp.ones((2, chunks, m.caption_max_length), jnp.float32),
    )
    step = DispatchStep(
        first_chunk=cached,
        t=np.linspace(0.2, 0.8, chunks, dtype=np.float32),
        kv_range=np.stack([np.zeros(chunks), (cached + np.arange(chunks) + 1) * tokens], 1).astype(np.int32),
    )
    window = Window(chunks, cache_window=cached * tokens)
    call = plan_call(cfg, window, step, ChunkGeometry(cw // m.t_patch_size, tokens))
    guided = jit_guided(model, cfg)
    seconds = timeit(lambda: guided(x, captions, call, cache)[0])
    visible = int((cached + (chunks + 1) / 2) * tokens)
    flops = 2 * forward_flops(m, chunks, tokens, visible, m.caption_max_length)  # caption + null rows
    flops += forward_flops(m, chunks, tokens, tokens, m.caption_max_length)  # unconditional: each chunk alone
    ref = matmul_flops(jnp.bfloat16)
    print(
        f"  4.5B-shaped, {layers} layers, bf16, {chunks} chunks x {tokens} tokens ({height}x{width}), "
        f"{cached} cached chunks"
    )
    print(f"  guided forward {seconds * 1e3:.1f} ms, {flops / 1e12:.2f} TFLOP, {flops / seconds / 1e12:.1f} TFLOP/s")
    print(f"  bf16 matmul    {ref / 1e12:.1f} TFLOP/s (same device, same run)")
    print(f"  MFU            {flops / seconds / ref:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=480)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    print(f"device {device_name()}")
    start = time.time()
    if not args.skip_parity:
        print("parity (every recorded upstream call):")
        failures = parity_part()
        print(f"  {failures} failure(s), {time.time() - start:.0f}s")
        if failures:  # a failed replay is the answer; the timing below would only hide it
            sys.exit(1)
    print("speed:")
    speed_part(args.layers, args.height, args.width, args.chunks)
    print(f"peak memory {fmt_bytes(peak_memory_bytes())}")


if __name__ == "__main__":
    main()
