"""The DiT's upstream key table and loading a released checkpoint into our model.

Upstream loads `<load>/inference_weight[.fp8][.distill]/model.safetensors` (or the shards of
`model.safetensors.index.json`, optionally `.zst`) straight into `VideoDiTModel`'s module
names. Each rule below names one such key, the leaf of our parameter tree it fills and the
layout change:
  * nn.Linear (out, in) -> kernel (in, out), except where our kernel is held otherwise
    (layers.KERNEL_LAYOUTS): the projections into heads (q, qx, k, v, kv_xattn) stay
    (out, in), SwiGLU's fc1 becomes (2, in, out / 2);
  * Conv3d (D, C, pt, p, p) with stride = kernel -> a linear over flattened patches;
  * fp8 linears: weight (1, out, in) float8 -> kernel (in, out), scales as stored (the
    smooth scale (1, in) -> (in,));
  * the attention output projection's input features are reordered from upstream's
    tensor-parallel-8 layout to a plain [self | cross] concatenation (see dit.py).
Per-layer keys are stacked on the scanned layer axis of their segment.
"""

from __future__ import annotations

import numpy as np

from magi_jax.config import MagiConfig
from magi_jax.convert import IDENTITY, LINEAR, Rule, Transform
from magi_jax.dit import DiT, layer_segments, output_projection_order
from magi_jax.tensor_file import CheckpointError
from magi_jax.weights import abstract_model, build_model, convert_torch, expected_leaves

FP8_WEIGHT = Transform("fp8 weight (1,out,in)->(in,out)", lambda a: a[0].T, lambda s: (1, s[1], s[0]))
FP8_OUT_IN = Transform("fp8 weight (1,out,in)->(out,in)", lambda a: a[0], lambda s: (1, *s))
# SwiGLU's fc1 stores [gate | up] output rows (2 * O, in); we hold (2, in, O) (layers.kernel_shape)
LINEAR_HALVES = Transform(
    "linear, [gate | up] -> (2,in,out/2)",
    lambda a: a.reshape(2, -1, a.shape[1]).transpose(0, 2, 1),
    lambda s: (2 * s[2], s[1]),
)
FP8_HALVES = Transform(
    "fp8 weight (1,[gate | up],in) -> (2,in,out/2)",
    lambda a: a[0].reshape(2, -1, a.shape[2]).transpose(0, 2, 1),
    lambda s: (1, 2 * s[2], s[1]),
)


def _patch_embed(cfg) -> Transform:
    c, pt, p = cfg.in_channels, cfg.t_patch_size, cfg.patch_size
    return Transform("conv3d->linear", lambda a: a.reshape(a.shape[0], -1).T, lambda s: (s[1], c, pt, p, p))


def _permuted_rows(perm, fp8: bool) -> Transform:
    """A kernel whose input features upstream feeds in `perm` order."""
    if fp8:
        return Transform("fp8 weight, reordered inputs", lambda a: a[0].T[perm], lambda s: (1, s[1], s[0]))
    return Transform("linear, reordered inputs", lambda a: a.T[perm], lambda s: (s[1], s[0]))


def _smooth_scale(perm=None) -> Transform:
    take = (lambda a: a[0]) if perm is None else (lambda a: a[0][perm])
    return Transform("smooth scale (1,in)->(in,)", take, lambda s: (1, s[0]))


