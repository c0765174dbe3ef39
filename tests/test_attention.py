"""Attention: the blocked (flash-style) path equals the one-shot softmax, masks behave."""

import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import _attend, _dense, chunk_self_attention


def _inputs(n=37, keys=53, h=4, g=2, d=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((n, h, d)) * 2, dtype)
    k = jnp.asarray(rng.standard_normal((keys, g, d)) * 2, dtype)
    v = jnp.asarray(rng.standard_normal((keys, g, d)), dtype)
    visible = jnp.asarray(rng.uniform(size=keys) < 0.6)
    return q, k, v, visible


@pytest.mark.parametrize("q_block,k_block", [(8, 16), (37, 5), (5, 53)])
def test_blocked_equals_dense(q_block, k_block):
    q, k, v, visible = _inputs()
    np.testing.assert_allclose(_attend(q, k, v, visible, q_block, k_block), _dense(q, k, v, visible), atol=2e-6)


def test_blocked_bf16_close_to_dense():
    q, k, v, visible = _inputs(dtype=jnp.bfloat16)
    a = np.asarray(_attend(q, k, v, visible, 8, 16), np.float32)
    b = np.asarray(_dense(q, k, v, visible), np.float32)
    assert np.abs(a - b).max() < 3e-2


def test_no_visible_key_gives_zeros():
    q, k, v, _ = _inputs()
    none = jnp.zeros(k.shape[0], bool)
    assert np.all(np.asarray(_attend(q, k, v, none)) == 0)
    assert np.all(np.asarray(_attend(q, k, v, none, 8, 16)) == 0)


def test_gqa_head_mapping():
    # query head h reads kv head h // (H / G): give kv head 1 zero values
    q, k, v, visible = _inputs()
    v = v.at[:, 1].set(0.0)
    out = np.asarray(_dense(q, k, v, visible.at[0].set(True)))
    assert np.abs(out[:, 2:]).max() == 0 and np.abs(out[:, :2]).max() > 0


def test_chunks_see_only_their_key_ranges():
    n, r = 4, 3
    q, k, v, _ = _inputs(n=n * r, keys=n * r)
    pos = jnp.arange(n * r, dtype=jnp.int32)
    ranges = jnp.array([[0, 4], [0, 8], [4, 12]], jnp.int32)
    out = chunk_self_attention(q, k, v, pos, jnp.ones(n * r, bool), ranges, n)
    for c, (lo, hi) in enumerate(np.asarray(ranges)):
        vis = (np.arange(n * r) >= lo) & (np.arange(n * r) < hi)
        want = _dense(q[c * n : (c + 1) * n], k, v, jnp.asarray(vis))
        np.testing.assert_allclose(out[c * n : (c + 1) * n], want, atol=1e-6)
