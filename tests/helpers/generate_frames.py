"""The generate command, keeping the frames it hands to the video writer.

    python generate_frames.py FRAMES.npy GENERATE_ARGS...

runs `python -m magi_jax.generate GENERATE_ARGS...` in this process and saves the decoded
uint8 frames (T, H, W, 3) the writer received to FRAMES.npy, when this process wrote any.
H.264 turns a one-grey-level difference in a frame into larger ones in the file, so runs
are compared on these frames, not on the mp4 read back. Exits with the command's code."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from magi_jax import generate, video_io  # noqa: E402


def main(frames_path: str, argv: list[str]) -> int:
    kept = []
    write = video_io.VideoWriter.write

    def keeping(self, frames):
        kept.append(np.array(frames))
        write(self, frames)

    video_io.VideoWriter.write = keeping
    code = generate.main(argv)
    if kept:
        np.save(frames_path, np.concatenate(kept))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
