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

# Beyond these sizes a chunk is processed in blocks with an online softmax (flash-style),
# so memory holds one (heads, Q_BLOCK, K_BLOCK) score tile instead of all scores.
Q_BLOCK = 1024
K_BLOCK = 2048


def _scores(qg, k, visible):
    s = jnp.einsum("ngrd,kgd->grnk", qg, k, preferred_element_type=jnp.float32)
    s = s * jnp.float32(1.0 / math.sqrt(qg.shape[-1]))
    return jnp.where(visible[None, None, None, :], s, -jnp.inf)


def _finite(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _dense(q, k, v, visible):
    n, h, d = q.shape
    g = k.shape[1]
    scores = _scores(q.reshape(n, g, h // g, d), k, visible)
    p = jnp.exp(scores - _finite(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("grnk,kgd->grnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.where(total == 0, 1.0, total)
    return out.transpose(2, 0, 1, 3).reshape(n, h, d).astype(q.dtype)


def _blocked(q, k, v, visible, qb: int, kb: int):
    n, h, d = q.shape
    g = k.shape[1]
    nq, nk = -(-n // qb), -(-k.shape[0] // kb)
    q = jnp.pad(q, ((0, nq * qb - n), (0, 0), (0, 0)))
    pad_k = ((0, nk * kb - k.shape[0]), (0, 0), (0, 0))
    kblocks = jnp.pad(k, pad_k).reshape(nk, kb, g, d)
    vblocks = jnp.pad(v, pad_k).reshape(nk, kb, g, d)
    visblocks = jnp.pad(visible, (0, nk * kb - visible.shape[0])).reshape(nk, kb)

    def one_query_block(qblock):
        qg = qblock.reshape(qb, g, h // g, d)

        def step(carry, blk):
            m, total, acc = carry
            kk, vv, vis = blk
            s = _scores(qg, kk, vis)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            safe = _finite(m_new)
            p = jnp.exp(s - safe)
            rescale = jnp.exp(m - safe)
            total = total * rescale + jnp.sum(p, axis=-1, keepdims=True)
            pv = jnp.einsum("grnk,kgd->grnd", p.astype(v.dtype), vv, preferred_element_type=jnp.float32)
            return (m_new, total, acc * rescale + pv), None

        stats = jnp.full((g, h // g, qb, 1), -jnp.inf, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros((g, h // g, qb, d), jnp.float32))
        (_, total, acc), _ = jax.lax.scan(step, init, (kblocks, vblocks, visblocks))
        out = acc / jnp.where(total == 0, 1.0, total)
        return out.transpose(2, 0, 1, 3).reshape(qb, h, d)

    out = jax.lax.map(one_query_block, q.reshape(nq, qb, h, d))
    return out.reshape(nq * qb, h, d)[:n].astype(q.dtype)


def _attend(q, k, v, visible, q_block: int = Q_BLOCK, k_block: int = K_BLOCK):
    """One chunk: q (N, H, D), k/v (K, G, D), visible (K,) bool -> (N, H, D) in q's dtype."""
    if q.shape[0] <= q_block and k.shape[0] <= k_block:
        return _dense(q, k, v, visible)
    return _blocked(q, k, v, visible, min(q_block, q.shape[0]), min(k_block, k.shape[0]))


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
