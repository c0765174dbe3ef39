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


# --------------------------------------------------------------------------- implementations

from magi_jax import attention  # noqa: E402
from magi_jax.attention import available_implementations, chunk_cross_attention, implementation  # noqa: E402


def _sampler_like(dtype, seed=0):
    """Keys as a forward sees them: a cache window (its last rows unwritten) then the new keys;
    each chunk's range as the sampler's noise-dependent kv ranges make them (one sees nothing)."""
    rng = np.random.default_rng(seed)
    n, r, window, h, g, d = 8, 3, 16, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((r * n, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((window + r * n, g, d)), dtype)
    v = jnp.asarray(rng.standard_normal((window + r * n, g, d)), dtype)
    new_start = 12  # rows 12..15 of the window were never written
    pos = jnp.concatenate([jnp.arange(window), new_start + jnp.arange(r * n)]).astype(jnp.int32)
    ok = jnp.concatenate([jnp.arange(window) < new_start, jnp.ones(r * n, bool)])
    ranges = jnp.array([[4, 20], [0, 28], [40, 40]], jnp.int32)
    return q, k, v, pos, ok, ranges, n


@pytest.mark.parametrize("impl", available_implementations())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_available_implementation_matches_the_reference(impl, dtype):
    q, k, v, pos, ok, ranges, n = _sampler_like(dtype)
    if dtype == jnp.float32 and impl in ("cudnn", "pallas"):
        pytest.skip("fused kernels take 16-bit inputs; float32 uses the reference")
    ref = np.asarray(chunk_self_attention(q, k, v, pos, ok, ranges, n, impl="xla"), np.float32)
    got = np.asarray(chunk_self_attention(q, k, v, pos, ok, ranges, n, impl=impl), np.float32)
    tol = 2e-6 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, ref, atol=tol)
    assert np.all(got[2 * n :] == 0), "a chunk with no visible key gets zeros"

    cap_k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 10, 2, 8)), dtype)
    cap_v = jnp.asarray(np.random.default_rng(2).standard_normal((3, 10, 2, 8)), dtype)
    cap_mask = jnp.asarray(np.arange(10)[None] < np.array([[7], [10], [0]]))  # prefixes, one empty
    ref = np.asarray(chunk_cross_attention(q, cap_k, cap_v, cap_mask, n, impl="xla"), np.float32)
    got = np.asarray(chunk_cross_attention(q, cap_k, cap_v, cap_mask, n, impl=impl), np.float32)
    np.testing.assert_allclose(got, ref, atol=tol)


@pytest.mark.parametrize(
    "backend, dtype, env, want",
    [
        ("cpu", jnp.bfloat16, None, "xla"),
        ("gpu", jnp.bfloat16, None, "cudnn"),
        ("gpu", jnp.float32, None, "xla"),
        ("tpu", jnp.bfloat16, None, "pallas"),
        ("cpu", jnp.bfloat16, "dpa", "dpa"),
    ],
)
def test_implementation_follows_the_backend(monkeypatch, backend, dtype, env, want):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: backend)
    if env:
        monkeypatch.setenv("MAGI_ATTENTION", env)
    else:
        monkeypatch.delenv("MAGI_ATTENTION", raising=False)
    assert implementation(dtype) == want


def test_unknown_implementation_is_refused(monkeypatch):
    monkeypatch.setenv("MAGI_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="MAGI_ATTENTION='fastest'"):
        implementation()
