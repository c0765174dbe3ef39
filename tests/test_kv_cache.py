"""The KV cache makes a chunked computation equal to the whole one.

Block-causal attention over chunks [0, n) in one forward must equal the same forward split
in two: the first call writes its keys/values to the cache, the second attends to them from
there. Also: the cache is a fixed-size pytree that jit carries without retracing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.config import load_config
from magi_jax.dit import DiT
from magi_jax.kv_cache import KVCache, read_window, write_rows

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


@jax.jit
def _forward(state, graphdef_box, x, t, cap, mask, kv, frame0, t_total, cache, start, count):
    model = nnx.merge(graphdef_box.graphdef, state)
    out, cache = model(
        x,
        t,
        cap[None],
        mask[None],
        kv,
        frame0,
        t_total,
        cache=cache,
        new_start=start,
        write_count=count,
        read_cache=True,
        write_row=0,
    )
    return out[0], cache


@jax.tree_util.register_static
class _Box:
    def __init__(self, graphdef):
        self.graphdef = graphdef

    def __hash__(self):
        return hash(self.graphdef)

    def __eq__(self, other):
        return self.graphdef == other.graphdef


def test_split_calls_equal_one_call(model):
    n, k, cw, hw = 4, 3, 2, 8
    tokens = cw * (hw // 2) ** 2
    m = CFG.model
    graphdef, state = nnx.split(model)
    box = _Box(graphdef)
    x, t, cap, mask = _inputs(n, cw, hw)
    empty = KVCache.create(m.num_layers, n * tokens, m.num_query_groups, m.kv_channels, jnp.float32)
    frames = np.arange(n) * cw

    whole, cache_whole = _forward(
        state, box, x, t, cap, mask, _ranges(0, n, tokens), frames, np.full(n, n * cw), empty, 0, n * tokens
    )

    first, cache = _forward(
        state,
        box,
        x[:, : k * cw],
        t[:k],
        cap[:k],
        mask[:k],
        _ranges(0, k, tokens),
        frames[:k],
        np.full(k, k * cw),
        empty,
        0,
        k * tokens,
    )
    rest, cache = _forward(
        state,
        box,
        x[:, k * cw :],
        t[k:],
        cap[k:],
        mask[k:],
        _ranges(k, n - k, tokens),
        frames[k:],
        np.full(n - k, n * cw),
        cache,
        k * tokens,
        (n - k) * tokens,
    )

    # rope time positions of the first call see T_total = k*cw instead of n*cw: an identity
    # rescale either way, equal up to float32 rounding
    np.testing.assert_allclose(first, whole[:, : k * cw], rtol=0, atol=2e-5 * np.abs(whole).max())
    np.testing.assert_allclose(rest, whole[:, k * cw :], rtol=0, atol=2e-5 * np.abs(whole).max())
    np.testing.assert_allclose(cache.k, cache_whole.k, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cache.v, cache_whole.v, rtol=0, atol=1e-5)


def test_cache_matters(model):
    """Control: without the first call's keys in the cache the split result differs."""
    n, k, cw, hw = 4, 3, 2, 8
    tokens = cw * (hw // 2) ** 2
    m = CFG.model
    graphdef, state = nnx.split(model)
    x, t, cap, mask = _inputs(n, cw, hw)
    empty = KVCache.create(m.num_layers, n * tokens, m.num_query_groups, m.kv_channels, jnp.float32)
    frames = np.arange(n) * cw
    whole, _ = _forward(
        state, _Box(graphdef), x, t, cap, mask, _ranges(0, n, tokens), frames, np.full(n, n * cw), empty, 0, n * tokens
    )
    rest, _ = _forward(
        state,
        _Box(graphdef),
        x[:, k * cw :],
        t[k:],
        cap[k:],
        mask[k:],
        _ranges(k, n - k, tokens),
        frames[k:],
        np.full(n - k, n * cw),
        empty,
        k * tokens,
        0,
    )
    assert np.abs(rest - whole[:, k * cw :]).max() > 1e-2


def test_window_masks_unwritten_rows():
    cache = KVCache(jnp.full((1, 8, 1, 2), jnp.nan), jnp.full((1, 8, 1, 2), jnp.nan))
    cache = write_rows(cache, 0, 0, jnp.ones((4, 1, 2)), 2 * jnp.ones((4, 1, 2)), 3)
    k, v, pos, ok = read_window(cache, 0, 3, 4)
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
        return write_rows(c, 1, i * 4, jnp.full((4, 1, 4), i, jnp.float32), jnp.ones((4, 1, 4)), 4)

    for i in range(4):
        cache = step(cache, i)
    assert len(traces) == 1 and cache.k.shape == (2, 16, 1, 4)
    np.testing.assert_array_equal(cache.k[1, :, 0, 0], np.repeat(np.arange(4), 4))
