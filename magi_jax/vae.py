"""MAGI-1's transformer VAE (upstream `ViTVAE`): pixels <-> latents, and loading it.

Data path:
  encode  video (B, 3, T, H, W) in [-1, 1] -> Conv3d patches (pt x p x p, stride = kernel)
          -> tokens (B, t*h*w, D) -> [cls | tokens] + position embedding (resized to the
          grid) -> blocks -> LayerNorm -> Linear -> drop cls -> moments (B, 2z, t, h, w);
          the posterior's mode is the first z channels.
  decode  latent (B, z, t, h, w) -> Linear per token -> [cls | tokens] + position embedding
          -> blocks -> LayerNorm -> drop cls -> unpatchify to (B, Cu, T, H, W) with
          Cu = D / (pt*p*p) -> Conv3d 3x3x3 -> frames (B, 3, T, H, W).
  block   x + proj(attention(norm(qkv(x)))), then x + fc2(gelu(fc1(LayerNorm(x)))).
          With `ln_in_attn` (released) there is no pre-attention LayerNorm; instead q, k
          and v are each normalised per head, (x - mean) / (std + 1e-5), biased std, no
          affine parameters.

Precision is upstream's: every op computes in float32 and rounds its output to the model
dtype (`dtype`: bfloat16 in the pixel pipeline, as upstream's `.bfloat16()` VAE); linears
and convs take their inputs in the model dtype; q, k, v are cast to bfloat16 before
attention whatever the model dtype (upstream feeds them to flash-attention);
`attention_dtype=float32` is offered for a higher-precision mode. One asymmetry matters:
upstream decodes under torch.autocast(bfloat16) but encodes without it, and autocast runs
the trilinear resize in float32, so when the latent grid differs from the stored position
grid the decoder's residual stream (embedding + position, and every residual sum) is
float32, while the encoder's stays in the model dtype (`_Trunk.autocast`). And torch fuses a
Linear's bias into the matmul (one rounding) only for contiguous inputs: the decoder's
first Linear reads a strided view of the latent whenever the latent's (t, h, w) flatten
without a copy, and then rounds the product and the bias sum separately (`strided`).

A single frame (T == 1, the image path) is repeated to 4 frames and the first latent frame
kept; a single latent frame decodes to a single frame (the first of its pt frames).

The blocks are stacked on a leading layer axis and run with `lax.scan`. vae_runtime.Vae
wraps the model with its jitted calls and the tiled pixel pipeline; vae_weights.load_vae
reads one.

Shapes: B batch, T/H/W frames/height/width in pixels, t/h/w the latent grid, D width,
N tokens, Hd heads, Dh head dim, M MLP width, z latent channels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.layers import LayerNorm, Linear, gelu, param, scan_layers, stack_layers

f32 = jnp.float32
IMAGE_REPEAT = 4  # upstream repeats a lone frame to 4 frames (hard-coded, not patch_length)
QKV_NORM_EPS = 1e-5
LOGVAR_RANGE = (-30.0, 20.0)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class VaeConfigError(ValueError):
    """A VAE config.json that upstream would reject, or that uses options we do not port."""


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaeConfig:
    """The `ddconfig` of upstream's ViTVAE config.json (field names kept), plus the norm eps.

    Defaults are upstream's constructor defaults, used for keys a config.json leaves out.
    """

    video_size: int = 256  # H = W the position embedding was trained for
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 4
    double_z: bool = True
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None  # accepted and ignored, as upstream does (flash uses 1/sqrt(Dh))
    drop_rate: float = 0.0  # dropout rates do nothing at inference
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    with_cls_token: bool = True
    norm_code: bool = False
    ln_in_attn: bool = False
    conv_last_layer: bool = False
    use_rope: bool = False
    use_final_proj: bool = False
    norm_eps: float = 1e-5  # nn.LayerNorm's default; not part of ddconfig

    def __post_init__(self):
        problems = []
        if not self.conv_last_layer:
            problems.append("conv_last_layer must be true (upstream's decoder only supports the Conv3d last layer)")
        if not self.with_cls_token:
            problems.append("with_cls_token false is not supported (upstream's position-embedding resize assumes it)")
        if self.use_rope:
            problems.append("use_rope true is not ported (the released VAE does not use it)")
        if self.use_final_proj:
            problems.append("use_final_proj true is not ported (the released VAE does not use it)")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % self.patch_volume or self.embed_dim < self.patch_volume:
            problems.append(
                f"embed_dim {self.embed_dim} must be a multiple of patch_length*patch_size^2 = {self.patch_volume}"
            )
        if self.video_size % self.patch_size or self.video_length % self.patch_length:
            problems.append("video_size / video_length must be multiples of patch_size / patch_length")
        if problems:
            raise VaeConfigError("unsupported VAE config: " + "; ".join(problems))

    @property
    def patch_volume(self) -> int:
        return self.patch_length * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def moment_channels(self) -> int:
        return 2 * self.z_chans if self.double_z else self.z_chans

    @property
    def unpatch_channels(self) -> int:
        return self.embed_dim // self.patch_volume

    @property
    def pos_grid(self) -> tuple[int, int, int]:
        """(t, h, w) latent grid the stored position embedding covers."""
        s = self.video_size // self.patch_size
        return (self.video_length // self.patch_length, s, s)

    def replace(self, **changes) -> VaeConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "VAE config") -> VaeConfig:
        """Reads upstream's config.json content: `_class_name` ViTVAE, `ddconfig`, `model_type`."""
        if data.get("_class_name") != "ViTVAE":
            raise VaeConfigError(f"{source}: _class_name is {data.get('_class_name')!r}, expected 'ViTVAE'")
        if data.get("model_type", "vit") != "vit":
            raise VaeConfigError(f"{source}: model_type {data.get('model_type')!r} is not supported (only 'vit')")
        dd = data.get("ddconfig")
        if not isinstance(dd, dict):
            raise VaeConfigError(f"{source}: no 'ddconfig' object")
        names = {f.name for f in dataclasses.fields(cls)} - {"norm_eps"}
        unknown = sorted(set(dd) - names)
        if unknown:
            raise VaeConfigError(f"{source}: unknown ddconfig keys {unknown}")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dd.items():
            kind = kinds[key]
            if kind == "bool" and not isinstance(value, bool):
                raise VaeConfigError(f"{source}: ddconfig.{key} must be true/false, got {value!r}")
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise VaeConfigError(f"{source}: ddconfig.{key} must be an integer, got {value!r}")
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise VaeConfigError(f"{source}: ddconfig.{key} must be a number, got {value!r}")
            values[key] = float(value) if kind == "float" else value
        try:
            return cls(**values)
        except VaeConfigError as e:
            raise VaeConfigError(f"{source}: {e}") from None

    def to_json_dict(self) -> dict:
        """Upstream's config.json layout (what `from_json_dict` reads)."""
        dd = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "norm_eps"}
        return {"_class_name": "ViTVAE", "ddconfig": dd, "model_type": "vit"}

    @classmethod
    def from_file(cls, path) -> VaeConfig:
        path = Path(path)
        return cls.from_json_dict(json.loads(path.read_text()), source=str(path))


