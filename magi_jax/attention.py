"""Block-causal self-attention and per-chunk cross-attention.

MAGI-1's attention is organised by chunks. Self-attention: the queries of chunk c see the
keys whose global token position lies in `kv_range[c] = [start, end)` - earlier (cached)
chunks and the chunks of this call, never later ones, no causal mask inside. Keys come
from two places laid side by side: a window of the KV cache (positions below
`cache_end`, rows past it were never written and are masked) and the keys this call
computes. Cross-attention: each chunk sees only its own caption's unmasked tokens.

Both are computed chunk by chunk (`lax.map`), so memory holds one chunk's scores at a
time. Numerics follow flash-attention, which upstream uses: float32 scores scaled by
1/sqrt(head_dim), float32 softmax statistics, and for 16-bit inputs the probabilities are
rounded to the input dtype before P @ V and normalised by the float32 row sum. A chunk
with no visible key gets zeros. GQA: query head h reads key/value head h // (H / G).

Shapes: S query tokens = R chunks x N tokens, H query heads, G key/value heads, D head dim,
K keys, L caption tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _attend(q, k, v, visible):
    """One chunk: q (N, H, D), k/v (K, G, D), visible (K,) bool -> (N, H, D) in q's dtype."""
    n, h, d = q.shape
    g = k.shape[1]
    qg = q.reshape(n, g, h // g, d)
    scores = jnp.einsum("ngrd,kgd->grnk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1.0 / math.sqrt(d))
    scores = jnp.where(visible[None, None, None, :], scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    p = jnp.exp(scores - peak)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("grnk,kgd->grnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.where(total == 0, 1.0, total)
    return out.transpose(2, 0, 1, 3).reshape(n, h, d).astype(q.dtype)


def chunk_self_attention(q, k, v, k_pos, k_ok, kv_range, chunk_tokens: int):
    """q (S, H, D); k, v (K, G, D); k_pos (K,) global positions; k_ok (K,) rows that hold keys;
    kv_range (R, 2) global [start, end) per query chunk. Returns (S, H, D)."""
    r = kv_range.shape[0]
    qc = q.reshape(r, chunk_tokens, *q.shape[1:])
    visible = k_ok[None, :] & (k_pos[None, :] >= kv_range[:, :1]) & (k_pos[None, :] < kv_range[:, 1:])
    out = jax.lax.map(lambda a: _attend(a[0], k, v, a[1]), (qc, visible))
    return out.reshape(q.shape)


def chunk_cross_attention(q, k, v, caption_mask, chunk_tokens: int):
    """q (S, H, D); k, v (R, L, G, D) each chunk's caption; caption_mask (R, L). -> (S, H, D)."""
    r = k.shape[0]
    qc = q.reshape(r, chunk_tokens, *q.shape[1:])
    out = jax.lax.map(lambda a: _attend(*a), (qc, k, v, caption_mask.astype(bool)))
    return out.reshape(q.shape)
