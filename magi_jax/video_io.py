"""Media in and out: conditioning images and prefix videos in, the generated mp4 out.

Reading runs the same ffmpeg filter graphs upstream runs (the ffmpeg binary that
imageio-ffmpeg ships), so resized pixels match upstream's:
  * image (I2V): one frame scaled to the video size with an aspect policy - `fit`
    (stretch, upstream's default), `crop` (fill, then centre-crop) or `pad` (fit inside,
    black borders);
  * prefix video (V2V): resampled to the config's fps and scaled to the video size, then
    cut: the first `prefix_frames` frames (upstream hard-codes 32), or with
    `prefix_frames=None` the last whole seconds, at most `max_prefix_chunks` seconds, as
    upstream's alternative rule does.
Writing streams uint8 frames into an H.264 mp4 at the config's fps through a temporary file
in the destination folder, renamed into place only when the video is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from magi_jax import run_guard

ASPECT_POLICIES = ("fit", "crop", "pad")


class MediaError(ValueError):
    """An input file that cannot be read, or an output path that cannot be written."""


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@contextlib.contextmanager
def _quiet_fork():
    # JAX warns on any fork; starting ffmpeg forks and execs at once, which is safe
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
        yield


def _check_readable(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"{what} {p} does not exist (check the path)")
    if not os.access(p, os.R_OK):
        raise MediaError(f"{what} {p} is not readable (check its permissions)")
    return p


def _run_raw(args: list[str], what: str, path: Path, height: int, width: int) -> np.ndarray:
    cmd = [
        _ffmpeg(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        *args,
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "pipe:",
    ]
    with _quiet_fork():
        proc = subprocess.run(cmd, capture_output=True)
    frame = height * width * 3
    if proc.returncode != 0 or not proc.stdout or len(proc.stdout) % frame:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no frames decoded"]
        raise MediaError(f"cannot read {what} {path}: {detail[0]}")
    return np.frombuffer(proc.stdout, np.uint8).reshape(-1, height, width, 3)


def scale_filter(width: int, height: int, policy: str) -> str:
    if policy == "crop":
        return f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height}"
    if policy == "pad":
        return (
            f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black"
        )
    if policy == "fit":
        return f"scale={width}:{height}"
    raise MediaError(f"unknown aspect policy {policy!r}; use one of {', '.join(ASPECT_POLICIES)}")


def read_image(path, width: int, height: int, policy: str = "fit") -> np.ndarray:
    """One RGB frame (1, H, W, 3) uint8, resized to (height, width) with `policy`."""
    p = _check_readable(path, "image")
    vf = scale_filter(width, height, policy)
    return _run_raw(["-i", str(p), "-vf", vf, "-frames:v", "1"], "image", p, height, width)[:1]


def read_frames(path, fps: int, width: int, height: int, what: str = "video") -> np.ndarray:
    """Every frame (T, H, W, 3) uint8 of a video at `fps`, resized to (height, width)."""
    p = _check_readable(path, what)
    return _run_raw(["-ss", "0", "-i", str(p), "-vf", f"fps={fps},scale={width}:{height}"], what, p, height, width)


def read_video(
    path,
    fps: int,
    width: int,
    height: int,
    prefix_frames: int | None = 32,
    from_end: bool = False,
    max_prefix_chunks: int = 5,
) -> np.ndarray:
    """Prefix frames (T, H, W, 3) uint8 at `fps`, resized to (height, width) (upstream's cut;
    `from_end`: the last `prefix_frames` frames, to continue the video)."""
    video = read_frames(path, fps, width, height, "prefix video")
    if prefix_frames is not None:
        return video[-prefix_frames:] if from_end else video[:prefix_frames]
    n = video.shape[0]
    keep = 1 if n < fps else min(n // fps * fps, max_prefix_chunks * fps)
    return video[-keep:]


def stream_video(path, fps: int, width: int, height: int, frames_per_read: int = 16):
    """Yields the video's frames (n, H, W, 3) uint8 at `fps` and (height, width), a few at a
    time, as read_video resamples them (the whole video is never held in memory)."""
    p = _check_readable(path, "video")
    cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-ss", "0", "-i", str(p)]
    cmd += ["-vf", f"fps={fps},scale={width}:{height}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    size = height * width * 3
    with _quiet_fork():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        while block := proc.stdout.read(size * frames_per_read):
            yield np.frombuffer(block[: len(block) // size * size], np.uint8).reshape(-1, height, width, 3)
    finally:
        proc.stdout.close()
        proc.wait()


def check_output_path(path) -> Path:
    """Fails early (before any model work) when the output cannot be written."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise MediaError(f"output {p} is a folder; give a file name such as {p / 'video.mp4'}")
    if not folder.is_dir():
        raise MediaError(f"output folder {folder} does not exist; create it or choose another --output_path")
    if p.suffix.lower() != ".mp4":
        raise MediaError(f"output {p} must end in .mp4")
    # try it: permission bits say nothing for root, nor for read-only mounts
    with _signals_held():
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".probe", dir=folder)
        except OSError as e:
            msg = f"output folder {folder} is not writable ({e.strerror}); choose another --output_path"
            raise MediaError(msg) from None
        os.close(fd)
        os.unlink(probe)
    return p


