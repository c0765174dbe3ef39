"""The bundled default model: MAGI-1 trained from scratch on the procedural world, on a CPU.

    python -m magi_jax.world_model --out magi_jax/assets/tiny

reproduces the weights `python -m magi_jax.generate` runs when no weights are given (and
`--config_file tiny`). Every part is trained with this project's own code, at the size and
length of the `tiny` variant (configs/tiny.json, the one source of the architecture and the
sampler settings), in this order:

  1. the text encoder: the tiny T5 (t5.TINY, caption_channels wide) with seeded random
     weights, kept fixed. A random encoder already keeps the world's few dozen words apart
     (each has its own token embeddings, and two residual layers mix them only a little), and
     the DiT's cross-attention learns to read them; training it jointly would put the T5's
     backward pass inside every DiT step for nothing the captions need.
  2. the VAE (vae_train): an autoencoder on 8-frame windows of world clips, reconstruction
     (weighted toward the balls, which cover a few percent of a frame) plus a small KL term.
  3. the DiT (train.Trainer, MAGI-1's chunk-wise flow-matching objective, objective.py) from
     random weights, on the VAE's latents of world clips (times the config's scale_factor,
     as the sampler reads them) and the T5's caption embeddings, with caption dropout for
     classifier-free guidance and clean leading chunks for I2V / V2V. Each step's clips are
     cut to their first k chunks (k = 1..4, train_data's `prefixes`), captioned as a k-chunk
     video: the duration token then means what it means when a shorter video is generated,
     whose first chunk would otherwise read as a late chunk of a long clip (a rolling ball
     that has already bounced back).

Held-out (colour, direction) pairs (synthetic_world.HELD_OUT) never appear in the training
clips, so prompts made of them measure whether the model composes colour and motion.

Output: `<out>/t5`, `<out>/vae`, `<out>/dit`, magi-jax checkpoints (each holds its config),
written complete or not at all, and `<out>/recipe.json` (what was run, and the losses).
The intermediate dataset and train states go to `--work` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.config import MagiConfig, load_config
from magi_jax.pipeline import ASSETS, with_bundled_weights


@dataclass(frozen=True)
class Recipe:
    """Counts and rates of the bundled model's run (the defaults), measured on 2 CPU cores:
    the VAE learns every ball's colour and direction back from its latents by about 700 steps
    (0.57 s each); a DiT step of 8 clips (1 to 4 chunks each) takes 0.38 s on average. At
    width 128 and 4,000 steps the DiT drew the right colour but followed the direction about
    half the time; at width 256 (configs/tiny.json) and 5,000 steps it follows it."""

    seed: int = 0
    vae_clips: int = 512
    vae_steps: int = 1500
    vae_batch: int = 4
    vae_lr: float = 2e-3
    dit_clips: int = 2400
    dit_steps: int = 5000
    dit_batch: int = 8
    dit_lr: float = 1e-3


def train_t5(config: MagiConfig, out: Path, seed: int):
    from magi_jax import checkpoint, t5

    cfg = dataclasses.replace(t5.TINY, d_model=config.model.caption_channels)
    model = t5.T5Encoder(cfg, jnp.float32, rngs=nnx.Rngs(seed))
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    with tempfile.TemporaryDirectory() as tmp:  # a T5 checkpoint holds its tokenizer as spiece.model
        spiece = Path(tmp) / "spiece.model"
        shutil.copy2(ASSETS / "tiny_spiece.model", spiece)
        checkpoint.save(flat, out, "t5", dataclasses.asdict(cfg), overwrite=True, dtype="float32", files=[spiece])


def train_vae(config: MagiConfig, recipe: Recipe, out: Path, log) -> dict:
    from magi_jax.vae import WORLD
    from magi_jax.vae_train import VaeTrainer, VaeTraining, world_batches

    rt = config.runtime
    training = VaeTraining(recipe.vae_steps, recipe.vae_batch, recipe.vae_lr, seed=recipe.seed)
    trainer = VaeTrainer(WORLD, training)
    data = world_batches(recipe.vae_clips, recipe.vae_batch, (rt.video_size_w, rt.video_size_h), 8, recipe.seed)
    t0, last = time.perf_counter(), {}
    for i in range(recipe.vae_steps):
        last = trainer.step(next(data))
        if i % 100 == 0 or i == recipe.vae_steps - 1:
            log(
                f"vae step {i + 1}/{recipe.vae_steps}: reconstruction {last['reconstruction']:.4f}, "
                f"kl {last['kl']:.2f} ({time.perf_counter() - t0:.0f} s)"
            )
    # latents times the config's scale_factor at unit variance: where the sampler's noise is
    scale = trainer.calibrate([next(data) for _ in range(16)], 1.0 / rt.scale_factor)
    trainer.save(out, overwrite=True, dtype="bfloat16")
    return {"reconstruction": last["reconstruction"], "latent_rescale": scale, "seconds": time.perf_counter() - t0}


def world_items(config: MagiConfig, count: int, seed: int):
    """(name, caption, frames) of training clips 0..count-1 at the config's size and length."""
    from magi_jax import synthetic_world

    rt = config.runtime
    for i in range(count):
        c = synthetic_world.clip(seed, i, (rt.video_size_w, rt.video_size_h), rt.num_frames, rt.fps)
        yield f"world_{i:05d}", c.caption, c.frames


