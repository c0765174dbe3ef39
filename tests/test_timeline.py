"""The prompt timeline: parsing, the exact caption each chunk gets, and bad timelines refused."""

import numpy as np
import pytest

from magi_jax.config import load_config
from magi_jax.special_tokens import sampler_captions, token_table
from magi_jax.timeline import (
    ChunkCaptions,
    Segment,
    TimelineError,
    check,
    chunk_seconds,
    parse_entries,
    parse_time_prefix,
    read_prompt_file,
)

CFG = load_config("tiny")
M, RT = CFG.model, CFG.runtime
TABLE = token_table(channels=M.caption_channels)
L = M.caption_max_length


def fake_encoder(calls, length=L):
    """A deterministic stand-in for the T5: an embedding and a mask of its own per prompt
    (3-9 tokens; 70 for a prompt of 60 characters or more)."""

    def encode(prompts):
        calls.extend(prompts)
        embs, masks = [], []
        for p in prompts:
            rng = np.random.default_rng(sum(map(ord, p)))
            embs.append(rng.standard_normal((length, M.caption_channels)).astype(np.float32))
            mask = np.zeros(length, np.int32)
            mask[: 3 + len(p) % 7 if len(p) < 60 else 70] = 1
            masks.append(mask)
        return np.stack(embs), np.stack(masks)

    return encode


NULL = np.random.default_rng(7).standard_normal((1, L, M.caption_channels)).astype(np.float32)


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("3s: the cat wakes up", (3.0, "the cat wakes up")),
        ("2.5: rain", (2.5, "rain")),
        ("1m30s: dusk", (90.0, "dusk")),
        ("2m: night", (120.0, "night")),
        ("a cat sleeps on a sofa", (None, "a cat sleeps on a sofa")),
        ("Scene: a cat", (None, "Scene: a cat")),  # a word before the colon is text, not a time
        ("0s:   spaced  ", (0.0, "spaced")),
    ],
)
def test_time_prefix(text, parsed):
    assert parse_time_prefix(text) == parsed


def test_command_line_entries_and_story_file(tmp_path):
    segs = parse_entries(["a cat sleeps on a sofa", "3s: the cat wakes up and stretches", "6s: it jumps down"])
    assert segs == [
        Segment(0.0, "a cat sleeps on a sofa"),
        Segment(3.0, "the cat wakes up and stretches"),
        Segment(6.0, "it jumps down"),
    ]
    story = tmp_path / "story.txt"
    story.write_text(
        "# a short story\n0s: a cat sleeps on a sofa\n\n3s: the cat wakes up and stretches\n6: it jumps down\n"
    )
    assert read_prompt_file(story) == segs


@pytest.mark.parametrize(
    "segments, duration, message",
    [
        ([(0, "a"), (3, "b"), (2, "c")], None, "segment 3 starts at 2s, not after the previous prompt (3s)"),
        ([(0, "a"), (0, "b")], None, "not after the previous prompt"),
        ([(-1, "a")], None, "start times must be 0 or more"),
        ([(0, "a"), (5, "b")], 4.0, "segment 2 starts at 5s, past the video's end (4s)"),
        ([(0, "a"), (3, "  ")], None, "segment 2 at 3s has no text"),
        ([(1, "a")], None, "start the first prompt at 0s"),
        ([], None, "timeline is empty"),
    ],
)
def test_bad_timelines(segments, duration, message):
    with pytest.raises(TimelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(segments, duration)


def test_bad_entries_name_the_line(tmp_path):
    with pytest.raises(TimelineError, match="--prompt #2 .* has no start time"):
        parse_entries(["a", "b"])
    story = tmp_path / "story.txt"
    story.write_text("0s: a\n\n4s: b\n2s: c\n")
    with pytest.raises(TimelineError, match="story.txt line 4 starts at 2s"):
        read_prompt_file(story)
    with pytest.raises(TimelineError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


def test_chunk_start_times():
    # TINY: chunk_width 2 latent frames = 8 pixel frames = 1/3 s at 24 fps
    assert [chunk_seconds(c, 2, 0, 4, 24) for c in range(4)] == [0, 8 / 24, 16 / 24, 24 / 24]
    # V2V with 3 prefix latent frames: the output starts after them; chunk 1 holds one of them
    assert [chunk_seconds(c, 2, 3, 4, 24) for c in range(1, 4)] == [0, 4 / 24, 12 / 24]
    # I2V: the image's frame is part of the output
    assert [chunk_seconds(c, 2, 1, 4, 24) for c in range(3)] == [0, 8 / 24, 16 / 24]


@pytest.mark.parametrize("prefix_frames", [0, 2])
def test_three_segment_captions_are_exact(prefix_frames):
    """Chunk c gets exactly the caption a single-prompt run gives chunk c, for its segment's prompt."""
    chunk_num = 9  # 3 chunks of 1/3 s per second
    story = [(0, "a cat sleeps"), (1.0, "the cat wakes up"), (2.0, "it jumps off the sofa")]
    calls = []
    captions = ChunkCaptions(story, fake_encoder(calls), NULL, RT, TABLE, L, chunk_num, prefix_frames)
    captions.encode_all()
    assert sorted(calls) == sorted(p for _, p in story), "each distinct prompt encoded once"
    cap, mask = captions.arrays()
    assert len(calls) == 3, "no prompt encoded twice"
    clean = prefix_frames // RT.chunk_width
    # V2V shifts the story: the output starts after the prefix frames
    expected = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2}
    if prefix_frames:
        expected = {c: min(2, (c - clean) // 3) for c in range(clean, chunk_num)}
    for c in range(clean, chunk_num):
        emb, m = fake_encoder([])([story[expected[c]][1]])
        want_cap, want_mask = sampler_captions(emb[:, None], m, NULL, chunk_num, clean, RT, TABLE, max_len=L)
        np.testing.assert_array_equal(cap[:, c], want_cap[:, c], err_msg=f"chunk {c}")
        np.testing.assert_array_equal(mask[:, c], want_mask[:, c], err_msg=f"chunk {c}")
    for c in range(clean):  # clean prefix chunks: the null caption with a zero mask, as before
        np.testing.assert_array_equal(cap[:, c], want_cap[:, c])
        np.testing.assert_array_equal(mask[:, c], want_mask[:, c])
    assert [p for _, _, p in captions.asked] == [story[expected[c]][1] for c in range(clean, chunk_num)]


def test_callable_source_is_asked_per_chunk():
    seen = []

    def prompt(chunk, seconds):
        seen.append((chunk, seconds))
        return "day" if seconds < 1 else "night"

    captions = ChunkCaptions(prompt, fake_encoder([]), NULL, RT, TABLE, L, chunk_num=6)
    cap, _ = captions.arrays()
    assert [c for c, _ in seen] == list(range(6))
    day, night = (captions(0)[0][0], captions(5)[0][0])
    assert not np.array_equal(day, night)
    bad = ChunkCaptions(lambda c, s: "", fake_encoder([]), NULL, RT, TABLE, L, chunk_num=2)
    with pytest.raises(TimelineError, match="prompt for chunk 0"):
        bad(0)


def test_live_source_keeps_a_bounded_number_of_encodings():
    calls = []
    prompts = [f"scene {i}" for i in range(12)] + ["scene 11", "scene 0"]
    captions = ChunkCaptions(lambda c, s: prompts[c], fake_encoder(calls), NULL, RT, TABLE, L, len(prompts))
    captions.arrays()
    # scene 11 was just used (not encoded again); scene 0 had been dropped (encoded again)
    assert calls == [f"scene {i}" for i in range(12)] + ["scene 0"]
    assert len(captions._encoded) <= 8
