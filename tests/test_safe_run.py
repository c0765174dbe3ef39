"""A run never leaves a broken video: NaN steps, signals, a full disk, bad output paths and
concurrent runs each end in either one complete mp4 or nothing at all."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax import pipeline, run_guard
from magi_jax.generate import main
from magi_jax.video_io import VideoWriter

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--num_frames", "16", "--num_steps", "4", "--size", "32x32"]


def _errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_nan_step_stops_the_run_naming_chunk_and_step(tmp_path, monkeypatch, capsys):
    real = pipeline.dit_model

    def poisoned(*a, **k):
        dit = real(*a, **k)
        kernel = dit.final_linear.kernel
        kernel[...] = kernel[...].at[0, 0].set(jnp.nan)  # one bad weight, as a corrupted checkpoint would hold
        return dit

    monkeypatch.setattr(pipeline, "dit_model", poisoned)
    assert main(["--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), *FAST]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "sampler step 1 of" in errors[0] and "chunk 0 NaN/Inf" in errors[0], errors
    assert list(tmp_path.iterdir()) == [], "no video and no temporary file"


def test_full_disk_is_one_clear_error(tmp_path, monkeypatch, capsys):
    real = imageio_ffmpeg.write_frames

    def filling_disk(*a, **k):
        inner = real(*a, **k)

        def gen():
            inner.send(None)
            sent = 0
            try:
                while True:
                    frame = yield
                    if sent == 3:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    inner.send(frame)
                    sent += 1
            finally:
                inner.close()

        return gen()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", filling_disk)
    assert main(["--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), *FAST]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "disk is full" in errors[0] and "x.mp4" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


def _refuse_loading(monkeypatch):
    def never(plan):
        raise AssertionError("a model was loaded for an output that cannot be written")

    monkeypatch.setattr(pipeline, "run", never)


def test_output_that_is_a_folder_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    _refuse_loading(monkeypatch)
    folder = tmp_path / "video.mp4"
    folder.mkdir()
    assert main(["--prompt", "p", "--output_path", str(folder), *FAST]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "is a folder" in errors[0], errors


def _unwritable_folder(tmp_path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked
    return Path("/proc")  # root may write anywhere permissions apply, but not into procfs


def test_unwritable_folder_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    _refuse_loading(monkeypatch)
    folder = _unwritable_folder(tmp_path)
    assert main(["--prompt", "p", "--output_path", str(folder / "x.mp4"), *FAST]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "is not writable" in errors[0], errors


def _generate(out: Path, *extra):
    cmd = [sys.executable, "-m", "magi_jax.generate", "--prompt", "p", "--output_path", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_exits_with_its_code_and_leaves_nothing(tmp_path, signum, code):
    out = tmp_path / "x.mp4"
    proc = _generate(out, "--num_frames", "96", "--num_steps", "8", "--size", "32x32")
    deadline = time.time() + 120
    while not list(tmp_path.glob(".x.*.mp4")):  # the writer's temporary file: sampling has begun
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the run never started writing"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "no video written" in err
    assert list(tmp_path.iterdir()) == [], "neither the video nor its temporary file remains"


def test_concurrent_writers_to_one_path_leave_one_complete_video(tmp_path):
    """Two runs writing one path at once, interleaved frame by frame: each writes its own temporary
    file and the renames are atomic, so the path ends up holding one run's whole video."""
    out = tmp_path / "x.mp4"
    a, b = VideoWriter(out, fps=24), VideoWriter(out, fps=24)
    frames = {w: np.full((1, 32, 32, 3), level, np.uint8) for w, level in ((a, 40), (b, 200))}
    with a, b:
        for _ in range(12):
            a.write(frames[a])
            b.write(frames[b])
        b.write(frames[b])  # b's video is one frame longer: the survivor is identifiable
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]
    video = _read_all(out)
    assert len(video) in (12, 13)
    level = 40 if len(video) == 12 else 200
    assert np.abs(video.astype(int) - level).max() <= 4, "frames of one run only"


def _read_all(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    reader.close()
    return np.stack(frames)


def test_signal_swallowed_in_a_gc_callback_still_leaves_nothing(tmp_path):
    """Python drops an exception raised in a `__del__` or gc callback (JAX has both): a signal
    handled there must still stop the run before the video is renamed into place."""

    class Collected:
        def __del__(self):
            run_guard._raise(signal.SIGTERM, None)  # the handler, run where Python ignores its exception

    with run_guard.signals_as_exceptions(), pytest.raises(run_guard.Interrupted) as stopped:
        with VideoWriter(tmp_path / "x.mp4", 24) as writer:
            writer.write(np.zeros((2, 16, 16, 3), np.uint8))
            Collected()  # collected at once: the exception is printed as ignored
    assert stopped.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []
