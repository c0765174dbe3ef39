"""Long videos: the ring-buffer sampler equals the whole-video one, noise draws, prompt changes."""

import numpy as np
import pytest
from flax import nnx
from test_timeline import TABLE, fake_encoder
from train_clips import mechanics_config

from magi_jax.attention import CAPTION_MULTIPLE
from magi_jax.dit import DiT
from magi_jax.sampler import WHOLE_DRAW_MAX_CHUNKS, Sampler, _CaptionFeed
from magi_jax.sampler_plan import cache_rows, latent_slots, layout
from magi_jax.timeline import ChunkCaptions

# 96 frames = 24 latent frames = 12 chunks: past the TINY ring (4 chunks of reach + a window of 4);
# 4 steps (one per stage): the programs and the ring's wrap are those of 8, at half the run time
# captions of 96 tokens (TINY: 64): room for a prompt past the null caption's bucket (GALE)
LONG = mechanics_config(
    model=dict(caption_max_length=96), runtime=dict(num_frames=96, video_size_h=32, video_size_w=32, num_steps=4)
)
NULL = np.random.default_rng(7).standard_normal((1, 96, LONG.model.caption_channels)).astype(np.float32)

CALM = "a boat on a calm lake"
STORM = "lightning strikes the boat"  # more caption tokens than CALM; the same trimmed length (the null caption's)
# 70 caption tokens: past the null caption's 50 (bucket 64), so the windows it enters run 80
GALE = "a gale rises, waves break over the bow and the sky turns black as night"


@pytest.fixture(scope="module")
def model():
    return DiT(LONG.model, rngs=nnx.Rngs(0))


def _host(chunks):
    return [np.asarray(c) for c in chunks]


def _captions(cfg, lay, story, prefix_frames=0):
    m = cfg.model
    return ChunkCaptions(
        story,
        fake_encoder([], m.caption_max_length),
        NULL,
        cfg.runtime,
        TABLE,
        m.caption_max_length,
        lay.chunk_num,
        prefix_frames,
    )


def _source(sampler, lay, draw):
    sampler.noise_draw = draw
    try:
        return sampler.noise_source(lay, None, 9)
    finally:
        sampler.noise_draw = "auto"


@pytest.mark.slow  # 12-chunk TINY runs
def test_long_runs(model):
    """Five 12-chunk runs in one test, so that the ring sampler's programs are compiled once
    (pytest-xdist would hand separate tests to separate workers, each compiling them again):
    the ring == the whole-video sampler past the ring's wrap (issue 13 item 2), a prompt
    changed mid-run keeps every chunk started before the change (item 6), the noise draws and
    a run using the per-chunk draw it is asked for (item 1)."""
    ring = Sampler(model, LONG)
    lay = ring.layout()
    calm = _host(ring.chunks(_captions(LONG, lay, CALM), seed=4))  # 12 chunks: upstream's whole-video draw
    compiled = ring.compilations
    _check_ring_equals_whole_video(model, ring, lay, calm)
    _check_prompt_change_keeps_earlier_chunks(ring, lay, calm)
    assert ring.compilations == compiled, "the prompt change compiled new programs"
    _check_noise_draws(model, ring, lay)
    _check_run_uses_chunk_draw(ring, lay)
    assert ring.compilations == compiled
    _check_prompt_change_keeps_earlier_chunks(ring, lay, calm, GALE)
    assert ring.compilations > compiled  # the longer bucket's programs


