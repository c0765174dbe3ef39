"""Time the T5 encoder on one 800-token prompt (MAGI-1's caption length), random weights.

    python bench/t5.py                       # TINY and a mid-size encoder
    python bench/t5.py --sizes xxl --layers 2

Prints the device, encode time, FLOPs, achieved FLOP/s and its ratio to a large matmul's
FLOP/s measured in the same run, in the encoder's dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import device_name, fmt_bytes, matmul_flops, peak_memory_bytes, timeit  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax.t5 import TINY, XXL, T5Encoder  # noqa: E402

SIZES = {
    "tiny": TINY,
    "mid": dataclasses.replace(XXL, d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=8),
    "xxl": XXL,
}


def flops(cfg, length: int) -> int:
    inner = cfg.num_heads * cfg.d_kv
    per_token = 2 * cfg.d_model * 4 * inner + 2 * 3 * cfg.d_model * cfg.d_ff + 4 * inner * length
    return cfg.num_layers * length * per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--length", type=int, default=800)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"device   {device_name()}")
    ref = matmul_flops(dtype)
    print(f"matmul   {ref / 1e12:.3f} TFLOP/s ({args.dtype}, same run)")
    for name in args.sizes.split(","):
        cfg = SIZES[name]
        if args.layers:
            cfg = dataclasses.replace(cfg, num_layers=args.layers)
        model = T5Encoder(cfg, dtype, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.length)), jnp.int32)
        mask = jnp.ones_like(ids)
        encode = jax.jit(lambda s, i, m, g=graphdef: nnx.merge(g, s)(i, m))
        seconds = timeit(encode, state, ids, mask)
        f = flops(cfg, args.length)
        print(
            f"{name:8s} d_model {cfg.d_model}, {cfg.num_layers} layers: {seconds * 1e3:.1f} ms per {args.length}-token "
            f"prompt, {f / seconds / 1e12:.3f} TFLOP/s, ratio {f / seconds / ref:.3f}"
        )
    print(f"peak     {fmt_bytes(peak_memory_bytes())}")


if __name__ == "__main__":
    main()
