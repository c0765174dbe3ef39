"""Long videos: the ring-buffer sampler equals the whole-video one, noise draws, prompt changes."""

import numpy as np
import pytest
from flax import nnx
from test_timeline import NULL, TABLE, fake_encoder

from magi_jax.config import load_config
from magi_jax.dit import DiT
from magi_jax.sampler import WHOLE_DRAW_MAX_CHUNKS, Sampler, cache_rows, latent_slots, layout
from magi_jax.timeline import ChunkCaptions

# 96 frames = 24 latent frames = 12 chunks: past the TINY ring (4 chunks of reach + a window of 4)
pytestmark = pytest.mark.slow  # 12-chunk TINY runs: minutes on 2 shared cores

LONG = load_config("tiny").replace(runtime=dict(num_frames=96, video_size_h=32, video_size_w=32))


CALM = "a boat on a calm lake"


@pytest.fixture(scope="module")
def model():
    return DiT(LONG.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ring(model):
    return Sampler(model, LONG)


@pytest.fixture(scope="module")
def calm_run(ring):
    """12 chunks under one prompt, seed 4 (upstream's whole-video draw: 12 chunks is short)."""
    return _host(ring.chunks(_captions(LONG, ring.layout(), CALM), seed=4))


def _host(chunks):
    return [np.asarray(c) for c in chunks]


def _captions(cfg, lay, story, prefix_frames=0):
    m = cfg.model
    return ChunkCaptions(
        story, fake_encoder([]), NULL, cfg.runtime, TABLE, m.caption_max_length, lay.chunk_num, prefix_frames
    )


def test_ring_equals_whole_video_sampler(model, ring, calm_run):
    whole = Sampler(model, LONG, ring=False)
    lay = ring.layout()
    assert cache_rows(LONG, lay) < lay.chunk_num * lay.chunk_tokens, "the KV ring must wrap in this run"
    assert latent_slots(LONG, lay) < lay.chunk_num
    want = _host(whole.chunks(_captions(LONG, lay, CALM), noise=np.asarray(ring.initial_noise(4, lay))))
    assert ring.cache_shape[1] == cache_rows(LONG, lay) and whole.cache_shape[1] == lay.chunk_num * lay.chunk_tokens
    assert len(calm_run) == len(want) == lay.chunk_num
    for i, (a, b) in enumerate(zip(calm_run, want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=f"chunk {i}")


def _source(sampler, lay, draw):
    sampler.noise_draw = draw
    try:
        return sampler.noise_source(lay, None, 9)
    finally:
        sampler.noise_draw = "auto"


def test_noise_draws(model, ring):
    """'video' is upstream's one draw; 'chunk' draws each chunk from (seed, chunk); 'auto' picks
    the whole draw for runs up to WHOLE_DRAW_MAX_CHUNKS chunks, per-chunk draws past them."""
    lay = ring.layout()
    n = lay.chunk_num
    per_chunk = np.concatenate([np.asarray(ring.chunk_noise(9, lay, i)) for i in range(n)], 1)
    whole = np.asarray(ring.initial_noise(9, lay))
    np.testing.assert_array_equal(_source(ring, lay, "chunk")(0, n), per_chunk)
    np.testing.assert_array_equal(_source(ring, lay, "video")(0, n), whole)
    np.testing.assert_array_equal(_source(ring, lay, "auto")(0, n), whole)
    long = layout(LONG.replace(runtime=dict(num_frames=8 * (WHOLE_DRAW_MAX_CHUNKS + 1))))
    got = _source(ring, long, "auto")(30, 33)
    np.testing.assert_array_equal(got, np.concatenate([ring.chunk_noise(9, long, i) for i in (30, 31, 32)], 1))
    # the per-chunk draw is what a run uses
    ring.noise_draw = "chunk"
    try:
        a = _host(ring.chunks(_captions(LONG, lay, CALM), seed=9))
    finally:
        ring.noise_draw = "auto"
    b = _host(ring.chunks(_captions(LONG, lay, CALM), noise=per_chunk))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="unknown noise draw 'nope'"):
        Sampler(model, LONG, noise_draw="nope")


def test_prompt_change_mid_run_keeps_earlier_chunks(ring, calm_run):
    """An interactive prompt changed while the video streams: every chunk that had started
    is exactly what a run without the change gives; chunks started after it differ."""
    lay = ring.layout()
    window = LONG.runtime.window_size
    current = {"prompt": CALM}
    live = _captions(LONG, lay, lambda chunk, seconds: current["prompt"])
    changed = []
    for i, chunk in enumerate(ring.chunks(live, seed=4)):
        changed.append(np.asarray(chunk))
        if i == 2:  # the user types a new prompt after the third chunk arrives
            current["prompt"] = "lightning strikes the boat"
    started_before = 2 + window  # chunks 0..5 had entered the window when chunk 2 left it
    assert [p for _, _, p in live.asked].index("lightning strikes the boat") == started_before
    for i in range(started_before):
        np.testing.assert_array_equal(changed[i], calm_run[i], err_msg=f"chunk {i} changed")
    assert all(np.abs(changed[i] - calm_run[i]).max() > 1e-4 for i in range(started_before, lay.chunk_num))