def _check_ring_equals_whole_video(model, ring, lay, calm):
    whole = Sampler(model, LONG, ring=False)
    assert cache_rows(LONG, lay) < lay.chunk_num * lay.chunk_tokens, "the KV ring must wrap in this run"
    assert latent_slots(LONG, lay) < lay.chunk_num
    want = _host(whole.chunks(_captions(LONG, lay, CALM), noise=np.asarray(ring.initial_noise(4, lay))))
    assert ring.cache_shape[1] == cache_rows(LONG, lay) and whole.cache_shape[1] == lay.chunk_num * lay.chunk_tokens
    assert len(calm) == len(want) == lay.chunk_num
    for i, (a, b) in enumerate(zip(calm, want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=f"chunk {i}")


def _check_prompt_change_keeps_earlier_chunks(ring, lay, calm, new_prompt=STORM):
    """An interactive prompt changed while the video streams: every chunk that had started
    is exactly what a run without the change gives, also when the new prompt's captions are
    a bucket longer (GALE) and the windows it shares with them run the longer captions;
    chunks started after it differ."""
    window = LONG.runtime.window_size
    current = {"prompt": CALM}
    live = _captions(LONG, lay, lambda chunk, seconds: current["prompt"])
    changed = []
    for i, chunk in enumerate(ring.chunks(live, seed=4)):
        changed.append(np.asarray(chunk))
        if i == 2:  # the user types a new prompt after the third chunk arrives
            current["prompt"] = new_prompt
    started_before = 2 + window  # chunks 0..5 had entered the window when chunk 2 left it
    assert [p for _, _, p in live.asked].index(new_prompt) == started_before
    for i in range(started_before):
        if new_prompt is STORM:  # the same programs: bit for bit
            np.testing.assert_array_equal(changed[i], calm[i], err_msg=f"chunk {i} changed")
        else:  # a longer caption bucket compiles other shapes, summed in another order by XLA
            scale = np.abs(calm[i]).max()
            np.testing.assert_allclose(changed[i], calm[i], rtol=0, atol=1e-6 * scale, err_msg=f"chunk {i} changed")
    assert all(np.abs(changed[i] - calm[i]).max() > 1e-4 for i in range(started_before, lay.chunk_num))


def _check_noise_draws(model, sampler, lay):
    """'video' is upstream's one draw; 'chunk' draws each chunk from (seed, chunk); 'auto' picks
    the whole draw for runs up to WHOLE_DRAW_MAX_CHUNKS chunks, per-chunk draws past them.
    """
    n = lay.chunk_num
    per_chunk = np.concatenate([np.asarray(sampler.chunk_noise(9, lay, i)) for i in range(n)], 1)
    whole = np.asarray(sampler.initial_noise(9, lay))
    np.testing.assert_array_equal(_source(sampler, lay, "chunk")(0, n), per_chunk)
    np.testing.assert_array_equal(_source(sampler, lay, "video")(0, n), whole)
    np.testing.assert_array_equal(_source(sampler, lay, "auto")(0, n), whole)
    long = layout(LONG.replace(runtime=dict(num_frames=8 * (WHOLE_DRAW_MAX_CHUNKS + 1))))
    got = _source(sampler, long, "auto")(30, 33)
    np.testing.assert_array_equal(got, np.concatenate([sampler.chunk_noise(9, long, i) for i in (30, 31, 32)], 1))
    with pytest.raises(ValueError, match="unknown noise draw 'nope'"):
        Sampler(model, LONG, noise_draw="nope")


def _check_run_uses_chunk_draw(ring, lay):
    per_chunk = np.concatenate([np.asarray(ring.chunk_noise(9, lay, i)) for i in range(lay.chunk_num)], 1)
    ring.noise_draw = "chunk"
    try:
        a = _host(ring.chunks(_captions(LONG, lay, CALM), seed=9))
    finally:
        ring.noise_draw = "auto"
    b = _host(ring.chunks(_captions(LONG, lay, CALM), noise=per_chunk))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_stage_captions_are_trimmed_to_a_shared_length():
    """Each stage's captions are cut to the tokens its chunks and the null caption read,
    rounded up to CAPTION_MULTIPLE: prompts whose lengths fall in the same bucket give the
    same shapes (the same compiled programs), a longer one the next bucket."""
    length, channels = 64, 4
    tokens = {0: 3, 1: 3, 2: 9, 3: 20}  # caption tokens of each chunk's prompt

    def source(chunk):
        caption = np.random.default_rng(chunk).standard_normal((2, length, channels)).astype(np.float32)
        mask = np.zeros((2, length), np.float32)
        mask[0, : tokens[chunk]] = mask[1, :2] = 1
        return caption, mask

    feed = _CaptionFeed(source)
    shapes = []
    for first in range(3):
        captions, null = feed.stage(first, 2)
        shapes.append((captions.tokens.shape, captions.mask.shape, null.tokens.shape))
        want = [source(i) for i in (first, first + 1)]
        used = captions.mask.shape[-1]
        np.testing.assert_array_equal(captions.tokens, np.stack([w[0] for w in want], 1)[:, :, :used])
        np.testing.assert_array_equal(captions.mask, np.stack([w[1] for w in want], 1)[:, :, :used])
        assert np.asarray(captions.mask).sum() == sum(w[1].sum() for w in want)  # nothing read is cut
    step = CAPTION_MULTIPLE
    assert shapes[0] == shapes[1] == ((2, 2, step, channels), (2, 2, step), (1, 1, step, channels))
    assert shapes[2][0] == (2, 2, 2 * step, channels)
