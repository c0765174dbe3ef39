"""Training the video VAE as an autoencoder: reconstruction plus a small KL term.

MAGI-1 ships its VAE trained; a small model trained here (the bundled default) needs its own.
The loss per clip x (pixels in [-1, 1], (3, T, H, W)):
    z = mean + exp(logvar / 2) * eps          (the posterior's reparameterised sample)
    loss = mean((decode(z) - x)^2) + kl_weight * mean(KL(N(mean, exp(logvar)) || N(0, 1)))
The KL term keeps the latents near unit scale and the posterior smooth, so the DiT trained on
them sees a well-conditioned space. Parameters train in float32 with the DiT trainer's
optimizer (train.optimizer: AdamW, warmup and cosine decay, global-norm clipping) in one
jitted, donated step; frames are read as the VAE reads them at inference
(vae_tiling.frames_to_model). The checkpoint is what `load_vae` (and `--vae_ckpt`) reads.

    python -m magi_jax.vae_train --out vae.magi_jax --clips 512 --steps 2000 [--size 64x64 --frames 8]

trains on the procedural world (synthetic_world) at the given size.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from magi_jax.synthetic_world import size_arg
from magi_jax.train import TrainConfig, optimizer
from magi_jax.vae import TINY, VaeConfig, VaeModel, posterior
from magi_jax.vae_tiling import frames_to_model

f32 = jnp.float32


@dataclass(frozen=True)
class VaeTraining:
    steps: int = 2000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    seed: int = 0


def vae_loss(model: VaeModel, x, key, kl_weight: float):
    """(loss, (reconstruction, kl)) of one batch x (B, 3, T, H, W)."""
    mean, logvar = posterior(model.moments(x))
    mean, logvar = mean.astype(f32), logvar.astype(f32)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, f32)
    recon = model.decode(z, strided=False).astype(f32)
    rec = jnp.mean((recon - x) ** 2)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, (rec, kl)


class VaeTrainer:
    """AdamW over a float32 VaeModel; `step(batch)` -> metrics."""

    def __init__(self, config: VaeConfig = TINY, training: VaeTraining = VaeTraining(), model: VaeModel | None = None):
        self.config, self.training = config, training
        model = model or VaeModel(config, dtype=f32, attention_dtype=f32, rngs=nnx.Rngs(training.seed))
        self.graphdef, params = nnx.split(model)
        self.tx = optimizer(
            TrainConfig(
                learning_rate=training.lr,
                warmup_steps=min(training.warmup, training.steps - 1),
                total_steps=training.steps,
                weight_decay=0.0,
            )
        )
        self.state = (params, self.tx.init(params))
        self.key = jax.random.key(training.seed + 1)
        self.steps_done = 0

        def step(state, x, key):
            params, opt = state

            def loss_fn(p):
                return vae_loss(nnx.merge(self.graphdef, p), x, key, training.kl_weight)

            (loss, (rec, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = self.tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), {"loss": loss, "reconstruction": rec, "kl": kl}

        self._step = jax.jit(step, donate_argnums=0)

    def step(self, batch: np.ndarray) -> dict:
        key = jax.random.fold_in(self.key, self.steps_done)
        self.state, metrics = self._step(self.state, jnp.asarray(batch, f32), key)
        self.steps_done += 1
        return {k: float(v) for k, v in metrics.items()}

    @property
    def model(self) -> VaeModel:
        return nnx.merge(self.graphdef, self.state[0])

    def save(self, out, overwrite: bool = False) -> dict:
        """The trained weights as a magi-jax VAE checkpoint (float32), readable by load_vae."""
        from magi_jax import checkpoint

        flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(self.state[0])}
        return checkpoint.save(flat, out, "vae", self.config.to_json_dict(), overwrite=overwrite, dtype="float32")


def world_batches(count: int, batch: int, size, frames: int, seed: int = 0):
    """Endless batches (B, 3, T, H, W) of `count` synthetic-world clips (drawn once), in a
    seeded order; each item a random `frames`-long window of its clip."""
    from magi_jax import synthetic_world

    clips = [
        frames_to_model(synthetic_world.clip(seed, i, size, max(frames, 16)).frames, np.float32)[0]
        for i in range(count)
    ]
    rng = np.random.default_rng(seed)
    while True:
        picks = rng.integers(0, count, batch)
        starts = [int(rng.integers(0, clips[i].shape[1] - frames + 1)) for i in picks]
        yield np.stack([clips[i][:, s : s + frames] for i, s in zip(picks, starts)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint folder to write (e.g. vae.magi_jax)")
    ap.add_argument("--clips", type=int, default=512, help="synthetic-world clips to train on")
    ap.add_argument("--steps", type=int, default=VaeTraining.steps)
    ap.add_argument("--batch", type=int, default=VaeTraining.batch)
    ap.add_argument("--lr", type=float, default=VaeTraining.lr)
    ap.add_argument("--kl_weight", type=float, default=VaeTraining.kl_weight)
    ap.add_argument("--size", default="64x64", type=size_arg, help="HEIGHTxWIDTH, multiples of the patch size (8)")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip, a multiple of the patch length (4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    w, h = args.size
    cfg = TINY
    problems = []
    if w % cfg.patch_size or h % cfg.patch_size or min(w, h) < 32:
        problems.append(f"--size {h}x{w}: height and width must be multiples of {cfg.patch_size}, at least 32")
    if args.frames <= 0 or args.frames % cfg.patch_length:
        problems.append(f"--frames {args.frames} must be a positive multiple of {cfg.patch_length}")
    if min(args.clips, args.steps, args.batch) <= 0:
        problems.append("--clips, --steps and --batch must be positive")
    if Path(args.out).exists() and not args.overwrite:
        problems.append(f"{args.out} already exists; choose another --out or pass --overwrite")
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    training = VaeTraining(args.steps, args.batch, args.lr, kl_weight=args.kl_weight, seed=args.seed)
    trainer = VaeTrainer(cfg, training)
    data = world_batches(args.clips, args.batch, (w, h), args.frames, args.seed)
    t0 = time.perf_counter()
    for i in range(args.steps):
        m = trainer.step(next(data))
        if i % 50 == 0 or i == args.steps - 1:
            print(
                f"step {i + 1}/{args.steps}: loss {m['loss']:.4f} (reconstruction {m['reconstruction']:.4f}, "
                f"kl {m['kl']:.2f}), {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    trainer.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
