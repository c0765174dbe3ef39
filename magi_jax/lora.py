"""Low-rank adapters (LoRA) on the DiT's linears: add, train, save, load, merge.

An adapter on a linear y = x @ W adds a low-rank path:  y = x @ W + (alpha / rank) * (x @ A) @ B,
A (F, r) random, B (r, O) zero (O: the kernel's axes other than F, see
layers.KERNEL_LAYOUTS), so a fresh adapter changes nothing (bit-equal outputs).
Adapters sit on the DiT layers' linears by name (`TARGET_GROUPS`):
  attn   q, k, v (self-attention projections) and proj (the output projection of self and
         cross attention, one matrix upstream)
  cross  qx (cross-attention query) and kv_xattn (cross-attention keys/values of the caption)
  mlp    fc1, fc2
Layers are stacked on a scanned axis, so each adapter's A and B carry that axis too:
A (Lr, F, r), B (Lr, r, O).

Adapter parameters are `LoRAParam`s, a Param subtype, so training selects them with an NNX
filter and the base weights stay untouched. An adapter is saved on its own (an orbax
checkpoint of A and B with `{"lora": LoRAConfig, "model_config": ...}` beside it), loaded onto
a model with `apply_lora` (unmerged: the trainer) or `merge_lora` (folded into the kernels:
generate and the merge command):

    python -m magi_jax.lora merge --config_file 4.5B_base --dit_ckpt W --lora A.lora:0.8 --out W2

fp8 layers cannot absorb a merge (their kernels are quantised); adapters refuse them.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.config import MagiConfig
from magi_jax.layers import Linear
from magi_jax.tensor_file import CheckpointError

f32 = jnp.float32
TARGET_GROUPS = {"attn": ("q", "k", "v", "proj"), "cross": ("qx", "kv_xattn"), "mlp": ("fc1", "fc2")}
ALL_TARGETS = tuple(n for group in TARGET_GROUPS.values() for n in group)
MODEL_KIND = "lora"


class LoRAError(ValueError):
    """An adapter that does not fit the model, or a bad adapter option."""


class LoRAParam(nnx.Param):
    """An adapter parameter (the only kind a LoRA fine-tune updates)."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: tuple = ALL_TARGETS  # linear names, see TARGET_GROUPS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def parse_targets(text: str) -> tuple:
        """'attn,mlp' or 'q,v' (group and linear names) -> linear names, checked."""
        out = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            names = TARGET_GROUPS.get(part, (part,))
            for n in names:
                if n not in ALL_TARGETS:
                    raise LoRAError(
                        f"unknown LoRA target {part!r}; use groups {', '.join(TARGET_GROUPS)} or linears "
                        f"{', '.join(ALL_TARGETS)}"
                    )
                if n not in out:
                    out.append(n)
        if not out:
            raise LoRAError("no LoRA targets given; e.g. --lora_targets attn,cross,mlp")
        return tuple(out)

    def check(self):
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        self.parse_targets(",".join(self.targets))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


class LoRALinear(nnx.Module):
    """A linear with an adapter: base(x) + scale * (x @ A) @ B, added in float32 and rounded
    once to the base output's dtype (so B = 0 leaves the output bit-equal)."""

    def __init__(self, base, a: LoRAParam, b: LoRAParam, scale: float):
        self.base, self.lora_a, self.lora_b = base, a, b
        self.scale = scale

    def __call__(self, x):
        y = self.base(x)
        low = jnp.matmul(x.astype(f32), self.lora_a[...].astype(f32))
        delta = jnp.tensordot(low, self.lora_b[...].astype(f32), axes=1) * f32(self.scale)  # B (r, *out)
        return (y.astype(f32) + delta).astype(y.dtype)


def _stacks(model):
    """(segment index, the segment's stacked DiTLayer) of every layer segment."""
    return [(i, seg.layers) for i, seg in enumerate(model.segments)]


