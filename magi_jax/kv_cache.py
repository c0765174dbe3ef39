"""The KV cache: keys and values of clean chunks that later chunks attend to.

A fixed-size pytree allocated once per run, so the sampler can carry it through a jitted
loop. Tokens are in chunk order (within a chunk: t, h, w row-major), keys stored after
k-norm and rope, as upstream stores them.

It is a ring buffer: the token at global position p lives in row p mod N. MAGI-1's schedule
bounds how far back any chunk attends (`noise2clean_kvrange`, `clean_chunk_kvrange`), so N
only has to cover that span plus the rows one call writes (sampler_plan.cache_rows), and a video
of any length runs in the same memory. Where each call reads and writes is planned on the
host with the rest of the schedule (`plan_slots`, carried in the ForwardCall); positions
stay global everywhere else (rotary embeddings, key ranges), so the ring is invisible
outside this module. Reads are chunk-sized slices (`dynamic_slice`), never a gather; a call's
writes are one scatter of its rows, so the cache stays in place in the layer scan.

A call without planned slots (a direct DiT call, an upstream-recorded call replayed) reads
the cache by position: one slice holding row = position (`CacheSlots.by_position`), the
same code with a single block. Rows not written by an earlier call are masked out by the
reader.

Shapes: Lr layers, N rows, G key/value heads, D head dim, W blocks read, R chunks written.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax import sharding


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheSlots:
    """Where one call reads and writes the cache: the first row of each block.

    read: (W,) int32, the blocks of the window below the call's first token, oldest first;
    read_start: () int32, the global position of the window's first token;
    write: (R,) int32, one block per chunk of the call (its tokens, in order).
    A block is the read size / W rows (reads) or the written rows / R (writes).
    """

    read: jax.Array
    read_start: jax.Array
    write: jax.Array

    @staticmethod
    def by_position(end, size: int, rows: int) -> CacheSlots:
        """Row = position: the `size` rows just below `end` (clipped to the cache) in one
        block, and one block written from `end` on."""
        start = jnp.clip(end - size, 0, rows - size).astype(jnp.int32)
        return CacheSlots(start[None], start, jnp.asarray(end, jnp.int32)[None])


def plan_slots(first_chunk: int, chunks: int, window_chunks: int, ring_chunks: int, tokens: int) -> CacheSlots:
    """The slots (host numpy) of a call over chunks [first_chunk, first_chunk + chunks) that
    reads the `window_chunks` chunks below it (from chunk 0 while there are fewer), in a ring
    of `ring_chunks` chunks of `tokens` rows."""
    if window_chunks > ring_chunks or chunks > ring_chunks:
        raise ValueError(
            f"a call over {chunks} chunks reading {window_chunks} below it does not fit a KV ring of {ring_chunks}"
        )
    first_read = max(first_chunk - window_chunks, 0)
    read = (first_read + np.arange(window_chunks)) % ring_chunks * tokens
    write = (first_chunk + np.arange(chunks)) % ring_chunks * tokens
    return CacheSlots(read.astype(np.int32), np.int32(first_read * tokens), write.astype(np.int32))


def _layer_rows(buf, layer):
    """One layer of the stacked cache (rows, G, D), its rows still split over `seq`."""
    return sharding.constrain(jax.lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False), KVCache.AXES[1:])


def read_window(cache: KVCache, layer, end, slots: CacheSlots, size: int):
    """`size` rows of one layer, read block by block at `slots.read`.

    Returns (k, v, positions, ok): k/v (size, G, D), positions (size,) global token
    positions, ok (size,) True for positions below `end` (written by an earlier call).
    """
    blocks = slots.read.shape[0]
    if size % blocks:
        raise ValueError(f"a cache window of {size} rows cannot be read in {blocks} equal blocks")
    block = size // blocks
    # the layer first, its rows still split over `seq`: a row slice at a traced offset makes
    # XLA gather its operand to every device, and from the whole stacked cache it gathered
    # every layer at once, ahead of the layer loop (3.4 GB per device at 4.5B, 720x720)
    k_rows, v_rows = _layer_rows(cache.k, layer), _layer_rows(cache.v, layer)
    k = jnp.concatenate([jax.lax.dynamic_slice_in_dim(k_rows, slots.read[j], block) for j in range(blocks)])
    v = jnp.concatenate([jax.lax.dynamic_slice_in_dim(v_rows, slots.read[j], block) for j in range(blocks)])
    pos = slots.read_start + jnp.arange(size, dtype=jnp.int32)
    ok = pos < end
    # zero unwritten rows: masked scores would still multiply them, and 0 * NaN is NaN
    k = jnp.where(ok[:, None, None], k, jnp.zeros_like(k))
    v = jnp.where(ok[:, None, None], v, jnp.zeros_like(v))
    return k, v, pos, ok


def write_rows(cache: KVCache, layer, rows, k_new, v_new, count) -> KVCache:
    """Writes the first `count` rows of k_new/v_new (S, G, D), split in equal blocks, block i
    from row `rows[i]` on (rows: the first S / block entries of a CacheSlots.write).

    One scatter of the S rows (rows past `count` get distinct indices past the cache and are
    dropped): XLA updates the cache in place, where a chain of one dynamic_update_slice per
    block made it copy the whole cache in the layer scan."""
    s = k_new.shape[0]
    if s > cache.rows:
        raise ValueError(f"a call writes {s} key rows but the KV cache holds {cache.rows}")
    blocks = rows.shape[0]
    if s % blocks:
        raise ValueError(f"{s} written rows cannot be split in {blocks} equal blocks")
    block = s // blocks
    at = (jnp.asarray(rows, jnp.int32)[:, None] + jnp.arange(block, dtype=jnp.int32)).reshape(s)
    at = jnp.where(jnp.arange(s) < count, at, cache.rows + jnp.arange(s, dtype=jnp.int32))

    def put(buf, new):
        return buf.at[layer, at].set(new.astype(buf.dtype), mode="drop", unique_indices=True)

    return KVCache(put(cache.k, k_new), put(cache.v, v_new))
