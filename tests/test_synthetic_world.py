"""The procedural video world: deterministic clips whose captions say what the physics did,
readable back from their pixels (the check generated videos get against their prompts)."""

import numpy as np
import pytest

from magi_jax import synthetic_world as world
from magi_jax.video_io import read_video


def test_a_clip_is_a_function_of_seed_and_index():
    a, b = world.clip(3, 17), world.clip(3, 17)
    assert a.caption == b.caption and np.array_equal(a.frames, b.frames)
    others = [world.clip(3, i) for i in range(18, 24)] + [world.clip(4, 17)]
    assert all(not np.array_equal(a.frames, o.frames) for o in others)
    assert a.frames.shape == (32, 64, 64, 3) and a.frames.dtype == np.uint8


@pytest.mark.parametrize("index", range(12))
def test_a_rolling_ball_is_seen_in_the_colour_and_direction_its_caption_names(index):
    c = world.clip(1, index, scene="roll", include_held_out=True)
    colour, direction = world.describe(c.frames)
    assert (colour, direction) == (c.colours[0], c.direction)
    assert world.describe(c.frames[:16]) == (colour, direction)  # the tests' 16-frame videos
    assert c.caption.startswith(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} ball")
    assert direction in c.caption
    # "bounces" is said when the ball is seen coming back, and only then
    axis = 0 if direction in ("left", "right") else 1
    track = c.tracks[:, 0, axis]
    first_step = np.sign(track[1] - track[0])
    if "bounces off the wall" in c.caption:
        f = next(e.frame for e in c.events if e.kind == "wall")
        assert np.sign(track[f + 2] - track[f + 1]) == -first_step
    else:  # no wall before the last two frames: one way all along
        assert (np.sign(np.diff(track[:-1])) == first_step).all()


def test_the_reader_fits_the_motion_over_the_clip():
    """Direction is the fitted velocity of the ball's centroid: a clip whose first frame shows
    the ball somewhere else (as a generated video's first latent frame can) still reads as
    the way it moves; a ball that stays put has no direction; no ball, no colour."""
    c = world.clip(2, 0, scene="roll", include_held_out=True)
    misplaced = c.frames[:16].copy()
    ahead = -24 if c.direction in ("left", "up") else 24  # 24 pixels along the way it goes
    misplaced[0] = np.roll(misplaced[0], ahead, axis=1 if c.direction in ("left", "right") else 0)
    assert world.describe(misplaced[:5])[1] != c.direction  # five frames alone read it backwards
    assert world.describe(misplaced) == (c.colours[0], c.direction)
    assert world.describe(np.repeat(c.frames[:1], 16, axis=0)) == (c.colours[0], None)
    assert world.describe(np.zeros_like(c.frames[:4])) == (None, None)


def test_a_falling_ball_speeds_up_then_bounces_on_the_floor():
    c = world.clip(0, 0, scene="fall")
    y = c.tracks[:, 0, 1]
    floor = next(e.frame for e in c.events if e.kind == "floor")
    drops = np.diff(y[: floor + 1])
    assert (drops > 0).all() and (np.diff(drops) > 0).all()  # downward and accelerating
    assert y[floor + 2] < y[floor + 1]  # then back up
    assert c.caption.endswith("falls and bounces on the floor")


def test_colliding_balls_exchange_their_motion():
    c = world.clip(0, 5, scene="collide")
    hit = next(e.frame for e in c.events if e.kind == "collide")
    vx = np.diff(c.tracks[:, :, 0], axis=0)
    assert vx[hit - 1, 0] > 0 > vx[hit - 1, 1]  # toward each other
    assert vx[hit + 1, 0] < 0 < vx[hit + 1, 1]  # apart
    assert c.caption == f"a{'n' if c.colours[0][0] in 'aeiou' else ''} {c.colours[0]} ball and " + (
        f"a{'n' if c.colours[1][0] in 'aeiou' else ''} {c.colours[1]} ball roll toward each other and collide"
    )


def test_held_out_pairs_never_appear_in_training_clips():
    seen = set()
    for i in range(200):
        c = world.clip(0, i, scene="roll")
        seen.add((c.colours[0], c.direction))
    assert not seen & set(world.HELD_OUT)
    assert len(seen) >= len(world.COLOURS) * len(world.DIRECTIONS) - len(world.HELD_OUT) - 2


def test_the_command_writes_captioned_videos_as_train_data_reads_them(tmp_path, capsys):
    assert world.main(["--out", str(tmp_path / "clips"), "--count", "3", "--frames", "24"]) == 0
    mp4s = sorted((tmp_path / "clips").glob("*.mp4"))
    assert [p.name for p in mp4s] == ["clip_00000.mp4", "clip_00001.mp4", "clip_00002.mp4"]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == sorted(
        [p.name for p in mp4s] + [p.with_suffix(".txt").name for p in mp4s]
    )  # nothing half-written left beside them
    for i, path in enumerate(mp4s):
        want = world.clip(0, i, frames=24)
        assert path.with_suffix(".txt").read_text() == want.caption + "\n"
        frames = read_video(path, 24, 64, 64)
        assert frames.shape == (24, 64, 64, 3)
        assert np.abs(frames.astype(float) - want.frames).mean() < 4  # the clip, through H.264
    assert world.size_arg("32x48") == (48, 32)  # HEIGHTxWIDTH, as every --size of the project
    assert world.main(["--out", str(tmp_path / "x"), "--size", "16x16"]) == 2
    assert "at least 32 pixels" in capsys.readouterr().err


def test_a_ball_can_roll_along_any_heading():
    frames = world.rolling(0, 0, "green", (1, 1), frames=12)
    assert frames.shape == (12, 64, 64, 3)
    mask = np.linalg.norm(frames.astype(float) - world.COLOURS["green"], axis=-1) < 60
    ys, xs = np.nonzero(mask[0])
    ye, xe = np.nonzero(mask[8])
    dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
    assert dx > 3 and dy > 3 and 0.6 < dx / dy < 1.6  # down and to the right, about equally
    np.testing.assert_array_equal(frames, world.rolling(0, 0, "green", (1, 1), frames=12))
