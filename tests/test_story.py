"""Stories on the command line: a prompt timeline, a duration, and continuing a video (TINY)."""

import imageio_ffmpeg
import numpy as np
import pytest

from magi_jax.generate import main, parse_args, resolve

FAST = ["--num_steps", "4", "--size", "32x32"]


def _frames(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])
    return meta["fps"], frames


@pytest.mark.slow
def test_story_far_past_the_config_then_extended(tmp_path):
    """A three-prompt story on the command line, --num_frames far past TINY's 32 frames (16
    chunks, past the KV ring's 8), is a readable mp4 of every frame; continued from its last
    frames (--extend), the output is the story, then more. One test: the story is the
    continuation's input, so two command runs cover both."""
    first = tmp_path / "story.mp4"
    story = ["a cat sleeps on a sofa", "2s: the cat wakes up and stretches", "4s: it jumps down"]
    argv = ["--random_weights", *(a for p in story for a in ("--prompt", p))]  # noise-like frames: see below
    assert main([*argv, "--num_frames", "128", "--output_path", str(first), *FAST]) == 0
    fps, before = _frames(first)
    assert fps == 24 and before.shape == (128, 32, 32, 3)
    more = tmp_path / "more.mp4"
    argv = ["--random_weights", "--mode", "v2v", "--prefix_video_path", str(first), "--extend", "--prefix_frames", "8"]
    assert (
        main([*argv, "--prompt", "the cat sleeps again", "--num_frames", "16", "--output_path", str(more), *FAST]) == 0
    )
    _, after = _frames(more)
    assert len(after) == len(before) + 16
    # the first video's frames open the continuation (re-encoded: within H.264's rounding)
    kept = np.abs(after[: len(before)].astype(int) - before.astype(int)).mean()
    new = np.abs(after[len(before) :].astype(int) - before[-16:].astype(int)).mean()
    assert kept < new / 4, (kept, new)  # noise-like TINY frames re-encode poorly, yet far closer than new ones


def test_story_file_and_duration_resolve(tmp_path):
    """The same story from a file resolves to the flags' timeline; --duration sets the frames."""
    out = tmp_path / "story.mp4"
    story = ["a cat sleeps on a sofa", "0.4s: the cat wakes up and stretches", "0.8s: it jumps down"]
    argv = ["--random_weights", *(a for p in story for a in ("--prompt", p))]  # noise-like frames: see below
    (tmp_path / "story.txt").write_text("\n".join(["0s: " + story[0], *story[1:]]) + "\n")
    from_file = resolve(parse_args(["--prompt_file", str(tmp_path / "story.txt"), "--output_path", str(out)]))
    from_flags = resolve(parse_args([*argv, "--duration", "1s", "--output_path", str(out)]))
    assert from_file.timeline == from_flags.timeline and [s.start for s in from_file.timeline] == [0, 0.4, 0.8]
    assert from_flags.config.runtime.num_frames == 24
    minute = resolve(parse_args(["--prompt", "a", "--duration", "60s", "--output_path", str(out), *FAST]))
    assert minute.config.runtime.num_frames == 60 * 24


BAD = [
    (["--prompt", "a", "--prompt", "b"], "--prompt #2 ('b') has no start time"),
    (["--prompt", "a", "--prompt", "3s: b"], "prompt at 3s starts at 3s, past the video's end (1s)"),
    (["--prompt", "a", "--prompt", "0.5s: b", "--prompt", "0.2s: c"], "not after the previous prompt (0.5s)"),
    (["--prompt", "a", "--prompt", "0.5s: "], "at 0.5s has no text"),
    (["--prompt", "a", "--prompt_file", "story.txt"], "give --prompt or --prompt_file, not both"),
    ([], "no prompt: give --prompt TEXT"),
    (["--prompt", "a", "--duration", "soon"], "--duration 'soon' is not a length of video"),
    (["--prompt", "a", "--num_frames", "24"], "give --duration or --num_frames, not both"),
    (["--prompt", "a", "--duration", "0s"], "is no video at all"),
    (["--prompt", "a", "--extend"], "--extend continues a video"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_timeline_is_one_clear_error(tmp_path, capsys, args, message):
    assert main(["--duration", "1s", *args, "--output_path", str(tmp_path / "out.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not list(tmp_path.iterdir()), "nothing written"
