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

Implementations (`implementation()` picks one per backend; MAGI_ATTENTION overrides it):
  xla     the code below: exact flash-attention rounding, the parity reference (CPU default;
          also every float32 run, which cuDNN does not take)
  cudnn   NVIDIA GPUs: cuDNN flash attention through jax.nn.dot_product_attention
  pallas  TPUs: the Pallas flash-attention kernel
  dpa     jax.nn.dot_product_attention's portable XLA path with the layout cuDNN gets
cuDNN and the TPU kernel take a padding mask, not an arbitrary one, so for them each query
chunk's visible keys are first gathered to the front of its own key buffer (a stable sort
of the rows by visibility) and the mask becomes a key length. Cross-attention masks are
prefixes already (tokens, then padding), so they map to lengths directly.

Shapes: S query tokens = R chunks x N tokens, H query heads, G key/value heads, D head dim,
K keys, L caption tokens.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "dpa")
_BY_BACKEND = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas"}


def implementation(dtype=None) -> str:
    """The attention implementation for the default backend (and inputs of `dtype`)."""
    name = os.environ.get("MAGI_ATTENTION") or _BY_BACKEND.get(jax.default_backend(), "xla")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"MAGI_ATTENTION={name!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    if name in ("cudnn", "pallas") and dtype is not None and jnp.dtype(dtype) == jnp.float32:
        return "xla"  # the fused kernels take 16-bit inputs; float32 runs (parity) use the reference
    return name


def available_implementations() -> list[str]:
    """Implementations that can run here (the backend's kernel, plus the portable ones)."""
    out = ["xla", "dpa"]
    backend = jax.default_backend()
    if backend in ("gpu", "cuda"):
        out.append("cudnn")
    if backend == "tpu":
        out.append("pallas")
    return out


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


def _fused(qc, kc, vc, lengths, kind: str):
    """qc (R, N, H, D); kc, vc (R, K, G, D) with each chunk's keys first; lengths (R,)."""
    if kind == "pallas":
        out = _pallas_tpu(qc, kc, vc, lengths)
    else:
        out = jax.nn.dot_product_attention(
            qc,
            kc,
            vc,
            key_value_seq_lengths=lengths.astype(jnp.int32),
            implementation="cudnn" if kind == "cudnn" else "xla",
        )
    return jnp.where(lengths[:, None, None, None] > 0, out, 0).astype(qc.dtype)  # no key: zeros


def _pallas_tpu(qc, kc, vc, lengths):
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    r, n, h, d = qc.shape
    g = kc.shape[2]
    pad = lambda x, axis: jnp.pad(x, [(0, -x.shape[axis] % 128 if a == axis else 0) for a in range(x.ndim)])  # noqa: E731
    q = pad(qc, 1).transpose(0, 2, 1, 3)
    k = pad(jnp.repeat(kc, h // g, axis=2), 1).transpose(0, 2, 1, 3)  # the kernel wants one kv head per query head
    v = pad(jnp.repeat(vc, h // g, axis=2), 1).transpose(0, 2, 1, 3)
    kv_ids = (jnp.arange(k.shape[2])[None, :] < lengths[:, None]).astype(jnp.int32)
    ids = SegmentIds(q=jnp.ones((r, q.shape[2]), jnp.int32), kv=kv_ids)
    out = flash_attention(q, k, v, segment_ids=ids, sm_scale=1.0 / math.sqrt(d))
    return out.transpose(0, 2, 1, 3)[:, :n]


def chunk_self_attention(q, k, v, k_pos, k_ok, kv_range, chunk_tokens: int, impl: str | None = None):
    """q (S, H, D); k, v (K, G, D); k_pos (K,) global positions; k_ok (K,) rows that hold keys;
    kv_range (R, 2) global [start, end) per query chunk. Returns (S, H, D)."""
    r = kv_range.shape[0]
    qc = q.reshape(r, chunk_tokens, *q.shape[1:])
    visible = k_ok[None, :] & (k_pos[None, :] >= kv_range[:, :1]) & (k_pos[None, :] < kv_range[:, 1:])
    impl = impl or implementation(q.dtype)
    if impl == "xla":
        out = jax.lax.map(lambda a: _attend(a[0], k, v, a[1]), (qc, visible))
    else:
        order = jnp.argsort(~visible, axis=1, stable=True)  # each chunk's visible keys first, in order
        out = _fused(qc, k[order], v[order], visible.sum(axis=1), impl)
    return out.reshape(q.shape)


def chunk_cross_attention(q, k, v, caption_mask, chunk_tokens: int, impl: str | None = None):
    """q (S, H, D); k, v (R, L, G, D) each chunk's caption; caption_mask (R, L) a prefix of
    valid tokens per chunk (tokens, then padding). -> (S, H, D)."""
    r = k.shape[0]
    qc = q.reshape(r, chunk_tokens, *q.shape[1:])
    mask = caption_mask.astype(bool)
    impl = impl or implementation(q.dtype)
    if impl == "xla":
        out = jax.lax.map(lambda a: _attend(*a), (qc, k, v, mask))
    else:
        out = _fused(qc, k, v, mask.sum(axis=1), impl)
    return out.reshape(q.shape)
