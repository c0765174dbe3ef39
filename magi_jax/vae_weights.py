"""The VAE's upstream key table and loading a released VAE folder into our model.

The released folder holds `config.json` (`_class_name: ViTVAE`, `ddconfig`) and
`diffusion_pytorch_model.safetensors` with `ViTVAE.state_dict()` names. The table below maps
each key to our parameter tree (blocks stacked on the scanned layer axis) with the same
strictness as the DiT's: a missing, unexpected or mis-shaped key is a named error.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.convert import IDENTITY, LINEAR, Rule, Transform
from magi_jax.vae import CONFIG_NAME, TINY, WEIGHTS_NAME, VaeConfig, VaeModel
from magi_jax.vae_runtime import Vae
from magi_jax.vae_tiling import SCALE_FACTOR, TileConfig
from magi_jax.weights import abstract_model, build_model, convert_torch, expected_leaves

# --------------------------------------------------------------------------------------
# Upstream checkpoint -> our parameters
# --------------------------------------------------------------------------------------


def _patch_embed(cfg: VaeConfig) -> Transform:
    shape = (cfg.in_chans, cfg.patch_length, cfg.patch_size, cfg.patch_size)
    return Transform("conv3d->linear", lambda a: a.reshape(a.shape[0], -1).T, lambda s: (s[1], *shape))


SQUEEZE = Transform("(1, ..., D) -> (..., D)", lambda a: a.reshape(a.shape[1:]), lambda s: (1, *s))
CLS_TOKEN = Transform("(1, 1, D) -> (D,)", lambda a: a.reshape(-1), lambda s: (1, 1, *s))


def _block_rules(part: str, cfg: VaeConfig) -> list[Rule]:
    """Per-block keys of `part` (encoder / decoder), stacked on the scanned layer axis."""
    names = [("attn.qkv.weight", ("qkv", "kernel"), LINEAR)]
    if cfg.qkv_bias:
        names.append(("attn.qkv.bias", ("qkv", "bias"), IDENTITY))
    if not cfg.ln_in_attn:
        names += [("norm1.weight", ("norm1", "weight"), IDENTITY), ("norm1.bias", ("norm1", "bias"), IDENTITY)]
    names += [
        ("attn.proj.weight", ("proj", "kernel"), LINEAR),
        ("attn.proj.bias", ("proj", "bias"), IDENTITY),
        ("norm2.weight", ("norm2", "weight"), IDENTITY),
        ("norm2.bias", ("norm2", "bias"), IDENTITY),
        ("mlp.fc1.weight", ("fc1", "kernel"), LINEAR),
        ("mlp.fc1.bias", ("fc1", "bias"), IDENTITY),
        ("mlp.fc2.weight", ("fc2", "kernel"), LINEAR),
        ("mlp.fc2.bias", ("fc2", "bias"), IDENTITY),
    ]
    return [
        Rule(f"{part}.blocks.{{i}}.{name}", (part, "blocks", "layers", *ours), transform, range(cfg.depth))
        for name, ours, transform in names
    ]


def vae_rules(cfg: VaeConfig) -> list[Rule]:
    """Upstream `ViTVAE.state_dict()` names -> our parameter paths."""
    rules = []
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.cls_token", (part, "cls_token"), CLS_TOKEN),
            Rule(f"{part}.pos_embed", (part, "pos_embed"), SQUEEZE),
            Rule(f"{part}.norm.weight", (part, "norm", "weight")),
            Rule(f"{part}.norm.bias", (part, "norm", "bias")),
            *_block_rules(part, cfg),
        ]
    rules += [
        Rule("encoder.patch_embed.proj.weight", ("encoder", "patch_embed", "kernel"), _patch_embed(cfg)),
        Rule("encoder.patch_embed.proj.bias", ("encoder", "patch_embed", "bias")),
        Rule("encoder.last_layer.weight", ("encoder", "last_layer", "kernel"), LINEAR),
        Rule("encoder.last_layer.bias", ("encoder", "last_layer", "bias")),
        Rule("decoder.proj_in.weight", ("decoder", "proj_in", "kernel"), LINEAR),
        Rule("decoder.proj_in.bias", ("decoder", "proj_in", "bias")),
        Rule("decoder.last_layer.weight", ("decoder", "last_layer")),  # Conv3d layout kept
        Rule("decoder.last_layer.bias", ("decoder", "last_bias")),
    ]
    return rules


def abstract_vae(cfg: VaeConfig, dtype=jnp.bfloat16, attention_dtype=jnp.bfloat16) -> VaeModel:
    """The model's structure with shapes and dtypes only: nothing is allocated."""
    return abstract_model(lambda: VaeModel(cfg, dtype=dtype, attention_dtype=attention_dtype))


