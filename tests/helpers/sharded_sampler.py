"""Run in a fresh process with 8 host devices: the TINY sampler sharded over several meshes.

Prints one JSON object: per mesh, the largest difference to the single-device latents and
whether every parameter and the KV cache carry the sharding the rules table gives - the
parameters already as load_dit restores them and as build_dit places converted host arrays.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax import checkpoint, sharding  # noqa: E402
from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT  # noqa: E402
from magi_jax.dit_weights import abstract_dit, build_dit, load_dit  # noqa: E402
from magi_jax.kv_cache import KVCache  # noqa: E402
from magi_jax.sampler import Sampler  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _not_as_table(params, want) -> list[str]:
    """The parameters whose sharding differs from the rules table's."""
    wrong = []
    for path, var in nnx.to_flat_state(params):
        if not var.get_value().sharding.is_equivalent_to(want[path], var.get_value().ndim):
            wrong.append(str(path))
    return wrong


def main(meshes):
    cfg = load_config("tiny").replace(
        runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=32, video_size_w=32)
    )
    m = cfg.model
    rng = np.random.default_rng(0)
    sampler = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg)
    lay = sampler.layout()
    cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
    mask[:, :, :12] = 1
    ref = list(sampler.chunks(cap, mask, seed=3))
    # the same weights as a converted checkpoint and as host arrays (what on-the-fly conversion gives)
    host = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(sampler.params)}
    ckpt = os.path.join(tempfile.mkdtemp(), "tiny.magi_jax")
    checkpoint.save(host, ckpt, "dit", cfg.to_dict())
    out = {"devices": jax.device_count(), "meshes": {}}
    for text in meshes:
        mesh = sharding.make_mesh(sharding.parse_mesh(text))
        want = sharding.shardings(abstract_dit(cfg), mesh)
        # parameters land in their shards as they are read, before the sampler sees them
        restored = load_dit(ckpt, cfg, mesh)
        restored_wrong = _not_as_table(nnx.state(restored), want)  # before the sampler could move them
        built_wrong = _not_as_table(nnx.state(build_dit(cfg, host, want)), want)
        s = Sampler(restored, cfg, mesh=mesh)
        got = list(s.chunks(cap, mask, seed=3))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
        scale = max(float(np.abs(b).max()) for b in ref)
        sharded = sum(any(a is not None for a in sh.spec) for sh in want.values())
        rows = lay.chunk_num * lay.chunk_tokens
        table = sharding.spec(KVCache.AXES, (m.num_layers, rows, m.num_query_groups, m.kv_channels), mesh)
        cache_spec = list(s.cache_sharding.spec) + [None] * (4 - len(s.cache_sharding.spec))  # after the run
        out["meshes"][text] = {
            "shape": dict(mesh.shape),
            "max_abs_diff": diff,
            "scale": scale,
            "params_wrong": _not_as_table(s.params, want),
            "restored_wrong": restored_wrong,
            "built_wrong": built_wrong,
            "params_sharded": sharded,
            "params_total": len(want),
            "cache_spec": cache_spec,
            "cache_table": list(table),
            "cache_rows": rows,
            "compilations": s.compilations,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:] or ["8x1", "2x4", "1x8"])
