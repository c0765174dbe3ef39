"""Convert released MAGI-1 PyTorch weights into a magi-jax (orbax) checkpoint.

    python convert_torch_weights.py --src ckpt/magi/4.5B_base/inference_weight \
        --config 4.5B_base --out weights/4.5B_base

--src    a .safetensors file, or a folder with model.safetensors.index.json (shards may be
         .zst-compressed, as released)
--config an upstream JSON config or a variant name (4.5B_base, ..., 24B_distill_quant, tiny)
--out    the checkpoint folder to create (written to a temporary name, then renamed)

Conversion is strict: any missing, unexpected, duplicate or mis-shaped key stops it with
the key, its shape and the expected shape. Nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
import time


def _progress(name: str, done: int, total: int):
    print(f"  shard {done}/{total}: {name}", file=sys.stderr, flush=True)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="upstream .safetensors file or sharded folder")
    ap.add_argument("--config", required=True, help="upstream JSON config or variant name")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)

    from magi_jax import checkpoint
    from magi_jax.config import ConfigError, load_config
    from magi_jax.convert import ConversionError
    from magi_jax.dit_weights import convert_dit
    from magi_jax.safetensors_io import CheckpointError

    start = time.time()
    try:
        config = load_config(args.config)
        print(f"converting {args.src} ({args.config}) -> {args.out}", file=sys.stderr, flush=True)
        arrays = convert_dit(args.src, config, progress=_progress)
        summary = checkpoint.save(arrays, args.out, "dit", config.to_dict(), overwrite=args.overwrite)
    except (ConfigError, ConversionError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtypes = ", ".join(f"{k}: {v:,}" for k, v in summary["dtypes"].items())
    print(
        f"wrote {args.out}: {summary['parameters']:,} parameters, {_gib(summary['bytes'])} ({dtypes}) "
        f"in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
