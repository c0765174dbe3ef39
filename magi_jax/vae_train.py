"""Training the video VAE as an autoencoder: reconstruction plus a small KL term.

MAGI-1 ships its VAE trained; a small model trained here (the bundled default) needs its own.
The loss per clip x (pixels in [-1, 1], (3, T, H, W)):
    z = mean + exp(logvar / 2) * eps          (the posterior's reparameterised sample)
    w = 1 + foreground_weight * [pixel differs from the clip's median colour]
    loss = sum(w * (decode(z) - x)^2) / sum(w) + kl_weight * mean(KL(N(mean, exp(logvar)) || N(0, 1)))
The weight matters for scenes of small moving objects: the balls cover a few percent of a
frame, and unweighted the VAE learns the background first and the balls very late. The KL
term keeps the posterior smooth, so the DiT trained on the latents sees a well-conditioned
space; `calibrate` then sets the latents' scale to what the sampler expects. Parameters
train in float32 with the DiT trainer's optimizer (train.optimizer: AdamW, warmup and
cosine decay, global-norm clipping) in one jitted, donated step; frames are read as the VAE
reads them at inference (vae_tiling.frames_to_model); the decoder's last conv runs as
`vae.conv3x3x3` (the same convolution, 20x faster to train on CPU). The checkpoint is what
`load_vae` (and `--vae_ckpt`) reads.

    python -m magi_jax.vae_train --out vae.magi_jax --clips 512 --steps 1500 [--size 64x64 --frames 8]

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
from magi_jax.vae import WORLD, VaeConfig, VaeModel, posterior
from magi_jax.vae_tiling import frames_to_model

f32 = jnp.float32


@dataclass(frozen=True)
class VaeTraining:
    steps: int = 1500
    batch: int = 4
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    foreground_weight: float = 20.0  # pixels away from the clip's median colour weigh 1 + this
    seed: int = 0


def foreground(x, threshold: float = 0.1):
    """(B, 1, T, H, W) 1.0 where a pixel differs from its clip's median colour by more than
    `threshold` in some channel: the moving objects of a mostly static scene."""
    background = jnp.median(x.reshape(*x.shape[:2], -1), axis=-1)[:, :, None, None, None]
    return (jnp.max(jnp.abs(x - background), axis=1, keepdims=True) > threshold).astype(x.dtype)


def vae_loss(model: VaeModel, x, key, kl_weight: float, foreground_weight: float = 0.0):
    """(loss, (reconstruction, kl)) of one batch x (B, 3, T, H, W)."""
    mean, logvar = posterior(model.moments(x))
    mean, logvar = mean.astype(f32), logvar.astype(f32)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, f32)
    recon = model.decode(z, strided=False, shifted_conv=True).astype(f32)
    err = (recon - x) ** 2
    rec = jnp.mean(err)
    weight = 1.0 + foreground_weight * foreground(x)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean(weight * err) / jnp.mean(weight) + kl_weight * kl, (rec, kl)


class VaeTrainer:
    """AdamW over a float32 VaeModel; `step(batch)` -> metrics."""

    def __init__(self, config: VaeConfig = WORLD, training: VaeTraining = VaeTraining(), model: VaeModel | None = None):
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
                return vae_loss(nnx.merge(self.graphdef, p), x, key, training.kl_weight, training.foreground_weight)

            (loss, (rec, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = self.tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), {"loss": loss, "reconstruction": rec, "kl": kl}

        self._step = jax.jit(step, donate_argnums=0)

    def step(self, batch: np.ndarray) -> dict:
        key = jax.random.fold_in(self.key, self.steps_done)
        self.state, metrics = self._step(self.state, jnp.asarray(batch, f32), key)
        self.steps_done += 1
        return {k: float(v) for k, v in metrics.items()}

    def calibrate(self, batches, target_std: float) -> float:
        """Rescales the latent space so the posterior means of `batches` have standard deviation
        `target_std`; returns the factor. The encoder's mean rows are multiplied by c, its
        log-variance bias shifted by 2 ln c, and the decoder's input projection divided by c,
        so decode(encode(x)) is unchanged: only the latents' scale moves (to where the
        sampler's scale_factor expects it)."""
        from magi_jax.vae import posterior

        model = self.model
        means = [np.asarray(posterior(model.moments(jnp.asarray(b, f32)))[0]) for b in batches]
        c = float(target_std / np.std(np.concatenate([m.ravel() for m in means])))
        z = self.config.z_chans
        params, opt = self.state
        flat = dict(nnx.to_flat_state(params))

        def update(path, fn):
            var = flat[path]
            flat[path] = var.replace(value=fn(var.get_value()))

        update(("encoder", "last_layer", "kernel"), lambda k: k.at[:, :z].multiply(c))
        update(("encoder", "last_layer", "bias"), lambda b: b.at[:z].multiply(c).at[z:].add(2 * np.log(c)))
        update(("decoder", "proj_in", "kernel"), lambda k: k / c)
        self.state = (nnx.from_flat_state(list(flat.items())), opt)
        return c

    @property
    def model(self) -> VaeModel:
        return nnx.merge(self.graphdef, self.state[0])

    def save(self, out, overwrite: bool = False, dtype: str = "float32") -> dict:
        """The trained weights as a magi-jax VAE checkpoint, readable by load_vae; `dtype`
        bfloat16 halves it (the pipeline runs the VAE in bfloat16, as upstream)."""
        from magi_jax import checkpoint

        flat = {p: np.asarray(v.get_value()).astype(dtype) for p, v in nnx.to_flat_state(self.state[0])}
        return checkpoint.save(flat, out, "vae", self.config.to_json_dict(), overwrite=overwrite, dtype=dtype)


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
    ap.add_argument("--size", default="64x64", type=size_arg, help=f"HEIGHTxWIDTH, multiples of {WORLD.patch_size}")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip, a multiple of the patch length (4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    w, h = args.size
    cfg = WORLD
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
