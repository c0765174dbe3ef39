"""Convert released MAGI-1 PyTorch weights into a magi-jax (orbax) checkpoint.

    python convert_torch_weights.py --src ckpt/magi/4.5B_base/inference_weight \
        --config 4.5B_base --out ckpt/magi/4.5B_base/inference_weight.magi_jax
    python convert_torch_weights.py --model vae --src ckpt/vae --out ckpt/vae.magi_jax
    python convert_torch_weights.py --model t5 --src ckpt/t5 --out ckpt/t5.magi_jax

--model  dit (default), vae or t5
--src    dit: a .safetensors file, or a folder with model.safetensors.index.json (shards may
         be .zst-compressed, as released); vae: the folder with config.json and
         diffusion_pytorch_model.safetensors; t5: upstream's t5_pretrained folder (or its
         t5-v1_1-xxl child: config.json, spiece.model, safetensors or pytorch .bin shards)
--config dit only: an upstream JSON config or a variant name (4.5B_base, ..., tiny)
--out    the checkpoint folder to create (written to a temporary name, then renamed); the
         generate command finds `<upstream folder>.magi_jax` on its own

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


def _dit(args):
    from magi_jax import checkpoint
    from magi_jax.config import ConfigError, load_config
    from magi_jax.dit_weights import convert_dit

    if not args.config:
        raise ConfigError("--model dit needs --config (the variant name or JSON the weights belong to)")
    config = load_config(args.config)
    arrays = convert_dit(args.src, config, progress=_progress)
    return checkpoint.save(
        arrays, args.out, "dit", config.to_dict(), overwrite=args.overwrite, dtype=config.model.params_dtype
    )


def _vae(args):
    import jax.numpy as jnp

    from magi_jax import checkpoint
    from magi_jax.vae import VaeConfig
    from magi_jax.vae_weights import convert_vae, find_vae_files

    dtype = jnp.dtype(args.dtype or "bfloat16")
    config_path, weights = find_vae_files(args.src)
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: the VAE's config.json is missing")
    cfg = VaeConfig.from_file(config_path)
    arrays = convert_vae(weights, cfg, dtype)
    _progress(weights.name, 1, 1)
    return checkpoint.save(arrays, args.out, "vae", cfg.to_json_dict(), overwrite=args.overwrite, dtype=dtype.name)


def _t5(args):
    import dataclasses

    import jax.numpy as jnp

    from magi_jax import checkpoint
    from magi_jax.t5 import convert_t5, hf_folder, load_config_json, weights_source

    dtype = jnp.dtype(args.dtype or "float32")
    folder = hf_folder(args.src)
    cfg = load_config_json(folder)
    arrays = convert_t5(weights_source(folder), cfg, dtype, progress=_progress)
    tokenizer = [folder / n for n in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")]
    return checkpoint.save(
        arrays,
        args.out,
        "t5",
        dataclasses.asdict(cfg),
        overwrite=args.overwrite,
        dtype=dtype.name,
        files=[f for f in tokenizer if f.exists()],
    )


CONVERTERS = {"dit": _dit, "vae": _vae, "t5": _t5}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit", choices=("dit", "vae", "t5"))
    ap.add_argument("--src", required=True, help="upstream weights (file or folder)")
    ap.add_argument("--config", default=None, help="dit: upstream JSON config or variant name")
    ap.add_argument("--dtype", default=None, help="vae/t5 parameter dtype (default: bfloat16 / float32)")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)

    from magi_jax.config import ConfigError
    from magi_jax.convert import ConversionError
    from magi_jax.tensor_file import CheckpointError

    start = time.time()
    try:
        print(f"converting {args.model} {args.src} -> {args.out}", file=sys.stderr, flush=True)
        summary = CONVERTERS[args.model](args)
    except (ConfigError, ConversionError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
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
