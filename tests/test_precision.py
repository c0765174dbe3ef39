"""What the programs ask the compiler for, read from their lowered StableHLO (any backend).

TPUs (and GPUs with TF32) run a float32 matmul at the default precision as bfloat16 passes,
while upstream computes its float32 parts (embedders, final linear, T5) in float32: those
matmuls must ask for HIGHEST. 16-bit matmuls accumulate in float32. fp8 layers multiply
their fp8 values as bfloat16 (exact), not as float32. The programs are lowered under the
default precision: the test session's process-wide `highest` would hide a missing request.
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import aot, sharding, t5
from magi_jax.config import load_config
from magi_jax.layers import Fp8Linear


def _dots(text: str) -> Counter:
    """(operand and result element types, precision) of every dot_general in a lowered program."""
    found = Counter()
    for line in text.splitlines():
        if "dot_general" not in line:
            continue
        types = tuple(re.findall(r"tensor<(?:[0-9?]+x)*(\w+)>", line.rsplit(" : ", 1)[-1]))
        asked = re.search(r"precision = \[(\w+), (\w+)\]", line)
        found[(types, asked.group(1) if asked else "DEFAULT")] += 1
    return found


def _lowered(fn, *args) -> str:
    with jax.default_matmul_precision("default"):
        return jax.jit(fn).lower(*args).as_text()


def _window_program(**model) -> Counter:
    cfg = load_config("tiny").replace(runtime=dict(num_frames=16, num_steps=4), model=model)
    mesh = sharding.make_mesh({"seq": 1}, jax.devices()[:1])
    p = aot.sampler_programs(cfg, mesh, "xla", prefix_frames=0)[0]
    with jax.default_matmul_precision("default"), jax.set_mesh(mesh):
        return _dots(p.jitted.lower(*p.args).as_text())


def test_a_bf16_model_runs_its_float32_parts_at_full_precision():
    dots = _window_program(params_dtype="bfloat16")
    f32 = {k: n for k, n in dots.items() if k[0][:2] == ("f32", "f32")}
    bf16 = {k: n for k, n in dots.items() if k[0][:2] == ("bf16", "bf16")}
    assert f32 and bf16, dots  # the embedders and final linear; the layers
    assert all(precision == "HIGHEST" for (_, precision) in f32), f32
    assert all(types == ("bf16", "bf16", "f32") for (types, _) in bf16), bf16  # float32 accumulation
    assert set(dots) == set(f32) | set(bf16), dots


def test_fp8_layers_multiply_as_bf16_with_float32_accumulation():
    layer = Fp8Linear(64, 32, smoothed=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.bfloat16)
    dots = _dots(_lowered(lambda m, v: m(v), layer, x))
    assert dots == Counter({(("bf16", "bf16", "f32"), "DEFAULT"): 1}), dots
    # exact: the same product as on the dequantised float32 values
    xq = layer.quantize_input(x).astype(jnp.float32)
    want = (xq @ layer.kernel[...].astype(jnp.float32)) * layer.input_scale[...][0] * layer.weight_scale[...][0]
    np.testing.assert_array_equal(np.asarray(layer(x), np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))


def test_the_float32_text_encoder_runs_at_full_precision():
    model = t5.T5Encoder(t5.TINY, jnp.float32, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 16), jnp.int32)
    dots = _dots(_lowered(lambda m, i: m(i, i), model, ids))
    assert dots and all(types[:2] == ("f32", "f32") and p == "HIGHEST" for (types, p) in dots), dots
