"""Run in a fresh process with 8 host devices: TINY train steps on meshes vs one device.

Prints one JSON object: per mesh, the largest difference of the losses and of the updated
parameters to the single-device steps, and whether parameters and optimizer state stayed
in the rules table's layout.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from train_clips import blob_latents, clips  # noqa: E402

from magi_jax import sharding  # noqa: E402
from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT  # noqa: E402
from magi_jax.lora import LoRAConfig  # noqa: E402
from magi_jax.objective import ObjectiveConfig  # noqa: E402
from magi_jax.train import TrainConfig, Trainer  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
STEPS = 2


def run(cfg, tcfg, batch, mesh):
    trainer = Trainer(DiT(cfg.model, rngs=nnx.Rngs(0)), cfg, tcfg, mesh)
    state = trainer.init_state()
    losses = []
    for _ in range(STEPS):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


def main(meshes):
    cfg = load_config("tiny")
    batch = clips(cfg, [blob_latents(cfg, a) for a in np.linspace(0, 3, 8)], list(range(8)))
    out = {"devices": jax.device_count(), "meshes": {}}
    kinds = {"full": None, "lora": LoRAConfig(rank=4)}
    for kind, text in (m.split(":") for m in meshes):
        lcfg = kinds[kind]
        tcfg = TrainConfig(
            learning_rate=1e-3, warmup_steps=1, batch_size=8, grad_accum=2, lora=lcfg, objective=ObjectiveConfig()
        )
        _, ref_state, ref_losses = run(cfg, tcfg, batch, None)
        ref = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(ref_state.params)}
        mesh = sharding.make_mesh(sharding.parse_mesh(text))
        trainer, state, losses = run(cfg, tcfg, batch, mesh)
        got = {p: v.get_value() for p, v in nnx.to_flat_state(state.params)}
        want = sharding.shardings(state.params, mesh)
        wrong = [str(p) for p, a in got.items() if not a.sharding.is_equivalent_to(want[p], a.ndim)]
        out["meshes"][f"{kind}:{text}"] = {
            "shape": dict(mesh.shape),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "loss": ref_losses,
            "param_diff": max(float(np.abs(np.asarray(got[p]) - ref[p]).max()) for p in ref),
            "lr": tcfg.learning_rate,
            "params_wrong": wrong,
            "params_sharded": sum(any(a is not None for a in want[p].spec) for p in want),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:] or ["full:data=2,model=4", "lora:data=8"])