def apply_lora(model, lcfg: LoRAConfig, seed: int = 0, scale: float = 1.0):
    """Wraps the target linears of `model` (in place) with fresh adapters; returns the model.

    A ~ N(0, 1/F) per layer (so x @ A keeps x's scale), B = 0. `scale` multiplies alpha/rank
    (the strength a user picks at load time).
    """
    lcfg.check()
    key = jax.random.key(seed)
    for seg, layers in _stacks(model):
        for name in lcfg.targets:
            base = getattr(layers, name)
            if isinstance(base, LoRALinear):
                raise LoRAError(f"layer linear {name!r} already has an adapter; merge it first (merge_lora)")
            if not isinstance(base, Linear):
                raise LoRAError(
                    f"{name} in layer segment {seg} is an fp8 linear; adapters need a bf16/fp32 model (not *_quant)"
                )
            kernel = base.kernel
            # (L, *kernel): the input features on the kernel's axis `in_axis` (layers.KERNEL_LAYOUTS);
            # A is (L, F, r), B (L, r, the kernel's other axes)
            at = 1 + base.in_axis
            lr, fin = kernel.shape[0], kernel.shape[at]
            out = tuple(n for i, n in enumerate(kernel.shape) if i not in (0, at))
            names = kernel.get_metadata().get("out_sharding") or ("layers",) + (None,) * (kernel.ndim - 1)
            key, sub = jax.random.split(key)
            a = (jax.random.normal(sub, (lr, fin, lcfg.rank), f32) * fin**-0.5).astype(f32)
            pa = LoRAParam(a, out_sharding=(names[0], names[at], None), eager_sharding=False)
            b_names = (names[0], None, *(n for i, n in enumerate(names) if i not in (0, at)))
            pb = LoRAParam(jnp.zeros((lr, lcfg.rank, *out), f32), out_sharding=b_names, eager_sharding=False)
            setattr(layers, name, LoRALinear(base, pa, pb, lcfg.scale * scale))
    return model