@contextlib.contextmanager
def _signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Delay SIGINT/SIGTERM (they are delivered on exit) around a few file operations."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


def _write_failed(path: Path, e: OSError) -> MediaError:
    reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return MediaError(
        f"writing {path} failed: {reason}; nothing was written (free space or choose another --output_path)"
    )


class VideoWriter:
    """Appends uint8 frames (T, H, W, 3) to an H.264 mp4; the file appears only on success.

    with VideoWriter("out.mp4", fps=24) as w:
        for frames in chunks:
            w.write(frames)
    """

    def __init__(self, path, fps: int):
        self.path = check_output_path(path)
        self.fps = fps
        self.frames = 0
        self._writer = None
        self._tmp: Path | None = None  # created on entering the `with` block, so that its exit removes it

    def _create_tmp(self):
        with _signals_held():  # a signal between creating the file and noting its name would leak it
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".mp4", dir=self.path.parent or ".")
            os.close(fd)
            self._tmp = Path(tmp)

    def write(self, frames: np.ndarray):
        if self._tmp is None:
            self._create_tmp()
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if self._writer is None:
            import imageio_ffmpeg

            h, w = frames.shape[1:3]
            self._writer = imageio_ffmpeg.write_frames(
                str(self._tmp),
                (w, h),
                fps=self.fps,
                codec="libx264",
                pix_fmt_out="yuv420p",
                macro_block_size=1,
                ffmpeg_log_level="error",
            )
            with _quiet_fork():
                self._writer.send(None)
        try:
            for f in frames:
                self._writer.send(np.ascontiguousarray(f))
        except OSError as e:  # ENOSPC and friends: one clear error, the partial file goes
            self.abort()
            raise _write_failed(self.path, e) from None
        self.frames += len(frames)

    def close(self):
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        except OSError as e:
            self.abort()
            raise _write_failed(self.path, e) from None
        if self.frames == 0:
            self.abort()
            raise MediaError(f"no frames were written to {self.path}")
        try:
            run_guard.check()  # a signal whose exception was swallowed still leaves nothing behind
        except run_guard.Interrupted:
            self.abort()
            raise
        # the temp name is unique (mkstemp) and the rename atomic: concurrent runs never mix files
        os.replace(self._tmp, self.path)

    def abort(self):
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        try:
            self._create_tmp()
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def frame_strip(frames: np.ndarray, count: int = 8, zoom: int = 2, gap: int = 2) -> np.ndarray:
    """`count` evenly spaced frames of (T, H, W, 3) uint8 side by side, each enlarged `zoom`
    times (nearest neighbour: a 64x64 video stays crisp), `gap` white pixels apart."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    tiles = [np.repeat(np.repeat(frames[i], zoom, 0), zoom, 1) for i in picks]
    h = tiles[0].shape[0]
    spacer = np.full((h, gap, 3), 255, np.uint8)
    row = [t for tile in tiles for t in (tile, spacer)][:-1]
    return np.concatenate(row, axis=1)


def write_png(path, image: np.ndarray):
    """(H, W, 3) uint8 as an 8-bit RGB PNG, written under a temporary name and renamed."""
    import struct
    import zlib

    image = np.ascontiguousarray(image, np.uint8)
    h, w, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