def dit_rules(config: MagiConfig) -> list[Rule]:
    cfg = config.model
    rules = [
        Rule("x_embedder.weight", ("x_embedder", "kernel"), _patch_embed(cfg)),
        Rule("t_embedder.mlp.0.weight", ("t_embedder", "fc1", "kernel"), LINEAR),
        Rule("t_embedder.mlp.0.bias", ("t_embedder", "fc1", "bias")),
        Rule("t_embedder.mlp.2.weight", ("t_embedder", "fc2", "kernel"), LINEAR),
        Rule("t_embedder.mlp.2.bias", ("t_embedder", "fc2", "bias")),
        Rule("y_embedder.y_proj_xattn.0.weight", ("y_embedder", "xattn", "kernel"), LINEAR),
        Rule("y_embedder.y_proj_xattn.0.bias", ("y_embedder", "xattn", "bias")),
        Rule("y_embedder.y_proj_adaln.0.weight", ("y_embedder", "adaln", "kernel"), LINEAR),
        Rule("y_embedder.y_proj_adaln.0.bias", ("y_embedder", "adaln", "bias")),
        Rule("y_embedder.null_caption_embedding", ("y_embedder", "null_caption")),
        Rule("rope.bands", ("rope_bands",)),
        Rule("videodit_blocks.final_layernorm.weight", ("final_norm", "weight")),
        Rule("videodit_blocks.final_layernorm.bias", ("final_norm", "bias")),
        Rule("final_linear.linear.weight", ("final_linear", "kernel"), LINEAR),
    ]
    perm = output_projection_order(cfg.num_attention_heads * cfg.kv_channels)
    for seg, (first, count, quant) in enumerate(layer_segments(cfg, config.engine.fp8_quant)):
        rules += _layer_rules(seg, range(first, first + count), quant, perm, cfg.gated_linear_unit)
    return rules


def _layer_rules(seg: int, layers: range, quant: bool, perm, glu: bool) -> list[Rule]:
    """Rules of one segment of identical layers (stacked on the segment's layer axis)."""
    rules = []

    def add(torch_name, ours, transform=IDENTITY, exact=False):
        path = ("segments", seg, "layers", *ours)
        rules.append(Rule(f"videodit_blocks.layers.{{i}}.{torch_name}", path, transform, layers, exact))

    def add_linear(torch_name, ours, smoothed=False, layout="in_out"):
        """`layout`: how our kernel is held (layers.KERNEL_LAYOUTS); "out_in" is torch's own."""
        plain = {"in_out": LINEAR, "out_in": IDENTITY, "halves": LINEAR_HALVES}[layout]
        fp8 = {"in_out": FP8_WEIGHT, "out_in": FP8_OUT_IN, "halves": FP8_HALVES}[layout]
        if not quant:
            add(f"{torch_name}.weight", (ours, "kernel"), plain)
            return
        add(f"{torch_name}.weight", (ours, "kernel"), fp8, exact=True)
        add(f"{torch_name}.weight_scale", (ours, "weight_scale"), exact=True)
        add(f"{torch_name}.input_scale", (ours, "input_scale"), exact=True)
        if smoothed:
            add(f"{torch_name}.smooth_scale", (ours, "smooth_scale"), _smooth_scale(), exact=True)

    def add_norm(torch_name, ours):
        add(f"{torch_name}.weight", (ours, "weight"))
        add(f"{torch_name}.bias", (ours, "bias"))

    add("ada_modulate_layer.proj.0.weight", ("ada", "kernel"), LINEAR)
    add("ada_modulate_layer.proj.0.bias", ("ada", "bias"))
    add_norm("self_attention.linear_qkv.layer_norm", "attn_norm")
    for name in ("q", "qx", "k", "v"):
        add_linear(f"self_attention.linear_qkv.{name}", name, layout="out_in")
    add("self_attention.linear_kv_xattn.weight", ("kv_xattn", "kernel"))  # (out, in), as torch
    if quant:
        proj = "self_attention.linear_proj"
        add(f"{proj}.weight", ("proj", "kernel"), _permuted_rows(perm, True), exact=True)
        add(f"{proj}.weight_scale", ("proj", "weight_scale"), exact=True)
        add(f"{proj}.input_scale", ("proj", "input_scale"), exact=True)
        add(f"{proj}.smooth_scale", ("proj", "smooth_scale"), _smooth_scale(perm), exact=True)
    else:
        add("self_attention.linear_proj.weight", ("proj", "kernel"), _permuted_rows(perm, False))
    add_norm("self_attention.q_layernorm", "q_norm")
    add_norm("self_attention.k_layernorm", "k_norm")
    add_norm("self_attention.q_layernorm_xattn", "q_norm_x")
    add_norm("self_attention.k_layernorm_xattn", "k_norm_x")
    add_norm("self_attn_post_norm", "attn_post_norm")
    add_norm("mlp.layer_norm", "mlp_norm")
    add_linear("mlp.linear_fc1", "fc1", layout="halves" if glu else "in_out")
    add_linear("mlp.linear_fc2", "fc2", smoothed=True)
    add_norm("mlp_post_norm", "mlp_post_norm")
    return rules


