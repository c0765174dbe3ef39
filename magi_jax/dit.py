"""The MAGI-1 diffusion transformer (VideoDiT): one forward pass over a window of chunks.

Data path of `DiT.__call__` (one upstream `VideoDiTModel.forward`):
  latent window x (C, T, H, W) -> rescale (and channel duplication for 24B) -> Conv3d patch
  embedding -> tokens (S, D), chunk by chunk (t, h, w) row-major, held by chunk (R, Nq, D):
  on a mesh each chunk's tokens padded to a multiple of the `seq` split (`token_multiple`)
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

Shapes: R chunks in the pass, S tokens, N tokens per chunk (Nq padded), D hidden, H heads, G kv heads,
Dh head dim, L caption tokens, Cc caption channels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.attention import KeyParts, chunk_cross_attention, chunk_self_attention
from magi_jax.config import ModelConfig
from magi_jax.forward_call import Captions, ForwardCall, Window
from magi_jax.kv_cache import CacheSlots, KVCache, read_window, write_rows
from magi_jax.layers import LayerNorm, Linear, gelu, linear, param, scan_layers, silu_and_mul, softcap, stack_layers
from magi_jax.rope import apply_rope, rope_tables
from magi_jax.sharding import constrain, split_count

f32 = jnp.float32
FREQ_DIM = 256  # sinusoidal timestep features
MKL_EXP_ROUNDED_UP = (12, 106)  # see TimestepEmbedder.frequencies
GATE_CAP = 1.0  # softcap of the AdaLN gates
PROJ_TP = 8  # upstream's output projection expects its input in a tensor-parallel-8 layout
# token activations (rows, chunks, tokens, hidden): each chunk's tokens over `seq`, padded to a
# multiple of it (`token_multiple`)
TOKENS = (None, None, "tokens", "embed")
CALL_KEYS = (None, None, "kv_heads", "head_dim")  # this call's keys by chunk: all rows on every device


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

    @staticmethod
    def frequencies() -> np.ndarray:
        """exp(-ln(10000) * i / 128), i < 128, as upstream's float32 table holds them.

        The distill step size puts arguments near 8000 into cos/sin, where one ulp of a
        frequency moves a feature by ~1e-4, enough to leave the parity tolerance of the
        distilled fixtures. Upstream's table comes from PyTorch's CPU exp, which is MKL's
        vsExp (high-accuracy mode): correctly rounded here except entries 12 and 106, one ulp
        high (checked against MKL itself and against every fixture's recorded condition).
        XLA's exp differs in 15 entries, so the table is built on the host.
        """
        half = FREQ_DIM // 2
        exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
        table = np.exp(exponent.astype(np.float64)).astype(np.float32)
        for i in MKL_EXP_ROUNDED_UP:
            table[i] = np.nextafter(table[i], np.float32(np.inf))
        return table

    def __call__(self, t):
        args = t.astype(f32)[:, None] * jnp.asarray(self.frequencies())[None] * f32(1000)
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
        heads = dict(layout="out_in", **lin)  # projections into heads (layers.KERNEL_LAYOUTS)
        self.q = linear(d, qd, axes=("embed", "q_heads"), **heads)
        self.qx = linear(d, qd, axes=("embed", "q_heads"), **heads)
        self.k = linear(d, kvd, axes=("embed", "kv_heads"), **heads)
        self.v = linear(d, kvd, axes=("embed", "kv_heads"), **heads)
        self.kv_xattn = Linear(
            cfg.xattn_size, 2 * kvd, dtype=pd, axes=("embed", "kv_heads"), layout="out_in", rngs=rngs
        )
        self.q_norm = LayerNorm(cfg.kv_channels, dtype=f32, **head_norm)
        self.k_norm = LayerNorm(cfg.kv_channels, dtype=f32, **head_norm)
        self.q_norm_x = LayerNorm(cfg.kv_channels, dtype=pd, **head_norm)
        self.k_norm_x = LayerNorm(cfg.kv_channels, dtype=pd, **head_norm)
        self.proj = linear(2 * qd, d, smoothed=True, axes=("q_heads", "embed"), compute_dtype=f32, **lin)
        self.attn_post_norm = LayerNorm(d, eps=eps, dtype=f32, zero_centered=zc)
        self.mlp_norm = LayerNorm(d, eps=eps, dtype=pd, zero_centered=False)
        ffn = cfg.ffn_hidden_size
        glu = cfg.gated_linear_unit
        mlp_in = "halves" if glu else "in_out"
        self.fc1 = linear(d, 2 * ffn if glu else ffn, layout=mlp_in, axes=("embed", "mlp"), **lin)
        self.fc2 = linear(ffn, d, smoothed=True, axes=("mlp", "embed"), **lin)
        self.mlp_post_norm = LayerNorm(d, eps=eps, dtype=f32, zero_centered=zc)
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        self.glu = glu
        self.params_dtype = pd

    def _gated_residual(self, out, residual, gate, norm):
        """residual + norm(out * gate), float32 inside, rounded like upstream's output; gate
        (R, D) one per chunk."""
        y = norm(out.astype(f32) * gate.astype(f32)[:, None]) + residual.astype(f32)
        return y.astype(out.dtype).astype(self.params_dtype)

    def _row(self, x, row: RowInputs, ctx: PassInputs, window, shape: Window):
        """One guidance row: x (R, Nq, D) -> (x, k, v), k and v (R * N, G, Dh) this call's keys
        by position (a chunk's padding dropped); `window` = (k, v, start) cache rows shared by
        all rows; shape: the call's static shape (ForwardCall.window: the key span, the
        caption key block)."""
        pd = self.params_dtype
        r, nq = x.shape[:2]
        n = ctx.chunk_tokens
        h, g, dh = self.heads, self.groups, self.head_dim

        ln = self.attn_norm(x)
        with jax.named_scope("self_attention"):
            q = self.q(ln)
            q = apply_rope(self.q_norm(q.reshape(r, nq, h, dh).astype(f32)), ctx.sin, ctx.cos).astype(q.dtype)
            k = self.k(ln)
            k = apply_rope(self.k_norm(k.reshape(r, nq, g, dh).astype(f32)), ctx.sin, ctx.cos).astype(k.dtype)
            v = self.v(ln).reshape(r, nq, g, dh)
            # every query reads keys of every chunk: gathered once, the padding dropped after
            k, v = (constrain(a, CALL_KEYS)[:, :n].reshape(r * n, g, dh) for a in (k, v))
            core = chunk_self_attention(q, KeyParts(k, v, ctx.first_token, window), ctx.kv_range, n, shape.kv_span)

        with jax.named_scope("cross_attention"):
            xq = self.q_norm_x(self.qx(ln).reshape(r, nq, h, dh))
            xkv = self.kv_xattn(row.caption).reshape(*row.caption.shape[:2], g, 2, dh)
            xk, xv = self.k_norm_x(xkv[..., 0, :]), xkv[..., 1, :]
            cross = chunk_cross_attention(xq, xk, xv, row.caption_mask, shape.caption_block)

        gates = softcap(self.ada(jax.nn.silu(row.cond.astype(f32)).astype(pd)), GATE_CAP)
        # the rest is per token, so it runs one chunk at a time: over a whole window XLA holds
        # several float32 copies of the residual stream and the MLP's hidden layer, and splits
        # them by chunk only in some windows (24B_distill_quant's largest step on v5p-8,
        # model=4: 23.87 GiB whole, 18.74 by chunk), which no plan could follow
        x = _by_chunk(self._tail, x, core.reshape(r, nq, h * dh), cross.reshape(r, nq, h * dh), gates)
        return x, k, v

    def _tail(self, x, core, cross, gates):
        """The output projection and the MLP, each with its gated residual: x, core, cross
        (R, Nq, .), gates (R, 2D)."""
        gate_attn, gate_mlp = jnp.split(gates, 2, axis=-1)
        with jax.named_scope("attention_out"):
            attn = jnp.concatenate([core, cross], axis=-1)
            x = self._gated_residual(self.proj(attn), x, gate_attn, self.attn_post_norm)
        with jax.named_scope("mlp"):
            hidden = self.fc1(self.mlp_norm(x))
            hidden = silu_and_mul(hidden) if self.glu else gelu(hidden)
            x = self._gated_residual(self.fc2(hidden), x, gate_mlp, self.mlp_post_norm)
        return x

    def __call__(self, x, ctx: PassInputs, call: ForwardCall, cache: KVCache | None, layer):
        """x (B, S, D): B guidance rows over the same tokens (different captions / AdaLN
        tokens), batched so they share one read of the cache window and one compiled body."""
        rows = call.rows
        window = slots = None
        if cache is not None:
            slots = call.cache_slots
            if slots is None:  # not planned: the cache is read and written by position
                size = min(call.window.cache_window or cache.rows, cache.rows)
                slots = CacheSlots.by_position(ctx.first_token, size, cache.rows)
            else:  # planned chunk slots of the ring: rows padded past it (sampler_plan.cache_shape) are never read
                size = slots.read.shape[0] * ctx.chunk_tokens
        if cache is not None and rows.read_cache:
            with jax.named_scope("kv_cache_read"):
                kw, vw, pos, _ = read_window(cache, layer, ctx.first_token, slots, size)
            window = (kw, vw, pos[0])  # contiguous positions from pos[0] on, ring or not
        x, k, v = jax.vmap(lambda xb, rb: self._row(xb, rb, ctx, window, call.window))(x, ctx.rows)
        if cache is not None and rows.write_row is not None:
            b = k.shape[1] if rows.write_bound is None else rows.write_bound
            row = rows.write_row
            with jax.named_scope("kv_cache_write"):
                cache = write_rows(cache, layer, slots.write, k[row, :b], v[row, :b], call.write_count)
        return x, cache


def _by_chunk(f, *args):
    """f over each chunk in turn: args (R, ...), f maps (1, ...) slices to a (1, ...) result.
    Its temporaries are one chunk's, not the window's."""
    if args[0].shape[0] == 1:
        return f(*args)
    return jax.lax.map(lambda a: f(*(t[None] for t in a))[0], args)


class LayerStack(nnx.Module):
    """`count` identical layers (upstream indices first..first+count-1) on a leading axis."""

    def __init__(self, cfg: ModelConfig, first: int, count: int, quantized: bool, rngs=None):
        self.layers = stack_layers(lambda r: DiTLayer(cfg, quantized, rngs=r), count, rngs)
        self.first, self.count, self.quantized = first, count, quantized
        self.remat = False  # training: recompute each layer in the backward pass (train.Trainer sets it)

    def __call__(self, x, ctx: PassInputs, call: ForwardCall, cache):
        def body(layer, carry, index):
            h, c = carry
            h, c = layer(h, ctx, call, c, index)
            return (constrain(h, TOKENS), c), None

        if self.remat:  # keep only each layer's input for the backward pass, not its activations
            body = jax.checkpoint(body, prevent_cse=False)
        # the layer indices hidden from XLA: knowing a segment touches only layers first..first+count-1,
        # it narrowed fp8's middle scan's carried cache to those layers, a second copy in another
        # layout (1.2 GiB per chip in 4.5B_distill_quant's small windows on v5e-8)
        index = jax.lax.optimization_barrier(self.first + jnp.arange(self.count, dtype=jnp.int32))
        (x, cache), _ = scan_layers(self.layers, body, (x, cache), index, name="dit_layer")
        return x, cache


def token_multiple() -> int:
    """A chunk's tokens are padded to a multiple of this: the devices the mesh splits tokens
    over (1 without a mesh). A 4.5B chunk at 720x720 is 12,150 tokens, which `seq=8` does not
    divide; padded to 12,152, every device holds a chunk's own 1,519 tokens, and attention
    takes each chunk's queries as they lie, with no gather or reshard. The padding is never
    a key (the DiT drops it before the key buffer), never written to the cache, and its
    outputs are dropped after the final linear."""
    return split_count("tokens")


def layer_segments(cfg: ModelConfig, fp8_quant: bool) -> list[tuple[int, int, bool]]:
    """(first, count, quantized) per segment: fp8 models keep layer 0 and the last plain."""
    n = cfg.num_layers
    if not fp8_quant:
        return [(0, n, False)]
    return [(0, 1, False), (1, n - 2, True), (n - 1, 1, False)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowInputs:
    """What differs between guidance rows (leading B axis in PassInputs)."""

    cond: jax.Array  # (R, Dc) AdaLN condition per chunk
    caption: jax.Array  # (R, L, Dx) projected caption tokens
    caption_mask: jax.Array  # (R, L)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PassInputs:
    """Traced per-pass values every layer reads (built once per forward, closed over by the scan)."""

    sin: jax.Array  # (R, Nq, 3*nb) rope tables
    cos: jax.Array
    rows: RowInputs  # (B, ...) per guidance row
    kv_range: jax.Array  # (R, 2) int32
    first_token: jax.Array  # () int32 global position of the pass's first token
    chunk_tokens: int = dataclasses.field(metadata=dict(static=True))  # N real tokens a chunk (Nq >= N)


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

    def __call__(self, x, captions: Captions, call: ForwardCall, cache: KVCache | None = None):
        """One forward over R chunks for B guidance rows. Returns (velocity, cache).

        x (C, T, H, W) latent shared by the rows, any float dtype (the rescale happens in it,
        as upstream); captions (B, R, L, Cc) / (B, R, L): each row's caption per chunk;
        call: the chunks' times, key ranges, rope positions, cache use and guidance rows
        (forward_call.py); cache: read and written as `call.rows` says (None: no cache).
        Velocity: (B, C, T, H, W) float32.
        """
        cfg = self.cfg
        pd = cfg.dtype
        c, tt, hh, ww = x.shape
        r = call.chunks
        if captions.tokens.shape[:2] != (call.rows.count, r):
            raise ValueError(
                f"captions for {captions.tokens.shape[:2]} (rows, chunks); the call has "
                f"{call.rows.count} guidance rows over {r} chunks"
            )
        p, pt = cfg.patch_size, cfg.t_patch_size
        n = tt // pt * (hh // p) * (ww // p) // r  # tokens a chunk
        nq = -(-n // token_multiple()) * token_multiple()

        def by_chunk(a):  # (S, ...) -> (R, Nq, ...): each chunk's tokens, then its padding, split
            a = a.reshape(r, n, *a.shape[1:])
            a = jnp.pad(a, [(0, 0), (0, nq - n)] + [(0, 0)] * (a.ndim - 2)) if nq > n else a
            return constrain(a, TOKENS[1:])

        with jax.named_scope("patch_embed"):
            x = (x.astype(f32) * f32(cfg.x_rescale_factor)).astype(x.dtype)
            if cfg.half_channel_vae:
                x = jnp.concatenate([x, x], axis=0)
            # the narrow patches are split, so each device embeds only its own tokens
            tokens = self.x_embedder(by_chunk(self._patchify(x.astype(f32)))).astype(pd)

        with jax.named_scope("rope"):
            sin, cos = rope_tables(self.rope_bands[...], call.frame0, call.t_total, tt // pt // r, hh // p, ww // p)
        with jax.named_scope("condition_embed"):
            t_emb = self.t_embedder(call.t)
            if self.distill:
                if call.distill_dt is None:
                    raise ValueError("a distilled DiT needs distill_dt (the step size of the shortcut schedule)")
                dt = jnp.broadcast_to(jnp.asarray(call.distill_dt, f32), call.t.shape)
                t_emb = t_emb + self.t_embedder(dt)
            adaln = jnp.stack([self.y_embedder.adaln_token(drop) for drop in call.rows.drop_caption])
            cond = (t_emb[None] + adaln[:, None]).astype(pd)
        with jax.named_scope("caption_embed"):
            caption = self.y_embedder.tokens(captions.tokens).astype(pd)

        ctx = PassInputs(
            sin=by_chunk(sin),
            cos=by_chunk(cos),
            rows=RowInputs(cond, caption, captions.mask),
            kv_range=call.kv_range.astype(jnp.int32),
            first_token=jnp.asarray(call.first_chunk, jnp.int32) * n,
            chunk_tokens=n,
        )
        b = call.rows.count
        h = constrain(jnp.broadcast_to(tokens[None], (b, *tokens.shape)), TOKENS)
        for segment in self.segments:
            h, cache = segment(h, ctx, call, cache)
        with jax.named_scope("final_layer"):
            # on the split tokens, padding and all: only the (much narrower) output is gathered;
            # unconstrained, XLA gathered the float32 norm (2.5 GiB on 24B's v5p-64 step)
            out = constrain(self.final_linear(self.final_norm(h.astype(f32))), TOKENS)[:, :, :n]
            out = jax.vmap(lambda o: self._unpatchify(o.reshape(r * n, -1), tt, hh, ww))(out)
        if cfg.half_channel_vae:
            out = out[:, : cfg.latent_channels]
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
