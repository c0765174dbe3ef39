"""The TINY sampler run the determinism test compares: one seed, one device.

Imported by tests/test_determinism.py (in process) and run as a script in a fresh process,
which prints the sha256 of the latents' bytes:

    python determinism.py SEED"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT  # noqa: E402
from magi_jax.sampler import Sampler  # noqa: E402


def latents(seed: int) -> np.ndarray:
    """The whole video's latents for `seed` on the default device."""
    cfg = load_config("tiny").replace(
        runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=32, video_size_w=32)
    )
    m = cfg.model
    sampler = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg)
    lay = sampler.layout()
    rng = np.random.default_rng(0)
    cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
    mask[:, :, :12] = 1
    return np.concatenate(list(sampler.chunks(cap, mask, seed=seed)), axis=2)


def digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")  # as the test session (conftest.py)
    print(digest(latents(int(sys.argv[1]))))