def abstract_dit(config: MagiConfig) -> DiT:
    """The model's structure with shapes and dtypes only: nothing is allocated."""
    e = config.engine
    return abstract_model(lambda: DiT(config.model, fp8_quant=e.fp8_quant, distill=e.distill))


def convert_dit(src, config: MagiConfig, progress=None) -> dict[tuple, np.ndarray]:
    """Reads an upstream DiT checkpoint (file or folder) into {our path: numpy array}."""
    return convert_torch(src, dit_rules(config), abstract_dit(config), progress=progress)


def build_dit(config: MagiConfig, arrays: dict, shardings: dict | None = None) -> DiT:
    """A DiT whose parameters are `arrays` ({path: array}, e.g. from convert_dit).

    With `shardings` ({path: Sharding}) each host array goes straight into its shards, so
    no device ever holds a whole copy of a sharded weight.
    """
    return build_model(abstract_dit(config), arrays, shardings)


def _variant_flags(distill: bool, fp8: bool) -> str:
    return ("fp8 " if fp8 else "") + ("distilled" if distill else "base")


def check_weight_kind(path, config: MagiConfig) -> None:
    """Refuses weights made for another variant than `config` (base vs distill, bf16 vs fp8).

    Base and distilled weights have the same keys and shapes, so only where they came from
    tells them apart: the released folder name (`inference_weight[.fp8][.distill]`) or the
    engine config a converted checkpoint was written with.
    """
    from magi_jax import checkpoint
    from magi_jax.storage import location

    path = location(path)
    ours = (config.engine.distill, config.engine.fp8_quant)
    if checkpoint.is_checkpoint(path):
        engine = checkpoint.read_meta(path).get("config", {}).get("engine_config")
        if engine is None:
            return
        theirs = (bool(engine.get("distill")), bool(engine.get("fp8_quant")))
        origin = "was converted for"
    else:
        name = path.name if path.is_dir() else path.parent.name
        parts = name.split(".")
        if parts[0] != "inference_weight":
            return  # a folder of the user's own naming: nothing to go by
        theirs = ("distill" in parts[1:], "fp8" in parts[1:])
        origin = "holds"
    if theirs != ours:
        raise CheckpointError(
            f"{path} {origin} {_variant_flags(*theirs)} weights, but the config is a {_variant_flags(*ours)} model "
            f"(engine_config.distill={ours[0]}, fp8_quant={ours[1]}, cfg_number={config.runtime.cfg_number}); "
            f"pass the config these weights belong to, or the {_variant_flags(*ours)} weights"
        )


def load_dit(path, config: MagiConfig, mesh=None, progress=None) -> DiT:
    """A DiT from a magi-jax checkpoint folder, or straight from upstream safetensors.

    Parameters land in the layout sharding.RULES gives on `mesh` (one device when None):
    an orbax checkpoint is restored into it, upstream weights are converted on the host
    (one copy of the model) and sent shard by shard.
    """
    from magi_jax import checkpoint, sharding
    from magi_jax.storage import local

    check_weight_kind(path, config)
    abstract = abstract_dit(config)
    expected = expected_leaves(abstract)
    shardings = sharding.shardings(abstract, mesh) if mesh is not None else None
    if checkpoint.is_checkpoint(path):
        stored = checkpoint.read_meta(path).get("config", {}).get("model_config")
        ours = config.to_dict()["model_config"]
        if stored is not None and stored != ours:
            diff = sorted(k for k in ours if stored.get(k) != ours[k])
            raise CheckpointError(
                f"{path} was converted for another model config (differs in {', '.join(diff)}); "
                f"convert the weights for this config or pass the config they were made with"
            )
        arrays = checkpoint.restore(path, expected, "dit", shardings)
    else:
        arrays = convert_torch(local(path, "DiT"), dit_rules(config), abstract, progress=progress)
    return build_model(abstract, arrays, shardings)  # the structure traced once
