"""Every released DiT variant, shapes only (abstract arrays, no weights, well under a second each).

`released_keys(config)` is upstream's state dict of `VideoDiTModel` - every key with its shape
(and the fp8 dtype where the checkpoint must hold fp8) - written from upstream's module
definitions as the parity fixtures' README records them, and held to the recorded weights of
every `dit` fixture (tiny sizes of each variant). For the six released configs it gives the
released checkpoints' headers; the converter's key table must accept them exactly, and every
parameter must get a sharding from sharding.RULES.
"""

import jax
import ml_dtypes
import numpy as np
import parity
import pytest
from dit_fixtures import config_of
from flax import nnx

from magi_jax import sharding
from magi_jax.config import load_config
from magi_jax.convert import check, plan
from magi_jax.dit import FREQ_DIM, layer_segments
from magi_jax.dit_weights import abstract_dit, dit_rules
from magi_jax.tensor_file import TensorInfo
from magi_jax.torch_weights import open_torch_weights
from magi_jax.weights import expected_leaves

RELEASED = ["4.5B_base", "4.5B_distill", "4.5B_distill_quant", "24B_base", "24B_distill", "24B_distill_quant"]
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def released_keys(config) -> dict[str, tuple[tuple, np.dtype | None]]:
    """Upstream's DiT state dict: key -> (shape, dtype the file must hold, or None: any float)."""
    m = config.model
    d, cond, dh = m.hidden_size, m.cond_size, m.kv_channels
    q, kv = m.num_attention_heads * dh, m.num_query_groups * dh
    ffn = m.ffn_hidden_size
    patch_out = m.out_channels * m.t_patch_size * m.patch_size**2
    keys = {
        "x_embedder.weight": (d, m.in_channels, m.t_patch_size, m.patch_size, m.patch_size),
        "t_embedder.mlp.0.weight": (cond, FREQ_DIM),
        "t_embedder.mlp.0.bias": (cond,),
        "t_embedder.mlp.2.weight": (cond, cond),
        "t_embedder.mlp.2.bias": (cond,),
        "y_embedder.y_proj_xattn.0.weight": (m.xattn_size, m.caption_channels),
        "y_embedder.y_proj_xattn.0.bias": (m.xattn_size,),
        "y_embedder.y_proj_adaln.0.weight": (cond, m.caption_channels),
        "y_embedder.y_proj_adaln.0.bias": (cond,),
        "y_embedder.null_caption_embedding": (m.caption_max_length, m.caption_channels),
        "rope.bands": (m.rope_dim // 8,),
        "videodit_blocks.final_layernorm.weight": (d,),
        "videodit_blocks.final_layernorm.bias": (d,),
        "final_linear.linear.weight": (patch_out, d),
    }
    out = {k: (s, None) for k, s in keys.items()}
    linears = {  # name: (out, in, per-channel (smoothed) when quantised)
        "self_attention.linear_qkv.q": (q, d, False),
        "self_attention.linear_qkv.qx": (q, d, False),
        "self_attention.linear_qkv.k": (kv, d, False),
        "self_attention.linear_qkv.v": (kv, d, False),
        "self_attention.linear_proj": (d, 2 * q, True),
        "mlp.linear_fc1": (2 * ffn if m.gated_linear_unit else ffn, d, False),
        "mlp.linear_fc2": (d, ffn, True),
    }
    norms = {
        "self_attention.linear_qkv.layer_norm": d,
        "self_attention.q_layernorm": dh,
        "self_attention.k_layernorm": dh,
        "self_attention.q_layernorm_xattn": dh,
        "self_attention.k_layernorm_xattn": dh,
        "self_attn_post_norm": d,
        "mlp.layer_norm": d,
        "mlp_post_norm": d,
    }
    for first, count, quantized in layer_segments(m, config.engine.fp8_quant):
        for i in range(first, first + count):
            pre = f"videodit_blocks.layers.{i}."
            out[pre + "ada_modulate_layer.proj.0.weight"] = ((2 * d, cond), None)
            out[pre + "ada_modulate_layer.proj.0.bias"] = ((2 * d,), None)
            out[pre + "self_attention.linear_kv_xattn.weight"] = ((2 * kv, m.xattn_size), None)
            for name, size in norms.items():
                out[pre + name + ".weight"] = ((size,), None)
                out[pre + name + ".bias"] = ((size,), None)
            for name, (n_out, n_in, smoothed) in linears.items():
                if not quantized:
                    out[pre + name + ".weight"] = ((n_out, n_in), None)
                    continue
                f32 = np.dtype(np.float32)
                out[pre + name + ".weight"] = ((1, n_out, n_in), FP8)
                out[pre + name + ".weight_scale"] = ((1,), f32)
                out[pre + name + ".input_scale"] = ((1,) if smoothed else (n_in,), f32)
                if smoothed:
                    out[pre + name + ".smooth_scale"] = ((1, n_in), f32)
    return out


class Header:
    """A checkpoint of headers only: what the converter's check reads before any data."""

    def __init__(self, keys: dict):
        self._keys = keys
        self.duplicates = []

    def keys(self):
        return list(self._keys)

    def info(self, key):
        shape, dtype = self._keys[key]
        return TensorInfo(key, shape, dtype or np.dtype(ml_dtypes.bfloat16), None)


def _dit_fixtures(fx):
    yield "weights", fx


@pytest.mark.parametrize("fx,_", parity.cases("dit", _dit_fixtures))
def test_released_keys_match_recorded_upstream_weights(fx, _):
    """The schema equals upstream's real state dict (every key, shape, fp8 dtype) at fixture sizes."""
    want = released_keys(config_of(fx))
    weights = open_torch_weights(fx.weights)
    try:
        got = {k: weights.info(k) for k in weights.keys()}
    finally:
        weights.close()
    assert sorted(got) == sorted(want)
    for key, (shape, dtype) in want.items():
        assert tuple(got[key].shape) == shape, key
        if dtype is not None:
            assert got[key].dtype == dtype, key


@pytest.mark.parametrize("variant", RELEASED)
def test_key_table_covers_every_released_key_and_shape(variant):
    config = load_config(variant)
    keys = released_keys(config)
    expected = expected_leaves(abstract_dit(config))
    by_key = plan(dit_rules(config), expected)  # every parameter filled exactly once
    assert set(by_key) == set(keys)
    check(Header(keys), by_key, expected, source=variant)  # raises naming any key or shape it rejects


@pytest.mark.parametrize("variant", RELEASED)
def test_every_parameter_sharded_by_the_rules_table(variant):
    config = load_config(variant)
    mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)  # data x model x seq
    split = []
    for path, var in nnx.to_flat_state(nnx.state(abstract_dit(config))):
        names = var.get_metadata().get("out_sharding")
        value = var.get_value()
        assert names is not None and len(names) == value.ndim, path
        spec = sharding.spec(tuple(names), value.shape, mesh)  # raises for a name missing from RULES
        if "model" in tuple(spec):
            split.append(path[-2])
    # every matmul of the layers is split over the model axis (heads / MLP), in every segment
    segments = len(layer_segments(config.model, config.engine.fp8_quant))
    for name in ("q", "qx", "k", "v", "kv_xattn", "proj", "fc1", "fc2"):
        assert split.count(name) >= segments, (name, split.count(name))
