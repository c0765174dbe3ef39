"""The typed forward call: the cache-write contract of `plan_call`, and the scopes a profile shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.config import load_config
from magi_jax.dit import DiT
from magi_jax.forward_call import Captions, Window
from magi_jax.guidance import ChunkGeometry, DispatchStep, jit_guided, plan_call
from magi_jax.kv_cache import KVCache
from magi_jax.schedule import cfg_scales

BASE = load_config("tiny")
DISTILLED = BASE.replace(engine=dict(distill=True), runtime=dict(cfg_number=1))
CHUNK = ChunkGeometry(frames=2, tokens=32)


def _step(first_chunk, chunks, **flags):
    t = np.linspace(0.2, 0.8, chunks, dtype=np.float32)
    ends = (first_chunk + np.arange(chunks) + 1) * CHUNK.tokens
    return DispatchStep(first_chunk, t, np.stack([np.zeros(chunks), ends], 1).astype(np.int32), **flags)


@pytest.mark.parametrize(
    "config, extra, first_chunk, flags, written",
    [
        (BASE, False, 0, {}, 0),  # the first window: nothing before it, nothing cached yet
        (BASE, False, 2, {}, 3),  # earlier chunks exist: the window's keys are cached
        (BASE, True, 1, {}, 3),  # the re-encoded clean chunk refreshes its rows
        (BASE, False, 0, dict(encodes_prefix=True), 3),
        (BASE, False, 2, dict(near_clean=True), 2),  # 3-way guidance leaves the last chunk out
        (DISTILLED, False, 2, dict(near_clean=True, distill_dt=4.0), 3),  # distilled: all
    ],
)
def test_cache_write_contract(config, extra, first_chunk, flags, written):
    window = Window(3, extra_clean_chunk=extra)
    call = plan_call(config, window, _step(first_chunk, 3, **flags), CHUNK)
    assert int(call.write_count) == written * CHUNK.tokens
    assert call.rows.write_row == (1 if config.runtime.cfg_number == 3 else 0) and call.rows.read_cache
    np.testing.assert_array_equal(call.frame0, (first_chunk + np.arange(3)) * CHUNK.frames)
    np.testing.assert_array_equal(call.t_total, np.full(3, (first_chunk + 3) * CHUNK.frames))


def test_cfg_scales_come_from_the_schedule_lookup():
    call = plan_call(BASE, Window(3, extra_clean_chunk=True), _step(1, 3), CHUNK)
    np.testing.assert_array_equal(call.cfg_scales, np.stack(cfg_scales(call.t[1:], BASE.runtime)))
    assert plan_call(DISTILLED, Window(3), _step(1, 3, distill_dt=4.0), CHUNK).cfg_scales is None


def test_the_call_carries_its_ring_slots():
    """With a KV ring of 6 chunks, a call over chunks 5, 6 with a 4-chunk cache window reads
    chunks 1..4 and writes chunks 5 and 6 (6 wraps to ring slot 0); without a ring: no slots."""
    ring = ChunkGeometry(CHUNK.frames, CHUNK.tokens, ring_chunks=6)
    call = plan_call(BASE, Window(2, cache_window=4 * CHUNK.tokens), _step(5, 2), ring)
    np.testing.assert_array_equal(call.cache_slots.read, np.arange(1, 5) * CHUNK.tokens)
    np.testing.assert_array_equal(call.cache_slots.write, [5 * CHUNK.tokens, 0])
    assert int(call.cache_slots.read_start) == 1 * CHUNK.tokens
    assert plan_call(BASE, Window(2, cache_window=4 * CHUNK.tokens), _step(5, 2), CHUNK).cache_slots is None


def test_profile_scopes():
    """The lowered program names its parts (what a profile shows)."""
    m = BASE.model
    model = DiT(m, rngs=nnx.Rngs(0))
    call = plan_call(BASE, Window(2, cache_window=4 * CHUNK.tokens), _step(2, 2), CHUNK)
    x = jnp.zeros((m.in_channels, 2 * 2, 8, 8), jnp.float32)
    captions = Captions(
        jnp.zeros((2, 2, m.caption_max_length, m.caption_channels)), jnp.ones((2, 2, m.caption_max_length))
    )
    cache = KVCache.create(m.num_layers, 4 * CHUNK.tokens, m.num_query_groups, m.kv_channels, jnp.float32)
    guided = jit_guided(model, BASE)
    text = jax.jit(lambda *a: guided(*a)).lower(x, captions, call, cache).as_text(debug_info=True)
    for scope in (
        "patch_embed",
        "condition_embed",
        "caption_embed",
        "dit_layer",
        "self_attention",
        "cross_attention",
        "mlp",
        "cond_rows",
        "uncond_row",
        "cfg_mix",
    ):
        assert scope in text, scope
    assert "no_such_scope" not in text
