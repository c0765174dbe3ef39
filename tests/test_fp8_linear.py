"""fp8 linears reproduce upstream's quantisation and scaling exactly (kind `fp8_linear`)."""

import ml_dtypes
import numpy as np
import parity
import pytest
from flax import nnx

from magi_jax.convert import IDENTITY, Rule, convert
from magi_jax.dit_weights import FP8_WEIGHT, _smooth_scale
from magi_jax.layers import Fp8Linear
from magi_jax.torch_weights import open_torch_weights


def _cases(fx):
    for case in fx.meta["cases"]:
        yield case["name"], case


def _load(fx, case) -> Fp8Linear:
    smoothed = case["class"] == "PerChannelQuantizedFp8Linear"
    layer = nnx.eval_shape(lambda: Fp8Linear(case["in_features"], case["out_features"], smoothed=smoothed))
    graphdef, state = nnx.split(layer)
    flat = nnx.to_flat_state(state)
    expected = {p: v.get_value() for p, v in flat}
    n = case["name"]
    rules = [
        Rule(f"{n}.weight", ("kernel",), FP8_WEIGHT, exact_dtype=True),
        Rule(f"{n}.weight_scale", ("weight_scale",), IDENTITY, exact_dtype=True),
        Rule(f"{n}.input_scale", ("input_scale",), IDENTITY, exact_dtype=True),
    ]
    if smoothed:
        rules.append(Rule(f"{n}.smooth_scale", ("smooth_scale",), _smooth_scale(), exact_dtype=True))
    ckpt = open_torch_weights(fx.weights)
    arrays = convert(ckpt, rules, expected, ignore=lambda k: not k.startswith(f"{n}."))
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(value=arrays[p])) for p, v in flat]))


@pytest.mark.parametrize("fx,case", parity.cases("fp8_linear", _cases))
def test_fp8_linear(fx, case):
    layer = _load(fx, case)
    n = case["name"]
    x = fx.arrays["x"].astype(ml_dtypes.bfloat16)  # upstream's input dtype
    np.testing.assert_array_equal(np.asarray(layer.quantize_input(x)).astype(np.float32), fx.arrays[f"{n}/x_fp8"])
    out = layer(x)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    parity.check_array(out, fx.arrays[f"{n}/out"], fx.meta["tolerance"][f"{n}/out"], f"{n} out")
