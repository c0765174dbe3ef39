"""The MAGI-1 diffusion transformer (VideoDiT): one forward pass over a window of chunks.

Data path of `DiT.__call__` (one upstream `VideoDiTModel.forward`):
  latent window x (C, T, H, W) -> rescale (and channel duplication for 24B) -> Conv3d patch
  embedding -> tokens (S, D), chunk by chunk (t, h, w) row-major
  flow time t per chunk -> timestep embedding (+ distill step-size embedding) + the AdaLN
  caption token -> one condition per chunk
  caption per chunk -> projected caption tokens for cross-attention
  layers (stacked, scanned): fused pre-norm, q / cross-q / k / v projections, per-head
  q/k norms, 3-D rope, block-causal self-attention over cached + current keys, cross
  attention to the chunk's caption, one output projection over both, gated sandwich
  post-norm residual, pre-norm MLP (GELU or SwiGLU), gated sandwich post-norm residual
  -> final norm, final linear, unpatchify -> velocity (C, T, H, W).

Precision is upstream's: the embedders, rope, q/k norms, post-norms, final norm and final
linear are float32 whatever `params_dtype` is; the rest runs in `params_dtype`; the
output projection computes in float32 (or fp8 in quantised layers).

fp8 checkpoints quantise every layer but the first and the last, so the stack is kept as
segments of identical layers (one for plain models, three for fp8), each scanned.

Shapes: R chunks in the pass, S tokens, N tokens per chunk, D hidden, H heads, G kv heads,
Dh head dim, L caption tokens, Cc caption channels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.attention import chunk_cross_attention, chunk_self_attention
from magi_jax.config import ModelConfig
from magi_jax.kv_cache import KVCache, read_window, write_rows
from magi_jax.layers import LayerNorm, Linear, gelu, linear, param, silu_and_mul, softcap
from magi_jax.rope import apply_rope, rope_tables

f32 = jnp.float32
FREQ_DIM = 256  # sinusoidal timestep features
GATE_CAP = 1.0  # softcap of the AdaLN gates
PROJ_TP = 8  # upstream's output projection expects its input in a tensor-parallel-8 layout


def output_projection_order(heads_x_dim: int) -> np.ndarray:
    """Input-feature order of upstream's `linear_proj`, as indices into [self | cross].

    Upstream views the 2*H*Dh concatenation as (2, 8, H*Dh/8), swaps the first two axes and
    flattens; our projection reads the plain concatenation, so its kernel rows are taken in
    this order (once, by the converter).
    """
    # row (n, hn, d) of our kernel is upstream's input feature (hn, n, d)
    idx = np.arange(2 * heads_x_dim).reshape(PROJ_TP, 2, heads_x_dim // PROJ_TP)
    return idx.transpose(1, 0, 2).reshape(-1)


class TimestepEmbedder(nnx.Module):
    """Flow time -> condition vector: sinusoidal features of t*1000, then a 2-layer MLP."""

    def __init__(self, cfg: ModelConfig, rngs=None):
        c = cfg.cond_size
        self.fc1 = Linear(FREQ_DIM, c, dtype=f32, bias=True, axes=(None, "cond"), rngs=rngs)
        self.fc2 = Linear(c, c, dtype=f32, bias=True, axes=("cond", "cond"), rngs=rngs)
        self.params_dtype = cfg.dtype

    def __call__(self, t):
        half = FREQ_DIM // 2
        freqs = jnp.exp(f32(-math.log(10000)) * jnp.arange(half, dtype=f32) / f32(half))
        args = t.astype(f32)[:, None] * freqs[None] * f32(1000)
        feats = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        # upstream rounds the features to params_dtype before its float32 MLP
        feats = feats.astype(self.params_dtype).astype(f32)
        return self.fc2(jax.nn.silu(self.fc1(feats)))


class CaptionEmbedder(nnx.Module):
    """Caption tokens for cross-attention, and the AdaLN caption token.

    The AdaLN token does not depend on the caption: it is the projection of the learned
    null caption's second-to-last row (caption kept) or last row (caption dropped).
    """

    def __init__(self, cfg: ModelConfig, rngs=None):
        cc = cfg.caption_channels
        self.xattn = Linear(cc, cfg.xattn_size, dtype=f32, bias=True, axes=("caption", "embed"), rngs=rngs)
        self.adaln = Linear(cc, cfg.cond_size, dtype=f32, bias=True, axes=("caption", "cond"), rngs=rngs)
        self.null_caption = param(rngs, (cfg.caption_max_length, cc), f32, ("caption_len", "caption"), scale=1.0)

    def tokens(self, y):
        """y (..., L, Cc) -> (..., L, Dx) float32."""
        return jax.nn.silu(self.xattn(y.astype(f32)))

    def adaln_token(self, drop_caption: bool):
        return self.adaln(self.null_caption[-1 if drop_caption else -2].astype(f32))


class DiTLayer(nnx.Module):
    """One transformer layer; `quantized` layers use fp8 linears (checkpoint layout decides)."""

    def __init__(self, cfg: ModelConfig, quantized: bool, rngs=None):
        d, pd = cfg.hidden_size, cfg.dtype
        qd = cfg.num_attention_heads * cfg.kv_channels
        kvd = cfg.num_query_groups * cfg.kv_channels
        eps, zc = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        lin = dict(quantized=quantized, dtype=pd, rngs=rngs)
        head_norm = dict(eps=eps, zero_centered=zc, axes=("head_dim",))

        self.ada = Linear(cfg.cond_size, 2 * d, dtype=pd, bias=True, axes=("cond", "embed"), rngs=rngs)
        self.attn_norm = LayerNorm(d, eps=eps, dtype=pd, zero_centered=False)
        self.q = linear(d, qd, axes=("embed", "q_heads"), **lin)
        self.qx = linear(d, qd, axes=("embed", "q_heads"), **lin)
        self.k = linear(d, kvd, axes=("embed", "kv_heads"), **lin)
        self.v = linear(d, kvd, axes=("embed", "kv_heads"), **lin)
        self.kv_xattn = Linear(cfg.xattn_size, 2 * kvd, dtype=pd, axes=("embed", "kv_heads"), rngs=rngs)
        self.q_norm = LayerNorm(cfg.kv_channels, dtype=f32, **head_norm)
        self.k_norm = LayerNorm(cfg.kv_channels, dtype=f32, **head_norm)
        self.q_norm_x = LayerNorm(cfg.kv_channels, dtype=pd, **head_norm)
        self.k_norm_x = LayerNorm(cfg.kv_channels, dtype=pd, **head_norm)
        self.proj = linear(2 * qd, d, smoothed=True, axes=("q_heads", "embed"), compute_dtype=f32, **lin)
        self.attn_post_norm = LayerNorm(d, eps=eps, dtype=f32, zero_centered=zc)
        self.mlp_norm = LayerNorm(d, eps=eps, dtype=pd, zero_centered=False)
        ffn = cfg.ffn_hidden_size
        self.fc1 = linear(d, 2 * ffn if cfg.gated_linear_unit else ffn, axes=("embed", "mlp"), **lin)
        self.fc2 = linear(ffn, d, smoothed=True, axes=("mlp", "embed"), **lin)
        self.mlp_post_norm = LayerNorm(d, eps=eps, dtype=f32, zero_centered=zc)
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        self.glu = cfg.gated_linear_unit
        self.params_dtype = pd

    def _gated_residual(self, out, residual, gate, norm, chunks):
        """residual + norm(out * gate), float32 inside, rounded like upstream's output."""
        s, d = out.shape
        y = out.astype(f32).reshape(chunks, s // chunks, d) * gate.astype(f32)[:, None, :]
        y = norm(y.reshape(s, d)) + residual.astype(f32)
        return y.astype(out.dtype).astype(self.params_dtype)

    def __call__(self, x, ctx: PassContext, cache: KVCache | None, layer):
        pd = self.params_dtype
        s = x.shape[0]
        r = ctx.kv_range.shape[0]
        h, g, dh = self.heads, self.groups, self.head_dim

        ln = self.attn_norm(x)
        q = self.q(ln)
        q = apply_rope(self.q_norm(q.reshape(s, h, dh).astype(f32)), ctx.sin, ctx.cos).astype(q.dtype)
        k = self.k(ln)
        k = apply_rope(self.k_norm(k.reshape(s, g, dh).astype(f32)), ctx.sin, ctx.cos).astype(k.dtype)
        v = self.v(ln).reshape(s, g, dh)

        new_pos = ctx.new_start + jnp.arange(s, dtype=jnp.int32)
        keys, values, pos, ok = k, v, new_pos, jnp.ones((s,), bool)
        if cache is not None and ctx.read_cache:
            kw, vw, pw, okw = read_window(cache, layer, ctx.new_start, ctx.cache_window or cache.rows)
            keys = jnp.concatenate([kw.astype(k.dtype), k])
            values = jnp.concatenate([vw.astype(v.dtype), v])
            pos, ok = jnp.concatenate([pw, new_pos]), jnp.concatenate([okw, ok])
        if cache is not None and ctx.write_cache:
            b = ctx.write_block
            cache = write_rows(cache, layer, ctx.new_start, k[:b], v[:b], ctx.write_count)
        core = chunk_self_attention(q, keys, values, pos, ok, ctx.kv_range, s // r)

        xq = self.q_norm_x(self.qx(ln).reshape(s, h, dh))
        xkv = self.kv_xattn(ctx.caption).reshape(*ctx.caption.shape[:2], g, 2, dh)
        cross = chunk_cross_attention(xq, self.k_norm_x(xkv[..., 0, :]), xkv[..., 1, :], ctx.caption_mask, s // r)

        attn = jnp.concatenate([core.reshape(s, h * dh), cross.reshape(s, h * dh)], axis=-1)
        gates = softcap(self.ada(jax.nn.silu(ctx.cond.astype(f32)).astype(pd)), GATE_CAP)
        gate_attn, gate_mlp = jnp.split(gates, 2, axis=-1)
        x = self._gated_residual(self.proj(attn), x, gate_attn, self.attn_post_norm, r)

        hidden = self.fc1(self.mlp_norm(x))
        hidden = silu_and_mul(hidden) if self.glu else gelu(hidden)
        x = self._gated_residual(self.fc2(hidden), x, gate_mlp, self.mlp_post_norm, r)
        return x, cache


class LayerStack(nnx.Module):
    """`count` identical layers (upstream indices first..first+count-1) on a leading axis."""

    def __init__(self, cfg: ModelConfig, first: int, count: int, quantized: bool, rngs=None):
        def make(r):
            return DiTLayer(cfg, quantized, rngs=r)

        if rngs is None:
            self.layers = nnx.vmap(lambda _: make(None), in_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})(
                jnp.arange(count)
            )
        else:
            self.layers = nnx.split_rngs(splits=count)(
                nnx.vmap(make, in_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            )(rngs)
        self.first, self.count, self.quantized = first, count, quantized

    def __call__(self, x, ctx, cache):
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            h, c = carry
            layer_state, index = xs
            h, c = nnx.merge(graphdef, layer_state)(h, ctx, c, index)
            return (h, c), None

        index = self.first + jnp.arange(self.count, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (state, index))
        return x, cache


def layer_segments(cfg: ModelConfig, fp8_quant: bool) -> list[tuple[int, int, bool]]:
    """(first, count, quantized) per segment: fp8 models keep layer 0 and the last plain."""
    n = cfg.num_layers
    if not fp8_quant:
        return [(0, n, False)]
    return [(0, 1, False), (1, n - 2, True), (n - 1, 1, False)]


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Per-pass values every layer reads (built once per forward, closed over by the scan)."""

    sin: jax.Array  # (S, 3*nb) rope tables
    cos: jax.Array
    cond: jax.Array  # (R, Dc) AdaLN condition per chunk
    caption: jax.Array  # (R, L, Dx) projected caption tokens
    caption_mask: jax.Array  # (R, L)
    kv_range: jax.Array  # (R, 2) int32
    new_start: jax.Array  # () int32
    write_count: jax.Array  # () int32
    write_block: int  # leading tokens that may be written (static: the near-clean copy never is)
    read_cache: bool
    write_cache: bool
    cache_window: int | None


class DiT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, fp8_quant: bool = False, distill: bool = False, rngs=None):
        d = cfg.hidden_size
        patch_in = cfg.in_channels * cfg.t_patch_size * cfg.patch_size**2
        patch_out = cfg.out_channels * cfg.t_patch_size * cfg.patch_size**2
        self.cfg = cfg
        self.distill = distill
        self.x_embedder = Linear(patch_in, d, dtype=f32, axes=("patch", "embed"), rngs=rngs)
        self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
        self.y_embedder = CaptionEmbedder(cfg, rngs=rngs)
        self.rope_bands = param(None, (cfg.rope_dim // 8,), f32, (None,), init="ones")
        if rngs is not None:  # upstream's default bands: 1 / 10000^(i/nb)
            nb = cfg.rope_dim // 8
            self.rope_bands[...] = 1.0 / (10000.0 ** (jnp.arange(nb, dtype=f32) / nb))
        self.segments = nnx.List(
            [LayerStack(cfg, first, count, quant, rngs=rngs) for first, count, quant in layer_segments(cfg, fp8_quant)]
        )
        self.final_norm = LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=f32, zero_centered=cfg.apply_layernorm_1p)
        self.final_linear = Linear(d, patch_out, dtype=f32, axes=("embed", "patch"), rngs=rngs)

    def _patchify(self, x):
        """(C, T, H, W) -> tokens (S, C*pt*p*p), token order (t, h, w)."""
        c, t, hh, ww = x.shape
        pt, p = self.cfg.t_patch_size, self.cfg.patch_size
        x = x.reshape(c, t // pt, pt, hh // p, p, ww // p, p).transpose(1, 3, 5, 0, 2, 4, 6)
        return x.reshape((t // pt) * (hh // p) * (ww // p), -1)

    def _unpatchify(self, tokens, t, hh, ww):
        """(S, pt*p*p*C) -> (C, T, H, W)."""
        pt, p = self.cfg.t_patch_size, self.cfg.patch_size
        x = tokens.reshape(t // pt, hh // p, ww // p, pt, p, p, -1).transpose(6, 0, 3, 1, 4, 2, 5)
        return x.reshape(-1, t, hh, ww)

    def __call__(
        self,
        x,
        t,
        caption,
        caption_mask,
        kv_range,
        frame0,
        t_total,
        *,
        cache: KVCache | None = None,
        new_start=0,
        write_count=0,
        write_block: int | None = None,
        distill_dt=None,
        drop_caption: bool = False,
        read_cache: bool = False,
        write_cache: bool = False,
        cache_window: int | None = None,
    ):
        """One forward over R chunks. Returns (velocity (C, T, H, W) float32, cache).

        x (C, T, H, W) latent, any float dtype (the rescale happens in it, as upstream);
        t (R,) flow time per chunk; caption (R, L, Cc), caption_mask (R, L);
        kv_range (R, 2) global [start, end) of the keys each chunk sees;
        frame0, t_total (R,) rope time origin per chunk (see rope.py);
        new_start: global position of this pass's first token (= cache row it writes from);
        write_count: how many of this pass's tokens to write to the cache;
        write_block: static bound on write_count (default: all tokens of the pass);
        distill_dt: the distilled model's step size (required iff the model is distilled);
        drop_caption: AdaLN from the dropped-caption token (null caption passes);
        read_cache / write_cache: use the cache below new_start / write to it;
        cache_window: how many cache rows below new_start to look at (None: all).
        """
        cfg = self.cfg
        pd = cfg.dtype
        c, tt, hh, ww = x.shape
        r = t.shape[0]
        x = (x.astype(f32) * f32(cfg.x_rescale_factor)).astype(x.dtype)
        if cfg.half_channel_vae:
            x = jnp.concatenate([x, x], axis=0)
        tokens = self.x_embedder(self._patchify(x.astype(f32))).astype(pd)

        p, pt = cfg.patch_size, cfg.t_patch_size
        sin, cos = rope_tables(self.rope_bands[...], frame0, t_total, tt // pt // r, hh // p, ww // p)
        cond = self.t_embedder(t)
        if self.distill:
            if distill_dt is None:
                raise ValueError("a distilled DiT needs distill_dt (the step size of the shortcut schedule)")
            cond = cond + self.t_embedder(jnp.broadcast_to(jnp.asarray(distill_dt, f32), t.shape))
        cond = (cond + self.y_embedder.adaln_token(drop_caption)[None]).astype(pd)

        ctx = PassContext(
            sin=sin,
            cos=cos,
            cond=cond,
            caption=self.y_embedder.tokens(caption).astype(pd),
            caption_mask=caption_mask,
            kv_range=kv_range.astype(jnp.int32),
            new_start=jnp.asarray(new_start, jnp.int32),
            write_count=jnp.asarray(write_count, jnp.int32),
            write_block=tokens.shape[0] if write_block is None else write_block,
            read_cache=read_cache,
            write_cache=write_cache,
            cache_window=cache_window,
        )
        h = tokens
        for segment in self.segments:
            h, cache = segment(h, ctx, cache)
        out = self.final_linear(self.final_norm(h.astype(f32)))
        out = self._unpatchify(out, tt, hh, ww)
        if cfg.half_channel_vae:
            out = out[: cfg.latent_channels]
        return out / f32(cfg.x_rescale_factor), cache


def forward_flops(cfg: ModelConfig, chunks: int, chunk_tokens: int, visible_keys: int, caption_tokens: int) -> int:
    """Matmul FLOPs of one DiT pass over `chunks` chunks (2 per multiply-add).

    visible_keys: keys each query attends to (its kv range, cached chunks included);
    caption_tokens: unmasked caption tokens per chunk.
    """
    d, h, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    ffn = cfg.ffn_hidden_size
    s = chunks * chunk_tokens
    qd, kvd = h * dh, g * dh
    per_token = 2 * d * (2 * qd + 2 * kvd)  # q, qx, k, v
    per_token += 2 * (2 * qd) * d  # output projection
    per_token += 2 * d * ffn * (2 if cfg.gated_linear_unit else 1) + 2 * ffn * d  # MLP
    per_token += 4 * qd * (visible_keys + caption_tokens)  # QK^T and PV, self and cross
    per_layer = s * per_token + chunks * caption_tokens * 2 * cfg.xattn_size * 2 * kvd
    patch = cfg.in_channels * cfg.t_patch_size * cfg.patch_size**2
    ends = 2 * s * d * (patch + cfg.out_channels * cfg.t_patch_size * cfg.patch_size**2)
    ends += 2 * chunks * caption_tokens * cfg.caption_channels * cfg.xattn_size
    return cfg.num_layers * per_layer + ends
