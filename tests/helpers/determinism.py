"""Run in a fresh process with 8 host devices: the TINY sampler with one seed on meshes of
the given device counts (1 first). Prints one JSON object: per device count the sha256 of the
latents' bytes and their difference to the single-device latents.

    python determinism.py SEED 1,2,8"""

import hashlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax import sharding  # noqa: E402
from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT  # noqa: E402
from magi_jax.sampler import Sampler  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
MESHES = {1: None, 2: "seq=2", 8: "model=2,seq=4"}


def main(seed: int, counts: list[int]):
    cfg = load_config("tiny").replace(
        runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=32, video_size_w=32)
    )
    m = cfg.model
    rng = np.random.default_rng(0)
    out, ref = {"devices": jax.device_count(), "runs": {}}, None
    for count in counts:
        text = MESHES[count]
        mesh = None if text is None else sharding.make_mesh(sharding.parse_mesh(text, count), jax.devices()[:count])
        sampler = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg, mesh=mesh)
        lay = sampler.layout()
        if ref is None:
            cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
            mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
            mask[:, :, :12] = 1
        latents = np.concatenate(list(sampler.chunks(cap, mask, seed=seed)), axis=2)
        ref = latents if ref is None else ref
        diff = np.abs(latents.astype(np.float64) - ref)
        out["runs"][count] = {
            "sha256": hashlib.sha256(np.ascontiguousarray(latents).tobytes()).hexdigest(),
            "max_abs_diff": float(diff.max()),
            "rms_diff": float(np.sqrt(np.mean(diff**2))),
            "scale": float(np.abs(ref).max()),
        }
    # another seed on one device: shows the hash sees the latents
    other = np.concatenate(list(Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg).chunks(cap, mask, seed=seed + 1)), axis=2)
    out["other_seed_sha256"] = hashlib.sha256(np.ascontiguousarray(other).tobytes()).hexdigest()
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(c) for c in sys.argv[2].split(",")])