# The released MAGI-1 VAE (ckpt/vae/config.json): 8x8 spatial, 4x temporal, 16 latent channels.
RELEASED = VaeConfig(
    video_size=256,
    video_length=16,
    patch_size=8,
    patch_length=4,
    z_chans=16,
    double_z=True,
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_ratio=4.0,
    qkv_bias=True,
    with_cls_token=True,
    ln_in_attn=True,
    conv_last_layer=True,
)

# The released patch size and latent channels at a toy width, for tests of the VAE itself.
TINY = RELEASED.replace(video_size=64, video_length=8, embed_dim=256, depth=1, num_heads=4, mlp_ratio=0.5)

# The tiny variant's VAE (the bundled one, trained by world_model.py on the procedural world,
# and the random one of `--random_weights`): 4x4-pixel, 4-frame patches to 4 latent channels
# (the released 48x compression) at width 256. The decoder unpatchifies each token's D values
# into D / (pt*p*p) channels per pixel before its last conv: the released 8x8 patch at this
# width (TINY) leaves one channel, from which a linear conv draws every colour along one line
# in RGB - no training makes it draw a red and a blue ball; 4x4 patches leave four.
WORLD = RELEASED.replace(
    video_size=64, video_length=8, patch_size=4, z_chans=4, embed_dim=256, depth=1, num_heads=4, mlp_ratio=2.0
)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def qkv_norm(x):
    """Upstream's parameter-free per-head norm (x - mean) / (std + eps), biased std.

    Each step rounds to x's dtype, as the eager torch ops do (mean, std, difference, the
    eps sum and the quotient); statistics are computed from x in float32.
    """
    dt = x.dtype
    xf = x.astype(f32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)).astype(dt)
    diff = (xf - mean.astype(dt).astype(f32)).astype(dt)
    denom = (std.astype(f32) + QKV_NORM_EPS).astype(dt)
    return (diff.astype(f32) / denom.astype(f32)).astype(dt)