def convert_vae(src, cfg: VaeConfig, dtype=jnp.bfloat16) -> dict[tuple, np.ndarray]:
    """Reads an upstream VAE safetensors file into {our path: numpy array in `dtype`}.

    Strict: a missing, unexpected or mis-shaped key raises convert.ConversionError naming it.
    Values are rounded to `dtype` once (upstream's `.bfloat16()` of the loaded model).
    """
    return convert_torch(src, vae_rules(cfg), abstract_vae(cfg, dtype))


def build_vae(cfg: VaeConfig, arrays: dict, dtype=jnp.bfloat16, attention_dtype=jnp.bfloat16) -> VaeModel:
    """A VaeModel whose parameters are `arrays` ({path: array}, e.g. from convert_vae)."""
    return build_model(abstract_vae(cfg, dtype, attention_dtype), arrays)


def find_vae_files(path) -> tuple[Path, Path]:
    """(config.json, weights) of a released VAE folder, or of a weights file and its folder."""
    from magi_jax.storage import local

    path = local(path, "VAE")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (found {[p.name for p in found]})")
            weights = found[0]
        return path / CONFIG_NAME, weights
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VAE folder or weights file")
    return path.parent / CONFIG_NAME, path


def load_vae(
    path,
    dtype=jnp.bfloat16,
    *,
    config: VaeConfig | None = None,
    attention_dtype=jnp.bfloat16,
    scale_factor: float = SCALE_FACTOR,
    tiles: TileConfig | None = None,
) -> Vae:
    """Loads upstream's VAE folder (config.json + diffusion_pytorch_model.safetensors), or a
    magi-jax checkpoint of it (convert_torch_weights.py --model vae).

    `path` may also be the weights file itself (config.json read from its folder unless
    `config` is given). `dtype` bfloat16 is what upstream's pipeline runs.
    """
    from magi_jax import checkpoint

    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path)
        config = config or VaeConfig.from_json_dict(meta["config"], str(path))
        stored = jnp.dtype(meta.get("dtype", "bfloat16"))
        expected = expected_leaves(abstract_vae(config, stored, attention_dtype))
        arrays = {p: a.astype(dtype) for p, a in checkpoint.restore(path, expected, "vae").items()}
        return Vae(build_vae(config, arrays, dtype, attention_dtype), scale_factor=scale_factor, tiles=tiles)
    config_path, weights = find_vae_files(path)
    if config is None:
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path}: the VAE's config.json is missing")
        config = VaeConfig.from_file(config_path)
    arrays = convert_vae(weights, config, dtype)
    model = build_vae(config, arrays, dtype, attention_dtype)
    return Vae(model, scale_factor=scale_factor, tiles=tiles)


def random_vae(cfg: VaeConfig = TINY, dtype=jnp.bfloat16, seed: int = 0, **kw) -> Vae:
    """A VAE with random weights (benchmarks, shape tests)."""
    return Vae(VaeModel(cfg, dtype=dtype, rngs=nnx.Rngs(seed)), **kw)
