"""A whole generation next to its parts: does decoding hide behind sampling?

    python bench/generate_e2e.py                                  # TINY, random weights
    python bench/generate_e2e.py --config 4.5B_distill --layers 2 --size 256x256 --frames 96

Loads the models once (random weights), runs everything once to compile, then times:
  sampler alone   every chunk of the sampler, each waited for (no decoding)
  decoder alone   the VAE decoding those chunks one after another (first chunk's time too)
  sequential      the generate pipeline with --no_overlap: sample, decode, write in turn
  overlapped      the generate pipeline as it runs by default (decode dispatched at once,
                  frames read and encoded to mp4 on the writer thread)
Pipelines write a real mp4 to a temporary folder. Goal on an accelerator:
overlapped <= 1.1 x max(sampler, decoder) + first chunk's decode. On CPU the device work of
sampler and decoder shares the cores, so the figures show what overlap gained over the
sequential run rather than the goal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import device_name  # noqa: E402

from magi_jax.compile_cache import CompileStats  # noqa: E402
from magi_jax.config import load_config  # noqa: E402
from magi_jax.generate import Plan  # noqa: E402
from magi_jax.pipeline import _pipeline, load_parts  # noqa: E402
from magi_jax.timing import Timeline  # noqa: E402
from magi_jax.video_io import VideoWriter  # noqa: E402


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="DiT layers (default: the config's)")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    h, w = (int(v) for v in args.size.split("x"))
    config = load_config(args.config).apply_env()
    model = {} if args.layers is None else {"num_layers": args.layers}
    runtime = dict(num_frames=args.frames, num_steps=args.steps, video_size_h=h, video_size_w=w)
    config = config.replace(model=model, runtime=runtime)
    tmp = Path(tempfile.mkdtemp(prefix="magi_e2e_"))
    plan = Plan(config, "t2v", "a fox in the snow", tmp / "out.mp4", random_weights=True)
    stats = CompileStats()
    parts = load_parts(plan, Timeline(stats))
    sampler, vae, inputs = parts.sampler, parts.vae, parts.inputs

    def sample_all():
        out = []
        for latents in sampler.chunks(*inputs[:2], prefix=inputs[2]):
            out.append(np.asarray(latents))
        return out

    def pipeline(overlap: bool):
        with VideoWriter(tmp / f"run_{overlap}.mp4", config.runtime.fps) as writer:
            _pipeline(sampler, vae, inputs, writer, {"overlap": overlap})

    t0 = time.perf_counter()
    chunks = sample_all()
    for c in chunks:
        np.asarray(vae.decode_chunk(c[0]))
    pipeline(True)
    warm = time.perf_counter() - t0

    sampler_s = best_of(sample_all, args.repeat)
    first_decode = best_of(lambda: np.asarray(vae.decode_chunk(chunks[0][0])), args.repeat)
    decoder_s = best_of(lambda: [np.asarray(vae.decode_chunk(c[0])) for c in chunks], args.repeat)
    sequential = best_of(lambda: pipeline(False), args.repeat)
    overlapped = best_of(lambda: pipeline(True), args.repeat)

    m = config.model
    print(f"device: {device_name()}")
    print(
        f"model: {args.config}, {m.num_layers} layers, hidden {m.hidden_size}; {args.frames} frames {args.size}, "
        f"{args.steps} steps, {len(chunks)} chunks; warm-up (compiling) {warm:.1f}s; best of {args.repeat}"
    )
    print(f"  sampler alone     {sampler_s:8.3f}s")
    print(f"  decoder alone     {decoder_s:8.3f}s   (first chunk {first_decode:.3f}s)")
    print(f"  sequential        {sequential:8.3f}s")
    print(f"  overlapped        {overlapped:8.3f}s")
    goal = 1.1 * max(sampler_s, decoder_s) + first_decode
    print(
        f"  overlap gained {sequential - overlapped:+.3f}s ({1 - overlapped / sequential:+.1%} of the sequential run); "
        f"overlapped / (sampler + decoder) = {overlapped / (sampler_s + decoder_s):.2f}"
    )
    print(f"  goal (accelerators): overlapped <= {goal:.3f}s -> {'met' if overlapped <= goal else 'not met'}")


if __name__ == "__main__":
    main()
