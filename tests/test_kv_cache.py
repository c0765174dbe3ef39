"""The KV cache makes a chunked computation equal to the whole one.

Block-causal attention over chunks [0, n) in one forward must equal the same forward split
in two: the first call writes its keys/values to the cache, the second attends to them from
there. Also: the cache is a fixed-size pytree that jit carries without retracing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.config import load_config
from magi_jax.dit import DiT
from magi_jax.forward_call import Captions, ForwardCall, Rows
from magi_jax.kv_cache import CacheSlots, KVCache, plan_slots, read_window, write_rows

CFG = load_config("tiny")


@pytest.fixture(scope="module")
def model():
    return DiT(CFG.model, rngs=nnx.Rngs(3))


def _inputs(n, cw=2, hw=8, seed=0):
    m = CFG.model
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m.in_channels, n * cw, hw, hw)).astype(np.float32)
    t = rng.uniform(0, 1, n).astype(np.float32)
    cap = rng.standard_normal((n, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = (np.arange(m.caption_max_length)[None] < rng.integers(5, 20, n)[:, None]).astype(np.float32)
    return x, t, cap, mask


def _ranges(first, count, tokens):
    ends = (np.arange(first, first + count) + 1) * tokens
    return np.stack([np.zeros_like(ends), ends], 1).astype(np.int32)


def _forward(model, data, chunks: range, t_total: int, cache, writes: bool):
    """Chunks [lo, hi) of `data` in one call that attends to the cache and writes its keys
    when `writes`; rope times centred on `t_total` frames."""
    x, t, cap, mask = data
    lo, hi = chunks.start, chunks.stop
    cw = x.shape[1] // t.shape[0]
    p = CFG.model.patch_size
    tokens = cw * (x.shape[2] // p) * (x.shape[3] // p)
    call = ForwardCall(
        t=t[lo:hi],
        kv_range=_ranges(lo, hi - lo, tokens),
        frame0=np.arange(lo, hi) * cw,
        t_total=np.full(hi - lo, t_total),
        first_chunk=lo,
        write_count=(hi - lo) * tokens if writes else 0,
        rows=Rows(read_cache=True, write_row=0),
    )
    out, cache = _run(
        *nnx.split(model), x[:, lo * cw : hi * cw], Captions(cap[None, lo:hi], mask[None, lo:hi]), call, cache
    )
    return out[0], cache


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, x, captions, call, cache):
    return nnx.merge(graphdef, state)(x, captions, call, cache)


def test_split_calls_equal_one_call(model):
    n, k, cw, hw = 4, 3, 2, 8
    tokens = cw * (hw // CFG.model.patch_size) ** 2
    m = CFG.model
    data = _inputs(n, cw, hw)
    empty = KVCache.create(m.num_layers, n * tokens, m.num_query_groups, m.kv_channels, jnp.float32)

    whole, cache_whole = _forward(model, data, range(0, n), n * cw, empty, writes=True)
    first, cache = _forward(model, data, range(0, k), k * cw, empty, writes=True)
    rest, cache = _forward(model, data, range(k, n), n * cw, cache, writes=True)

    # rope time positions of the first call see T_total = k*cw instead of n*cw: an identity
    # rescale either way, equal up to float32 rounding
    np.testing.assert_allclose(first, whole[:, : k * cw], rtol=0, atol=2e-5 * np.abs(whole).max())
    np.testing.assert_allclose(rest, whole[:, k * cw :], rtol=0, atol=2e-5 * np.abs(whole).max())
    np.testing.assert_allclose(cache.k, cache_whole.k, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cache.v, cache_whole.v, rtol=0, atol=1e-5)


def test_cache_matters(model):
    """Control: without the first call's keys in the cache the split result differs."""
    n, k, cw, hw = 4, 3, 2, 8
    tokens = cw * (hw // CFG.model.patch_size) ** 2
    m = CFG.model
    data = _inputs(n, cw, hw)
    empty = KVCache.create(m.num_layers, n * tokens, m.num_query_groups, m.kv_channels, jnp.float32)
    whole, _ = _forward(model, data, range(0, n), n * cw, empty, writes=True)
    rest, _ = _forward(model, data, range(k, n), n * cw, empty, writes=False)
    assert np.abs(rest - whole[:, k * cw :]).max() > 1e-2


def test_window_masks_unwritten_rows():
    cache = KVCache(jnp.full((1, 8, 1, 2), jnp.nan), jnp.full((1, 8, 1, 2), jnp.nan))
    cache = write_rows(cache, 0, jnp.array([0]), jnp.ones((4, 1, 2)), 2 * jnp.ones((4, 1, 2)), 3)
    k, v, pos, ok = read_window(cache, 0, 3, CacheSlots.by_position(3, 4, 8), 4)
    np.testing.assert_array_equal(pos, [0, 1, 2, 3])
    np.testing.assert_array_equal(ok, [True, True, True, False])
    assert np.isfinite(k).all() and np.isfinite(v).all()  # unwritten rows are zeroed, never NaN
    assert np.isnan(cache.k[0, 3:]).all()  # only `count` rows were written


def test_cache_is_a_fixed_pytree():
    cache = KVCache.create(2, 16, 1, 4, jnp.float32)
    traces = []

    @jax.jit
    def step(c, i):
        traces.append(1)
        return write_rows(c, 1, (i * 4)[None], jnp.full((4, 1, 4), i, jnp.float32), jnp.ones((4, 1, 4)), 4)

    for i in range(4):
        cache = step(cache, jnp.int32(i))
    assert len(traces) == 1 and cache.k.shape == (2, 16, 1, 4)
    np.testing.assert_array_equal(cache.k[1, :, 0, 0], np.repeat(np.arange(4), 4))


def test_ring_slots_wrap_and_read_oldest_first():
    """Chunk c lives in ring slot c mod N; a window reads the chunks just below the call in
    position order, across the wrap, and never sees the chunks of the call itself."""
    tokens, ring = 2, 3
    slots = plan_slots(first_chunk=4, chunks=2, window_chunks=2, ring_chunks=ring, tokens=tokens)
    np.testing.assert_array_equal(slots.write, [1 * tokens, 2 * tokens])  # chunks 4, 5 -> slots 1, 2
    np.testing.assert_array_equal(slots.read, [2 * tokens, 0])  # chunks 2, 3 -> slots 2, 0
    assert int(slots.read_start) == 2 * tokens
    early = plan_slots(first_chunk=1, chunks=2, window_chunks=2, ring_chunks=ring, tokens=tokens)
    np.testing.assert_array_equal(early.read, [0, tokens])
    assert int(early.read_start) == 0
    with pytest.raises(ValueError, match="does not fit a KV ring of 3"):
        plan_slots(first_chunk=0, chunks=4, window_chunks=2, ring_chunks=ring, tokens=tokens)

    # write chunks 0..4 one call at a time (key = position; chunk 4 overwrites chunk 1), read below chunk 4
    cache = KVCache.create(1, ring * tokens, 1, 1, jnp.float32)
    for c in range(5):
        pos = jnp.arange(c * tokens, (c + 1) * tokens, dtype=jnp.float32)[:, None, None]
        w = plan_slots(c, 1, 0, ring, tokens).write
        cache = write_rows(cache, 0, jnp.asarray(w), pos, -pos, tokens)
    k, v, pos, ok = read_window(cache, 0, 4 * tokens, slots, 2 * tokens)
    np.testing.assert_array_equal(pos, np.arange(4, 8))
    np.testing.assert_array_equal(k[:, 0, 0], np.arange(4, 8))  # the keys of positions 4..7, from slots 2 and 0
    np.testing.assert_array_equal(v[:, 0, 0], -np.arange(4, 8))
    assert ok.all()