def adapter_arrays(model) -> dict:
    """{path: array} of the adapter parameters of a model built with apply_lora."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam))}


def save_lora(model, lcfg: LoRAConfig, config: MagiConfig, out, overwrite: bool = False) -> dict:
    """Writes the adapters of `model` (only them) as an orbax folder with their config."""
    from magi_jax import checkpoint

    flat = {p: np.asarray(jax.device_get(a)) for p, a in adapter_arrays(model).items()}
    if not flat:
        raise LoRAError("the model has no adapters to save (apply_lora first)")
    meta = {"lora": lcfg.to_dict(), "model_config": config.to_dict()["model_config"]}
    return checkpoint.save(flat, out, MODEL_KIND, meta, overwrite=overwrite)


def read_lora_config(path) -> tuple[LoRAConfig, dict]:
    from magi_jax import checkpoint

    try:
        meta = checkpoint.read_meta(path)
    except CheckpointError:
        raise LoRAError(
            f"{path} is not a LoRA adapter (no magi_jax.json / params/); write one with magi_jax.train"
        ) from None
    if meta.get("model") != MODEL_KIND:
        raise LoRAError(f"{path} holds a {meta.get('model')!r} checkpoint, not a LoRA adapter")
    return LoRAConfig.from_dict(meta["config"]["lora"]), meta["config"].get("model_config", {})


def check_compatible(path, config: MagiConfig) -> LoRAConfig:
    """The adapter's config, after checking it was trained for this model's shapes."""
    lcfg, stored = read_lora_config(path)
    ours = config.to_dict()["model_config"]
    shape_fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
    shape_fields += ("kv_channels", "caption_channels", "xattn_cond_hidden_ratio", "gated_linear_unit")
    diff = [k for k in shape_fields if stored.get(k) != ours.get(k)]
    if diff:
        raise LoRAError(
            f"{path} was trained for another model (differs in {', '.join(diff)}); pass the config it was made for"
        )
    if config.engine.fp8_quant:
        raise LoRAError("LoRA adapters cannot be applied to an fp8 (quant) model; use the bf16 variant of the config")
    return lcfg


def load_lora(model, path, config: MagiConfig, scale: float = 1.0):
    """Adds the adapter stored at `path` to `model` (unmerged, in place); returns (model, LoRAConfig)."""
    from magi_jax import checkpoint

    lcfg = check_compatible(path, config)
    apply_lora(model, lcfg, scale=scale)
    expected = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in adapter_arrays(model).items()}
    arrays = checkpoint.restore(path, expected, MODEL_KIND)
    state = nnx.state(model, LoRAParam)
    nnx.update(model, nnx.from_flat_state([(p, v.replace(value=arrays[p])) for p, v in nnx.to_flat_state(state)]))
    return model, lcfg


@functools.partial(jax.jit, static_argnums=4)
def _merged(kernel, a, b, scale, in_axis: int):
    delta = jnp.einsum("lfr,lr...->lf...", a.astype(f32), b.astype(f32)) * scale
    delta = jnp.moveaxis(delta, 1, 1 + in_axis)  # the input features where the kernel holds them
    return (kernel.astype(f32) + delta).astype(kernel.dtype)


def merge_lora(model, path, config: MagiConfig, scale: float = 1.0):
    """Folds the adapter at `path` into the model's kernels (in place): W += s * alpha/r * A @ B.

    Several adapters merge one after the other. The merged kernel keeps its dtype and its
    sharding (the update runs where the kernel lives)."""
    from magi_jax import checkpoint

    lcfg = check_compatible(path, config)
    probe = apply_lora(nnx.eval_shape(lambda: _structure(config)), lcfg)
    expected = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in adapter_arrays(probe).items()}
    arrays = checkpoint.restore(path, expected, MODEL_KIND)
    for seg, layers in _stacks(model):
        for name in lcfg.targets:
            lin = getattr(layers, name)
            a = arrays[("segments", seg, "layers", name, "lora_a")]
            b = arrays[("segments", seg, "layers", name, "lora_b")]
            k = lin.kernel[...]
            put = (lambda x, k=k: jax.device_put(x, k.sharding)) if hasattr(k, "sharding") else (lambda x: x)
            lin.kernel[...] = _merged(k, put(a), put(b), f32(lcfg.scale * scale), lin.in_axis)
    return model


def _structure(config: MagiConfig):
    from magi_jax.dit import DiT

    return DiT(config.model, fp8_quant=config.engine.fp8_quant, distill=config.engine.distill)


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale); a colon inside the path is kept."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    p = Path(path)
    if not p.exists():
        raise LoRAError(f"--lora {text!r}: {p} does not exist (write adapters with python -m magi_jax.train)")
    return p, scale


# ----------------------------------------------------------------------------- merge command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_jax.lora", description="Merge LoRA adapters into DiT weights.")
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write a DiT checkpoint with adapters folded in")
    m.add_argument("--config_file", required=True, help="variant name or upstream JSON config of the base model")
    m.add_argument("--dit_ckpt", required=True, help="base DiT weights (magi-jax checkpoint or upstream folder)")
    m.add_argument("--lora", action="append", required=True, help="PATH[:SCALE]; several allowed")
    m.add_argument("--out", required=True, help="the merged magi-jax checkpoint folder to write")
    m.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from magi_jax import checkpoint
    from magi_jax.config import ConfigError, load_config
    from magi_jax.dit_weights import load_dit

    try:
        config = load_config(args.config_file)
        adapters = [parse_lora_arg(t) for t in args.lora]
        for path, _ in adapters:
            check_compatible(path, config)
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise LoRAError(f"{out} already exists; choose another --out or pass --overwrite")
        model = load_dit(args.dit_ckpt, config)
        for path, scale in adapters:
            merge_lora(model, path, config, scale)
            print(f"merged {path} (scale {scale})", file=sys.stderr)
        flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
        meta = config.to_dict() | {"merged_lora": [f"{p}:{s}" for p, s in adapters]}
        checkpoint.save(flat, out, "dit", meta, overwrite=args.overwrite, dtype=config.model.params_dtype)
    except (LoRAError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