def attention(q, k, v, dtype):
    """Softmax attention over all tokens, flash-attention's rounding; q, k, v (B, N, Hd, Dh).

    Inputs are cast to `dtype`; scores and the row sums stay float32, the probabilities are
    rounded to `dtype` before P @ V and the output is normalised by the float32 sum.
    """
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) * scale
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1)  # (B, Hd, N)
    o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(dtype), v, preferred_element_type=f32)
    return (o / jnp.swapaxes(denom, 1, 2)[..., None]).astype(dtype)


class Block(nnx.Module):
    """One pre-norm transformer block (x: (B, N, D) in the model dtype)."""

    def __init__(self, cfg: VaeConfig, dtype, attention_dtype, rngs=None):
        d, m = cfg.embed_dim, cfg.mlp_hidden
        ln = dict(eps=cfg.norm_eps, dtype=dtype, zero_centered=False, axes=("vae_embed",))
        self.norm1 = None if cfg.ln_in_attn else LayerNorm(d, **ln)
        lin = dict(dtype=dtype, compute_dtype=dtype, rngs=rngs)
        self.qkv = Linear(d, 3 * d, bias=cfg.qkv_bias, axes=("vae_embed", "vae_qkv"), **lin)
        self.proj = Linear(d, d, bias=True, axes=("vae_heads", "vae_embed"), **lin)
        self.norm2 = LayerNorm(d, **ln)
        self.fc1 = Linear(d, m, bias=True, axes=("vae_embed", "vae_mlp"), **lin)
        self.fc2 = Linear(m, d, bias=True, axes=("vae_mlp", "vae_embed"), **lin)
        self.heads = cfg.num_heads
        self.head_norm = cfg.ln_in_attn
        self.attention_dtype = attention_dtype

    def __call__(self, x):
        """x (B, N, D) residual stream (model dtype, or float32 in a resized decode)."""
        b, n, d = x.shape
        h = x if self.norm1 is None else self.norm1(x)
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads)
        if self.head_norm:
            qkv = qkv_norm(qkv)
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_dtype)
        # sums promote like torch's: a float32 stream stays float32
        x = x + self.proj(o.reshape(b, n, d))
        return x + self.fc2(gelu(self.fc1(self.norm2(x))))


class BlockStack(nnx.Module):
    """`depth` blocks with their parameters on a leading layer axis, run by one scan."""

    def __init__(self, cfg: VaeConfig, dtype, attention_dtype, rngs=None):
        self.layers = stack_layers(lambda r: Block(cfg, dtype, attention_dtype, rngs=r), cfg.depth, rngs)

    def __call__(self, x):
        x, _ = scan_layers(self.layers, lambda block, h, _: (block(h), None), x, name="vae_block")
        return x


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights of torch's align_corners=False resize."""
    scale = np.float32(n_in / n_out)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        src = max(np.float32((i + 0.5) * scale - 0.5), np.float32(0.0))
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = np.float32(src - i0)
        m[i, i0] += np.float32(1.0) - w1
        m[i, i1] += w1
    return m


