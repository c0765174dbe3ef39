"""The TPU attention kernel: flash attention over one key range per query chunk, block-sparse.

Each query chunk r sees the key rows [lo[r], hi[r]) of a buffer - for self-attention the
layer's key buffer by global position (attention.key_buffer), for cross-attention its own
caption's first hi[r] tokens - or one range in each of several buffers
(`ranged_attention_over`): the sampler's self-attention reads the cache window and the
call's own keys as two, so that they are never copied into one buffer (on 4.5B_base's
largest TPU step that buffer, one per guidance row, and its heads-first copy took 1.9 GiB
per chip). The sources' key steps follow one another on the grid, the softmax statistics
carried across them. The kernel walks only the key blocks a range touches: the
ranges are prefetched scalars, a key block's index is computed from them (clamped to the
range's last block, so a step past the range asks for the block already in VMEM and no copy
is made), and a step past the range does no arithmetic. Keys outside the range inside the two
edge blocks are masked, their values zeroed (a row outside the range may hold anything).

So the buffers are read in place: no per-chunk slice of them, no sort or gather, and K/V are not
repeated per query head - the H / G query heads of a group are extra query rows of that
group (no causal mask, so rows are independent).

Numerics are flash attention's (attention.py): float32 scores and softmax statistics,
probabilities rounded to the value dtype before P @ V, normalised by the float32 row sum; a
chunk with an empty range gets zeros.

Off TPU the kernel runs in Pallas's interpreter (tests; MAGI_ATTENTION=pallas on a CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Q_TILE = 512  # query rows per block (a group's heads x tokens)
K_TILE = 512  # key rows per block
LANES = 128  # the softmax statistics are kept lane-wide, as TPU vectors are


def block_start(lo, j, k_tile: int):
    """The first key row of step j's block for a range starting at row lo (rows are >= 0, so
    a truncating division: a floor would lower through `sign`, which needs a TPU to ask)."""
    return (jax.lax.div(lo, k_tile) + j) * k_tile


def computes(lo, hi, j, k_tile: int):
    """Whether step j does arithmetic: the range is not empty and its block starts before the
    range ends (so every block computed holds a key of the range: no row max is -inf)."""
    return (lo < hi) & (block_start(lo, j, k_tile) < hi)


def key_block(lo, hi, j, k_tile: int, last: int):
    """The key block step j reads: the range's blocks in order, then its last block again (a
    block index that does not change is not copied again)."""
    first = jax.lax.div(lo, k_tile)
    end = jax.lax.div(jnp.maximum(hi - 1, lo), k_tile)  # the range's last block (its first if empty)
    return jnp.minimum(jnp.minimum(first + j, end), last)


def _kernel(lo_ref, hi_ref, q_ref, *refs, scale, tiles, steps):
    """One (chunk, key group, query tile) over its key steps: each source's steps in turn
    (`steps[s]` of source s, of `tiles[s]` rows), the softmax carried across them."""
    sources = len(tiles)
    kv_refs, (o_ref, m_ref, l_ref, acc_ref) = refs[: 2 * sources], refs[2 * sources :]
    r, j = pl.program_id(0), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    first = 0
    for src in range(sources):
        k_ref, v_ref, k_tile = kv_refs[2 * src], kv_refs[2 * src + 1], tiles[src]
        lo, hi = lo_ref[src, r], hi_ref[src, r]
        step = j - first
        here = (step >= 0) & (step < steps[src])

        # a block wholly past the range: nothing to do, nothing copied
        @pl.when(here & computes(lo, hi, step, k_tile))
        def _(k_ref=k_ref, v_ref=v_ref, k_tile=k_tile, lo=lo, hi=hi, step=step):
            start = block_start(lo, step, k_tile)
            q, k, v = q_ref[...], k_ref[...], v_ref[...]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            rows = start + jax.lax.broadcasted_iota(jnp.int32, (1, k_tile), 1)
            s = jnp.where((rows >= lo) & (rows < hi), s, -jnp.inf)  # a computed block holds a key of the range
            m_prev = m_ref[...]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - m_next[:, :1])
            alpha = jnp.exp(m_prev - m_next)
            l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[...] = m_next
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (k_tile, 1), 0)
            v = jnp.where((cols >= lo) & (cols < hi), v, jnp.zeros_like(v))
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

        first += steps[src]

    @pl.when(j == first - 1)
    def _():
        total = l_ref[...][:, :1]  # 0 for an empty range
        o_ref[...] = jnp.where(total > 0, acc_ref[...] / jnp.where(total > 0, total, 1.0), 0.0).astype(o_ref.dtype)


def ranged_attention(q, k, v, lo, hi, span: int):
    """q (R, N, H, D); k, v (G, K, D) one buffer for all chunks, or (R, G, K, D) a buffer per
    chunk; lo, hi (R,) each chunk's rows [lo, hi); span: a static bound on hi - lo (the grid's
    key steps). Off TPU it runs in Pallas's interpreter. -> (R, N, H, D)."""
    return ranged_attention_over(q, ((k, v),), lo[None], hi[None], (span,))


