"""How well a world-model bundle follows its prompts: the score over seeds, and why.

    python bench/world_model_eval.py                              # the bundled model
    python bench/world_model_eval.py --bundle out/ --seeds 1 2 3 4 --frames 16

Two reports on a bundle (the `t5/`, `vae/`, `dit/` folders world_model.py writes):

1. Prompts: the generate command at the variant's settings for the 6 prompts of
   tests/test_world_model.py and the 3 held-out (colour, direction) pairs, each seed;
   `synthetic_world.describe` reads the decoded frames back (colour, and the ball's centroid
   velocity fitted over the clip). One line per seed (prompt -> what the video shows) and
   the totals: the test holds one seed, this scores as many as asked.
2. Caption swap: rolling clips the model never trained on (indices from 50,000), their
   first chunk noised to flow time t = warp(u) as the sampler's first stages see it, scored
   (the objective's velocity error) under the true caption and under the same colour with
   each other direction. The caption is the one the generate command gives the first chunk
   of a `--frames` video: its duration token counts that video's chunks, and a model trained
   on longer clips reads a small count as "late in the clip". Rows: the clip's direction;
   columns: the caption's. A model that reads the direction has its row minimum on the
   diagonal. Near t = 0 the error also favours a blurred guess over a sharp misplaced one,
   so read the table beside the prompt score, not instead of it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

DIRECTIONS = ("right", "left", "up", "down")


def score_prompts(bundle: Path, seeds, frames: int) -> dict:
    from magi_jax import synthetic_world
    from magi_jax.config import load_config
    from magi_jax.generate import main as generate
    from magi_jax.video_io import read_frames

    rt = load_config("tiny").runtime
    groups = {"prompts": synthetic_world.SCORED, "held-out pairs": synthetic_world.HELD_OUT}
    totals = {name: [0, 0, 0] for name in groups}  # colour right, both right, count
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.mp4"
        for seed in seeds:
            line = []
            for name, pairs in groups.items():
                for p in pairs:
                    text = synthetic_world.roll_prompt(*p)
                    args = ["--config_file", "tiny", "--prompt", text, "--seed", str(seed)]
                    args += ["--num_frames", str(frames), "--output_path", str(out)]
                    for part in ("dit", "vae", "t5"):
                        args += [f"--{part}_ckpt", str(bundle / part)]
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        if generate(args) != 0:
                            raise RuntimeError(f"generate failed for {text!r} (run it by hand to see why)")
                    got = synthetic_world.describe(read_frames(out, rt.fps, rt.video_size_w, rt.video_size_h))
                    t = totals[name]
                    t[0], t[1], t[2] = t[0] + (got[0] == p[0]), t[1] + (got == p), t[2] + 1
                    line.append(f"{p[0]} {p[1]} -> {got[0] or '-'} {got[1] or '-'}")
            print(f"seed {seed}: " + "; ".join(line), flush=True)
    for name, (colour, both, n) in totals.items():
        print(f"{name}: colour {colour}/{n}, colour and direction {both}/{n}")
    return totals


def caption_swap(bundle: Path, us, clips_per_direction: int, frames: int) -> dict:
    import jax
    import jax.numpy as jnp

    from magi_jax import synthetic_world, t5
    from magi_jax.config import load_config
    from magi_jax.dit_weights import load_dit
    from magi_jax.objective import clip_velocity, warp_time
    from magi_jax.pipeline import with_bundled_weights
    from magi_jax.special_tokens import caption_side, token_table
    from magi_jax.vae_weights import load_vae

    config = with_bundled_weights(load_config("tiny"), bundle)
    rt, m = config.runtime, config.model
    dit = load_dit(bundle / "dit", config)
    vae = load_vae(bundle / "vae", scale_factor=rt.scale_factor)
    text = t5.load_text_encoder(bundle / "t5")
    table = token_table(channels=m.caption_channels)
    velocity = jax.jit(lambda x, t, cap, mask: clip_velocity(dit, config, x, t, cap, mask, None))
    chunks = frames // (rt.temporal_downsample_factor * rt.chunk_width)

    @functools.cache
    def caption(p):  # each prompt encoded once; the first chunk's row of a `frames` video
        emb, mask = text.encode([p], m.caption_max_length)
        null = np.zeros((1, m.caption_max_length, m.caption_channels), np.float32)
        cap, cmask = caption_side(emb[:, None], mask, null, chunks, 0, rt, table, max_len=m.caption_max_length)
        return jnp.asarray(cap[0, :1], jnp.float32), jnp.asarray(cmask[0, :1], jnp.float32)

    clips, index = {d: [] for d in DIRECTIONS}, 50_000
    while min(len(v) for v in clips.values()) < clips_per_direction:
        c = synthetic_world.clip(0, index, (rt.video_size_w, rt.video_size_h), rt.num_frames, rt.fps, scene="roll")
        index += 1
        if len(clips[c.direction]) < clips_per_direction:
            clips[c.direction].append(c)
    first = rt.chunk_width  # latent frames of the first chunk, encoded once for every u
    latents = {
        d: [np.asarray(vae.encode_pixels(c.frames), np.float32)[:, :first] for c in group] for d, group in clips.items()
    }
    out = {}
    for u in us:
        t = float(warp_time(u))
        table_u = np.zeros((4, 4))
        for row, d in enumerate(DIRECTIONS):
            for n, (c, x1) in enumerate(zip(clips[d], latents[d])):
                x0 = np.asarray(jax.random.normal(jax.random.key(n), x1.shape), np.float32)
                xt = jnp.asarray(t * x1 + (1 - t) * x0)
                for col, d2 in enumerate(DIRECTIONS):
                    v = np.asarray(
                        velocity(
                            xt, jnp.full((1,), t, jnp.float32), *caption(synthetic_world.roll_prompt(c.colours[0], d2))
                        )
                    )
                    table_u[row, col] += np.mean((v - (x1 - x0)) ** 2) / len(clips[d])
        out[u] = table_u
        print(f"\ncaption swap at u = {u} (t = {t:.4f}): velocity error, rows = the clip's direction")
        print("         " + "".join(f"{d:>8s}" for d in DIRECTIONS) + "   best")
        for row, d in enumerate(DIRECTIONS):
            best = DIRECTIONS[int(table_u[row].argmin())]
            cells = "".join(f"{v:8.4f}" for v in table_u[row])
            print(f"{d:>8s} {cells}   {best}{'' if best == d else '  (wrong)'}")
    return out


def main(argv=None) -> int:
    from magi_jax.pipeline import BUNDLE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(BUNDLE), help="folder with t5/, vae/, dit/ (default: the bundled model)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--frames", type=int, default=16, help="frames per video (the test's 16: two chunks)")
    ap.add_argument("--u", type=float, nargs="+", default=[0.15, 0.5], help="sampler times of the caption swap")
    ap.add_argument("--clips", type=int, default=12, help="rolling clips per direction in the caption swap")
    ap.add_argument("--skip_prompts", action="store_true")
    args = ap.parse_args(argv)
    bundle = Path(args.bundle)
    import jax
    from common import device_name

    print(f"bundle {bundle}; device {device_name()}; jax {jax.__version__}; {time.strftime('%Y-%m-%d')}")
    if not args.skip_prompts:
        score_prompts(bundle, args.seeds, args.frames)
    caption_swap(bundle, args.u, args.clips, args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