def resize_pos_embed(pos, src: tuple[int, int, int], dst: tuple[int, int, int]):
    """Trilinear resize of a (t*h*w, D) grid embedding from `src` to `dst`, float32 result."""
    grid = pos.reshape(*src, -1).astype(f32)
    mt, mh, mw = (jnp.asarray(_interp_matrix(a, b)) for a, b in zip(src, dst))
    out = jnp.einsum("Tt,Hh,Ww,thwd->THWd", mt, mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(-1, pos.shape[-1])


class _Trunk(nnx.Module):
    """What encoder and decoder share: cls token, position embedding, blocks, final norm."""

    autocast = False  # upstream runs this half under torch.autocast (the decoder)

    def _init_trunk(self, cfg: VaeConfig, dtype, attention_dtype, rngs):
        d = cfg.embed_dim
        self.cls_token = param(rngs, (d,), dtype, ("vae_embed",))
        self.pos_embed = param(rngs, (math.prod(cfg.pos_grid) + 1, d), dtype, (None, "vae_embed"))
        self.blocks = BlockStack(cfg, dtype, attention_dtype, rngs=rngs)
        self.norm = LayerNorm(d, eps=cfg.norm_eps, dtype=dtype, zero_centered=False, axes=("vae_embed",))
        self.pos_grid = cfg.pos_grid
        self.dtype = dtype

    def _trunk(self, tokens, grid):
        """tokens (B, N, D) on latent grid (t, h, w) -> normed tokens (B, N, D), cls dropped."""
        b, _, d = tokens.shape
        pos = self.pos_embed[...]
        stream = self.dtype
        if tuple(grid) != self.pos_grid:
            resized = resize_pos_embed(pos[1:], self.pos_grid, tuple(grid))
            if self.autocast:  # autocast resizes in float32, and the sum promotes
                stream = jnp.promote_types(self.dtype, f32)
            else:  # an eager resize returns the parameter dtype
                resized = resized.astype(self.dtype)
            pos = jnp.concatenate([pos[:1].astype(f32), resized.astype(f32)])
        cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (b, 1, d))
        x = (jnp.concatenate([cls, tokens], axis=1).astype(f32) + pos.astype(f32)).astype(stream)
        x = self.norm(self.blocks(x))
        return x[:, 1:]


class Encoder(_Trunk):
    def __init__(self, cfg: VaeConfig, dtype, attention_dtype, rngs=None):
        pt, p = cfg.patch_length, cfg.patch_size
        lin = dict(dtype=dtype, compute_dtype=dtype, bias=True, rngs=rngs)
        self.patch_embed = Linear(cfg.in_chans * pt * p * p, cfg.embed_dim, axes=("vae_patch", "vae_embed"), **lin)
        self._init_trunk(cfg, dtype, attention_dtype, rngs)
        self.last_layer = Linear(cfg.embed_dim, cfg.moment_channels, axes=("vae_embed", "vae_latent"), **lin)
        self.patch = (pt, p)
        self.norm_code = cfg.norm_code

    def __call__(self, x):
        """video (B, C, T, H, W) -> moments (B, 2z, T//pt, H//p, W//p).

        Like a strided Conv3d, trailing frames / pixels that do not fill a patch are dropped.
        """
        pt, p = self.patch
        b, c, tt, hh, ww = x.shape
        t, h, w = tt // pt, hh // p, ww // p
        if min(t, h, w) == 0:
            raise ValueError(f"input {x.shape[2:]} is smaller than one patch ({pt}, {p}, {p})")
        x = x[:, :, : t * pt, : h * p, : w * p].astype(self.dtype)
        x = x.reshape(b, c, t, pt, h, p, w, p).transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t * h * w, -1)
        y = self.last_layer(self._trunk(self.patch_embed(x), (t, h, w)))
        y = y.reshape(b, t, h, w, -1).transpose(0, 4, 1, 2, 3)
        if self.norm_code:
            yf = y.astype(f32)
            y = (yf / jnp.linalg.norm(yf, axis=1, keepdims=True)).astype(y.dtype)
        return y


def conv3x3x3(x, kernel):
    """A stride-1, zero-padded 3x3x3 Conv3d (x (B, Ci, T, H, W), kernel (Co, Ci, 3, 3, 3)),
    float32 accumulation, as a sum of 27 shifted channel contractions.

    The decoder's last layer has a handful of input channels (Cu = D / (pt*p*p)), where
    XLA:CPU's convolution runs about 100x slower forward and 20x slower backward than this
    sum in float32 (measured on 64x64x8 clips), which is what makes training the VAE on a CPU
    practical. The result is the same convolution up to summation order. Inference keeps
    lax.conv: in bfloat16 the sum is no faster there and compiles slower.
    """
    _, _, t, h, w = x.shape
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (1, 1)))
    y = None
    for i in range(3):
        for j in range(3):
            for k in range(3):
                term = jnp.einsum(
                    "bcthw,oc->bothw",
                    xp[:, :, i : i + t, j : j + h, k : k + w],
                    kernel[:, :, i, j, k],
                    preferred_element_type=f32,
                )
                y = term if y is None else y + term
    return y


