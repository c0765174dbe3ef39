"""Building blocks shared by the DiT: linears (plain and fp8), layer norms, activations.

Precision follows upstream's mixed scheme, which the parity fixtures pin down:
  * a Linear may compute in a wider dtype than it stores (upstream's float32 autocast
    around the output projection and the embedders): `compute_dtype`;
  * matmuls accumulate in float32 and round once to the output dtype (what torch/cuBLAS do
    for bf16 GEMMs);
  * norms compute in float32 and round once.

Parameters carry logical axis names (`out_sharding` metadata) that sharding.py maps to
mesh axes. Axis letters in shapes: S tokens, D hidden, F features in, O features out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # finfo(float8_e4m3fn).max


def param(rngs: nnx.Rngs | None, shape, dtype, axes, init="normal", scale=0.02) -> nnx.Param:
    """A parameter with logical axis names. Random inits fall back to zeros without rngs
    (models built only to receive loaded weights)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif rngs is None or init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    # Logical names only: placement is decided by sharding.py from one rules table, not eagerly.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def precision(dtype):
    """A matmul's precision for operands of `dtype`. float32 operands multiply in full float32,
    as upstream computes them: TPUs (and GPUs with TF32) otherwise run float32 matmuls as
    bfloat16 passes. 16-bit operands are exact at the default (fp8 values too, as bf16)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def matmul(x, w, out_dtype, compute_dtype=None, in_axis: int = 0):
    """x (..., F) times w over w's axis `in_axis` (F) -> (..., w's other axes), with float32
    accumulation, inputs cast to `compute_dtype` (default: x's dtype). See KERNEL_LAYOUTS."""
    cd = compute_dtype or x.dtype
    dims = (((x.ndim - 1,), (in_axis,)), ((), ()))
    y = jax.lax.dot_general(
        x.astype(cd), w.astype(cd), dims, preferred_element_type=jnp.float32, precision=precision(cd)
    )
    return y.astype(out_dtype)


# How a kernel is held; the layout XLA wants for each use, so that a TPU program does not copy
# every layer's kernels into another layout ahead of the layer loop:
#   "in_out"  (F, O), the default
#   "out_in"  (O, F), torch's own layout: projections into attention heads (q, k, v, the
#             cross-attention's), whose output a TPU program produces head-major for the
#             attention kernel (4.5B_distill on v5e-8 seq=8 copied the stacks, 2 GiB, as (F, O))
#   "halves"  (2, F, O / 2), a [gate | up] kernel (SwiGLU's fc1), O / 2 split over the output
#             axis's mesh axis so each device holds the gate and up columns of the same
#             features. As (F, O) a `model` split in contiguous column blocks puts gates and
#             ups on different devices, and pairing them moved every token's hidden layer
#             between devices (13 GiB of float32 copies in the 24B step on v5p-8); as
#             (F, 2, O / 2) a TPU tiles the pair as rows, and XLA copied all 48 layers' kernels
#             into (2, F, O / 2) (4.5 GiB). Output (..., 2, O / 2).
KERNEL_LAYOUTS = ("in_out", "out_in", "halves")


def kernel_shape(fin: int, fout: int, axes: tuple, layout: str = "in_out") -> tuple[tuple, tuple, int]:
    """(shape, logical axes, axis of the input features) of a kernel held in `layout`."""
    if layout == "in_out":
        return (fin, fout), tuple(axes), 0
    if layout == "out_in":
        return (fout, fin), (axes[1], axes[0]), 1
    if layout == "halves":
        return (2, fin, fout // 2), (None, axes[0], axes[1]), 1
    raise ValueError(f"kernel layout {layout!r}; one of {KERNEL_LAYOUTS}")


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (F, O), the transpose of torch's (O, F) weight, or held
    in another of KERNEL_LAYOUTS."""

    def __init__(
        self,
        fin: int,
        fout: int,
        *,
        dtype,
        axes=("embed", "mlp"),
        bias=False,
        compute_dtype=None,
        layout: str = "in_out",
        rngs: nnx.Rngs | None = None,
    ):
        if bias and layout == "halves":
            raise ValueError("a [gate | up] kernel held as halves takes no bias")
        # LeCun-normal so that random (untrained) models propagate signal through every layer
        shape, kernel_axes, self.in_axis = kernel_shape(fin, fout, axes, layout)
        self.kernel = param(rngs, shape, dtype, kernel_axes, scale=fin**-0.5)
        self.bias = param(None, (fout,), dtype, axes[1:]) if bias else None
        self.compute_dtype = compute_dtype

    def __call__(self, x):
        cd = self.compute_dtype or x.dtype
        y = matmul(x, self.kernel[...], jnp.float32, cd, self.in_axis)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(cd)


class Fp8Linear(nnx.Module):
    """MAGI-1's fp8 linears (per-tensor and per-channel-smoothed), with their exact rounding.

    Activations: fp8(bf16(clamp(float(x) / divisor, +-448))) - two roundings - where the
    divisor is `input_scale` (per-tensor layers, a vector) or `smooth_scale` (per-channel
    layers). The product is scaled by input_scale[0] * weight_scale[0] only: upstream hands
    both to cuBLASLt as scalar pointers, so the rest of a vector input_scale is never applied.
    The product multiplies the fp8 values as bfloat16 (exact: fp8 e4m3 fits bf16's mantissa
    and range) with float32 accumulation, so every backend runs it as a 16-bit matmul and
    none needs an fp8 one; the products of two such values are exact in float32.
    """

    def __init__(
        self,
        fin: int,
        fout: int,
        *,
        smoothed: bool,
        axes=("embed", "mlp"),
        layout: str = "in_out",
        rngs: nnx.Rngs | None = None,
    ):
        shape, kernel_axes, self.in_axis = kernel_shape(fin, fout, axes, layout)
        self.kernel = param(None, shape, FP8, kernel_axes)
        self.weight_scale = param(None, (1,), jnp.float32, (None,), init="ones")
        self.input_scale = param(
            None, (1,) if smoothed else (fin,), jnp.float32, (None,) if smoothed else axes[:1], init="ones"
        )
        self.smooth_scale = param(None, (fin,), jnp.float32, axes[:1], init="ones") if smoothed else None
        if rngs is not None:  # random fp8 weights for untrained models: LeCun-normal, quantised
            w = fin**-0.5 * jax.random.normal(rngs.params(), shape, jnp.float32)
            self.weight_scale[...] = jnp.max(jnp.abs(w)).reshape(1) / FP8_MAX
            self.kernel[...] = (w / self.weight_scale[...]).astype(FP8)

    def quantize_input(self, x):
        divisor = self.smooth_scale[...] if self.smooth_scale is not None else self.input_scale[...]
        q = jnp.clip(x.astype(jnp.float32) / divisor, -FP8_MAX, FP8_MAX)
        return q.astype(jnp.bfloat16).astype(FP8)

    def __call__(self, x):
        xq = self.quantize_input(x)
        acc = matmul(xq, self.kernel[...], jnp.float32, jnp.bfloat16, self.in_axis)
        scale = self.input_scale[...][0] * self.weight_scale[...][0]
        return (acc * scale).astype(jnp.bfloat16)


def linear(fin, fout, *, quantized=False, smoothed=False, layout="in_out", dtype, axes, rngs=None, **kw):
    """A plain Linear, or the fp8 one used inside quantised layers."""
    if quantized:
        return Fp8Linear(fin, fout, smoothed=smoothed, axes=axes, layout=layout, rngs=rngs)
    return Linear(fin, fout, dtype=dtype, axes=axes, layout=layout, rngs=rngs, **kw)


class LayerNorm(nnx.Module):
    """LayerNorm with bias; `zero_centered` stores gamma - 1 (upstream's fused norms with
    apply_layernorm_1p). gamma = weight + 1 is formed in the parameter dtype, as upstream does."""

    def __init__(self, dim: int, *, eps: float, dtype, zero_centered: bool, axes=("embed",), rngs=None):
        self.weight = param(None, (dim,), dtype, axes, init="zeros" if zero_centered else "ones")
        self.bias = param(None, (dim,), dtype, axes, init="zeros")
        self.eps = eps
        self.zero_centered = zero_centered

    def __call__(self, x):
        gamma = self.weight[...]
        if self.zero_centered:
            gamma = gamma + jnp.asarray(1, gamma.dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * gamma.astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def gelu(x):
    """torch's default (erf) GELU, float32 math, one rounding."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def silu_and_mul(x):
    """SwiGLU on x (..., 2, F), [gate, up] (a "halves" linear's output, see KERNEL_LAYOUTS):
    silu(gate) * up, float32 math, one rounding."""
    gate, up = x[..., 0, :].astype(jnp.float32), x[..., 1, :].astype(jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def softcap(x, cap: float):
    return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


# ----------------------------------------------------------------------------- stacked layers


def stack_layers(make, count: int, rngs=None):
    """`count` copies of the layer `make(rngs)` builds, parameters on a leading axis named
    "layers" (sharding.RULES replicates it), ready for `scan_layers`. rngs None: abstract or
    to-be-filled layers (make gets None)."""
    vmap = dict(in_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    if rngs is None:
        return nnx.vmap(lambda _: make(None), **vmap)(jnp.arange(count))
    return nnx.split_rngs(splits=count)(nnx.vmap(make, **vmap))(rngs)


def scan_layers(layers, body, carry, xs=None, name: str = "layer"):
    """Runs stacked `layers` in order with one lax.scan: `body(layer, carry, x) -> (carry, y)`
    per layer, x the layer's slice of `xs`. Returns (carry, ys). One compiled layer body,
    whatever the depth; `name` is the layer's scope in profiles."""
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        with jax.named_scope(name):
            return body(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(step, carry, (state, xs))
