"""The KV cache: keys and values of clean chunks that later chunks attend to.

A fixed-size pytree allocated once for the whole video (every layer, every token row), so
the sampler can carry it through a jitted loop: reads are windows taken with
`dynamic_slice`, writes go through `dynamic_update_slice`. Rows are tokens in chunk order
(within a chunk: t, h, w row-major), keys stored after k-norm and rope, as upstream stores
them. Row r holds the token at global position r; rows at or past the current `end` were
never written (or hold stale keys) and are masked out by the reader.

Shapes: Lr layers, N rows (tokens of the whole video), G key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # (Lr, N, G, D)
    v: jax.Array  # (Lr, N, G, D)

    @classmethod
    def create(cls, layers: int, rows: int, groups: int, head_dim: int, dtype) -> KVCache:
        shape = (layers, rows, groups, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    # logical axis names of both arrays, for sharding.py
    AXES = ("layers", "kv_seq", "kv_heads", "head_dim")


def read_window(cache: KVCache, layer, end, size: int):
    """Rows [start, start + size) of one layer, the `size` rows just below `end` when possible.

    Returns (k, v, positions, ok): k/v (size, G, D), positions (size,) global row indices,
    ok (size,) True for rows below `end` (written by an earlier call).
    """
    size = min(size, cache.rows)
    start = jnp.clip(end - size, 0, cache.rows - size)
    idx = (layer, start, 0, 0)
    shape = (1, size) + cache.k.shape[2:]
    k = jax.lax.dynamic_slice(cache.k, idx, shape)[0]
    v = jax.lax.dynamic_slice(cache.v, idx, shape)[0]
    pos = start + jnp.arange(size, dtype=jnp.int32)
    ok = pos < end
    # zero unwritten rows: masked scores would still multiply them, and 0 * NaN is NaN
    k = jnp.where(ok[:, None, None], k, jnp.zeros_like(k))
    v = jnp.where(ok[:, None, None], v, jnp.zeros_like(v))
    return k, v, pos, ok


def write_rows(cache: KVCache, layer, start, k_new, v_new, count) -> KVCache:
    """Writes the first `count` rows of k_new/v_new (S, G, D) to rows [start, start + count)."""
    s = k_new.shape[0]
    keep = (jnp.arange(s) < count)[:, None, None]
    idx = (layer, start, 0, 0)
    shape = (1, s) + cache.k.shape[2:]

    def put(buf, new):
        old = jax.lax.dynamic_slice(buf, idx, shape)[0]
        return jax.lax.dynamic_update_slice(buf, jnp.where(keep, new.astype(buf.dtype), old)[None], idx)

    return KVCache(put(cache.k, k_new), put(cache.v, v_new))