class Decoder(_Trunk):
    autocast = True

    def __init__(self, cfg: VaeConfig, dtype, attention_dtype, rngs=None):
        lin = dict(dtype=dtype, compute_dtype=dtype, bias=True, rngs=rngs)
        self.proj_in = Linear(cfg.z_chans, cfg.embed_dim, axes=("vae_latent", "vae_embed"), **lin)
        self._init_trunk(cfg, dtype, attention_dtype, rngs)
        cu = cfg.unpatch_channels
        # torch Conv3d layout (out, in, kt, kh, kw), used as is by lax.conv
        self.last_layer = param(rngs, (3, cu, 3, 3, 3), dtype, (None, None, None, None, None), scale=(27 * cu) ** -0.5)
        self.last_bias = param(None, (3,), dtype, (None,))
        self.patch = (cfg.patch_length, cfg.patch_size, cu)

    def _embed(self, x, strided: bool):
        """proj_in; `strided`: torch's matmul-then-bias path (two roundings) instead of addmm."""
        if not strided:
            return self.proj_in(x)
        kernel = self.proj_in.kernel[...].astype(self.dtype)
        y = jnp.matmul(x, kernel, preferred_element_type=f32).astype(self.dtype)
        return (y.astype(f32) + self.proj_in.bias[...].astype(f32)).astype(self.dtype)

    def __call__(self, z, strided: bool = True, shifted_conv: bool = False):
        """latent (B, z, t, h, w) -> frames (B, 3, t*pt, h*p, w*p).

        `strided`: whether upstream's token matrix is a view of the latent (true for a whole
        contiguous latent; false for tiles whose window needs a copy to flatten).
        """
        pt, p, cu = self.patch
        b, c, t, h, w = z.shape
        x = z.transpose(0, 2, 3, 4, 1).reshape(b, t * h * w, c).astype(self.dtype)
        x = self._trunk(self._embed(x, strided), (t, h, w))
        x = x.reshape(b, t, h, w, pt, p, p, cu).transpose(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, cu, t * pt, h * p, w * p)
        x, kernel = x.astype(self.dtype), self.last_layer[...].astype(self.dtype)
        if shifted_conv:
            y = conv3x3x3(x, kernel)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1, 1),
                padding=[(1, 1)] * 3,
                dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
                preferred_element_type=f32,
            )
        return (y + self.last_bias[...].astype(f32)[None, :, None, None, None]).astype(self.dtype)


class VaeModel(nnx.Module):
    """ViTVAE: `moments`, `encode` (posterior mode) and `decode`, untiled, batched."""

    def __init__(self, cfg: VaeConfig, *, dtype=jnp.bfloat16, attention_dtype=jnp.bfloat16, rngs=None):
        self.cfg = cfg
        self.encoder = Encoder(cfg, dtype, attention_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype, attention_dtype, rngs=rngs)

    def moments(self, x):
        """x (B, 3, T, H, W) -> (B, 2z, t, h, w): [:z] mean, [z:] log-variance (unclamped)."""
        return self.encoder(x)

    def encode(self, x):
        """x (B, 3, T, H, W) -> posterior mode (B, z, t, h, w); one frame -> one latent frame."""
        single = x.shape[2] == 1
        if single:
            x = jnp.repeat(x, IMAGE_REPEAT, axis=2)
        with jax.named_scope("vae_encode"):
            mean, _ = posterior(self.encoder(x))
        return mean[:, :, :1] if single else mean

    def decode(self, z, strided: bool = True, shifted_conv: bool = False):
        """z (B, z, t, h, w) -> (B, 3, t*pt, H, W); one latent frame -> one frame.
        `shifted_conv`: the last layer as `conv3x3x3` (training; see there)."""
        with jax.named_scope("vae_decode"):
            out = self.decoder(z, strided, shifted_conv)
        return out[:, :, :1] if z.shape[2] == 1 else out


def posterior(moments):
    """Diagonal Gaussian of the moments: (mean, log-variance clamped to [-30, 20])."""
    mean, logvar = jnp.split(moments, 2, axis=1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)