def train_dit(config: MagiConfig, recipe: Recipe, out: Path, work: Path, log) -> dict:
    from magi_jax import checkpoint, t5
    from magi_jax.dit import DiT
    from magi_jax.objective import ObjectiveConfig
    from magi_jax.train import TrainConfig, Trainer, fit
    from magi_jax.train_data import META, ClipData, write_dataset
    from magi_jax.vae_weights import load_vae

    rt = config.runtime
    t0 = time.perf_counter()
    meta = work / "data" / META
    if not (meta.exists() and json.loads(meta.read_text())["clips"] == recipe.dit_clips):  # else: a resumed run
        vae = load_vae(Path(rt.vae_pretrained), scale_factor=rt.scale_factor)
        text = t5.load_text_encoder(Path(rt.t5_pretrained))
        items = world_items(config, recipe.dit_clips, recipe.seed)
        write_dataset(items, work / "data", config, vae, text, recipe.dit_clips)
    prepared = time.perf_counter() - t0
    log(f"dit data: {recipe.dit_clips} clips encoded in {prepared:.0f} s")

    tcfg = TrainConfig(
        learning_rate=recipe.dit_lr,
        warmup_steps=min(200, recipe.dit_steps // 10),
        total_steps=recipe.dit_steps,
        weight_decay=0.01,
        batch_size=recipe.dit_batch,
        seed=recipe.seed,
        save_every=max(recipe.dit_steps // 4, 1),
        remat=False,
        # half the clips at moments of the sampler's window: every generation starts there
        objective=ObjectiveConfig(caption_dropout=0.1, clean_context_prob=0.3, window_prob=0.5, window=rt.window_size),
    )
    tcfg.check(config)
    model = DiT(
        config.model, fp8_quant=config.engine.fp8_quant, distill=config.engine.distill, rngs=nnx.Rngs(recipe.seed)
    )
    trainer = Trainer(model, config, tcfg)
    # clips cut to their first k chunks, so the duration token means at training what it
    # means when the generate command makes a k-chunk video (train_data's module doc)
    data = ClipData(work / "data", config, seed=recipe.seed, prefixes=True)
    losses = []

    def record(step, metrics):
        losses.append(metrics["loss"])
        if step % 100 == 0 or step + 1 == recipe.dit_steps:
            log(
                f"dit step {step + 1}/{recipe.dit_steps}: loss {np.mean(losses[-100:]):.4f} "
                f"({time.perf_counter() - t0 - prepared:.0f} s)"
            )

    state = fit(trainer, data, work / "dit_run", recipe.dit_steps, resume=True, log=record)
    merged = trainer.model(state)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(merged))}
    # the checkpoint records the variant's config as shipped, not this run's weight paths
    checkpoint.save(flat, out, "dit", load_config("tiny").to_dict(), overwrite=True)
    return {"loss_last_100": float(np.mean(losses[-100:])), "seconds": time.perf_counter() - t0}


def build(out, recipe: Recipe = Recipe(), work=None, log=print) -> dict:
    """Runs the whole recipe into `out`; returns what recipe.json records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = with_bundled_weights(load_config("tiny"), out)
    t0 = time.perf_counter()
    scratch = contextlib.nullcontext(work) if work else tempfile.TemporaryDirectory(prefix="magi_world_")
    with scratch as folder:
        work = Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        train_t5(config, out / "t5", recipe.seed)
        report = {"recipe": dataclasses.asdict(recipe), "jax": jax.__version__, "device": jax.devices()[0].device_kind}
        report["vae"] = train_vae(config, recipe, out / "vae", log)
        report["dit"] = train_dit(config, recipe, out / "dit", work, log)
    report["minutes"] = (time.perf_counter() - t0) / 60
    (out / "recipe.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


PREVIEW_PROMPT = "a yellow ball moves down"


def preview(png, prompt: str = PREVIEW_PROMPT, seed: int = 1, frames: int = 8) -> np.ndarray:
    """Runs the default generate command (the bundled model) and writes `frames` of its video
    side by side to `png` (the README's frame strip); returns the frames (T, H, W, 3)."""
    from magi_jax.generate import main as generate
    from magi_jax.video_io import frame_strip, read_frames, write_png

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "preview.mp4"
        if generate(["--prompt", prompt, "--seed", str(seed), "--output_path", str(video)]) != 0:
            raise RuntimeError("the generate command failed (its error is above)")
        config = load_config("tiny").runtime
        clip = read_frames(video, config.fps, config.video_size_w, config.video_size_h)
    write_png(png, frame_strip(clip, frames))
    return clip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_jax.world_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for t5/, vae/, dit/ (the bundle: magi_jax/assets/tiny)")
    ap.add_argument("--work", default=None, help="folder for the dataset and train states (default: temporary)")
    ap.add_argument("--preview", default=None, help="instead of training: a PNG frame strip of the default command")
    ap.add_argument("--prompt", default=PREVIEW_PROMPT, help="the --preview prompt")
    for f in dataclasses.fields(Recipe):
        ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    if args.preview:
        preview(args.preview, args.prompt)
        print(f"wrote {args.preview}")
        return 0
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    bad = [f"--{f.name}" for f in dataclasses.fields(Recipe) if f.name != "seed" and getattr(recipe, f.name) <= 0]
    problems = [f"{', '.join(bad)} must be positive"] if bad else []
    if not args.out:
        problems.append("--out (the folder to write the weights to) is required, or --preview PNG")
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    report = build(args.out, recipe, args.work, log=lambda m: print(m, flush=True))
    print(f"wrote {args.out} in {report['minutes']:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