def ranged_attention_over(q, sources, lo, hi, spans, span: int | None = None):
    """Attention over the union of one key range in each of several buffers (the cache
    window and this call's keys, read where they lie rather than copied into one buffer).

    q (R, N, H, D); sources: ((k, v), ...) each (G, K_s, D) shared by the chunks or
    (R, G, K_s, D) one per chunk; lo, hi (S, R) each chunk's rows [lo, hi) of each source;
    spans: per source, a static bound on hi - lo; span: one on the keys a chunk sees in all
    (default: their sum; only XLA's cost estimate reads it). -> (R, N, H, D)."""
    r, n, h, d = q.shape
    g = sources[0][0].shape[-3]
    rep = h // g
    q_rows = rep * n
    q_tile = q_rows if q_rows <= Q_TILE else Q_TILE
    # query rows of group g: its rep heads' tokens, head-major (the one copy the kernel needs)
    qg = q.reshape(r, n, g, rep, d).transpose(0, 2, 3, 1, 4).reshape(r, g, q_rows, d)
    q_spec = pl.BlockSpec((None, None, q_tile, d), lambda r_, g_, i, j, lo_, hi_: (r_, g_, i, 0))

    tiles, steps, kv_specs, operands = [], [], [], []
    first = 0
    for src, ((k, v), bound) in enumerate(zip(sources, spans, strict=True)):
        rows = k.shape[-2]
        # a dimension that fits one tile is one block; a longer one ends in a partial block,
        # whose rows past the array hold anything (masked: they lie past every range)
        k_tile = rows if rows <= K_TILE else K_TILE
        last = -(-rows // k_tile) - 1
        count = min(-(-min(bound, rows) // k_tile) + 1, last + 1)  # blocks a range of `bound` rows touches
        per_chunk = k.ndim == 4

        # before its steps a source holds its range's first block (copied once, ahead), after
        # them its last: a block index that does not change is not copied again
        def kv_index(r_, g_, i, j, lo_, hi_, src=src, first=first, k_tile=k_tile, last=last, per_chunk=per_chunk):
            block = key_block(lo_[src, r_], hi_[src, r_], jnp.maximum(j - first, 0), k_tile, last)
            return (r_, g_, block, 0) if per_chunk else (g_, block, 0)

        spec = pl.BlockSpec((None,) * (k.ndim - 2) + (k_tile, d), kv_index)
        tiles.append(k_tile)
        steps.append(count)
        kv_specs += [spec, spec]
        operands += [k, v]
        first += count
    grid = (r, g, -(-q_rows // q_tile), first)
    kernel = functools.partial(_kernel, scale=1.0 / math.sqrt(d), tiles=tuple(tiles), steps=tuple(steps))

    # what XLA's cost analysis counts (the ranges are only known at run time: at most `span` keys)
    item = jnp.dtype(q.dtype).itemsize
    visible = sum(min(s, k.shape[-2]) for (k, _), s in zip(sources, spans))
    visible = visible if span is None else min(span, visible)
    cost = pl.CostEstimate(
        flops=4 * r * g * q_rows * visible * d,
        transcendentals=r * g * q_rows * visible,
        bytes_accessed=item * r * g * (2 * q_rows * d + -(-q_rows // q_tile) * 2 * visible * d),
    )

    def call(interpret: bool):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=grid,
                in_specs=[q_spec, *kv_specs],
                out_specs=q_spec,
                scratch_shapes=[
                    pltpu.VMEM((q_tile, LANES), jnp.float32),
                    pltpu.VMEM((q_tile, LANES), jnp.float32),
                    pltpu.VMEM((q_tile, d), jnp.float32),
                ],
            ),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="magi_ranged_attention",
            cost_estimate=cost,
        )(jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32), qg, *operands)

    # compiled or interpreted is chosen when the program is lowered, for the platform it is
    # lowered for (an AOT compile for a TPU slice on a CPU host gets the kernel)
    out = jax.lax.platform_dependent(tpu=lambda: call(False), default=lambda: call(True))
    out = out.reshape(r, g, rep, n, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(r, n, h, d)
