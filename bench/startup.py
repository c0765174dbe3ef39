"""Fast starts: the same generation twice, each in a fresh process, sharing one compilation cache.

    python bench/startup.py                     # TINY (the README command) and a 4.5B-shaped 2-layer model
    python bench/startup.py --models tiny --size 64x64 --frames 32

For each run it prints the time to the first chunk written (from the process's start, imports
included), the compilation time (tracing, lowering and XLA compiling or loading from the
cache), the XLA compilations and the cache hits, then the ratio second/first of the time to
first chunk. Goal: the second run's time to first chunk is at most a third of the first's.

TINY runs the generate command as a user does. The 4.5B shape (hidden size, heads, groups of
4.5B_distill, 2 layers, the tiny text encoder and VAE) runs through the Python API
`pipeline.run`, which turns the cache on by default too; its DiT weights are read from a
converted checkpoint written before the timed runs, as released weights are (`--weights
random` draws them in each run instead: about 10 s of random numbers that no cache saves). The cache folder is a fresh
temporary one, so the first run always starts cold.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before any import: the child's time to first chunk includes them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _config(args):
    sys.path.insert(0, str(ROOT))
    from magi_jax.config import load_config

    h, w = (int(v) for v in args.size.split("x"))
    return (
        load_config(args.config)
        .apply_env()
        .replace(
            model=dict(num_layers=args.layers),
            runtime=dict(num_frames=args.frames, num_steps=args.steps, video_size_h=h, video_size_w=w),
        )
    )


def write_checkpoint(args, path: Path):
    """The 4.5B-shaped DiT's random weights as a converted checkpoint (before the timed runs)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from flax import nnx

    from magi_jax import checkpoint, pipeline

    config = _config(args)
    model = pipeline.dit_model(config, True, None)
    host = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    checkpoint.save(host, str(path), "dit", config.to_dict())


def child(args):
    """Runs inside the fresh process: a 4.5B-shaped generation through the Python API."""
    sys.path.insert(0, str(ROOT))
    from magi_jax import pipeline
    from magi_jax.generate import Plan
    from magi_jax.pipeline import RunOptions, run

    config = _config(args)
    if args.dit_ckpt:  # the DiT read from disk as released weights are; the tiny T5 and VAE stay random
        from magi_jax.dit_weights import load_dit

        pipeline.dit_model = lambda config, random_weights, source, mesh=None: load_dit(args.dit_ckpt, config, mesh)
    plan = Plan(config, "t2v", "a fox in the snow", Path(args.output), random_weights=True)
    run(plan, RunOptions(json_summary=args.summary, start=_T0, compilation_cache=args.cache))


def one_run(model: str, args, cache: str, work: Path, n: int) -> dict:
    summary = work / f"{model}_{n}.json"
    out = work / f"{model}_{n}.mp4"
    common = ["--num_frames", str(args.frames), "--num_steps", str(args.steps), "--size", args.size]
    if model == "tiny":
        cmd = [sys.executable, "-m", "magi_jax.generate", "--prompt", "A red fox in the snow", "--output_path"]
        cmd += [str(out), *common, "--compilation_cache", cache, "--json_summary", str(summary)]
    else:
        cmd = [sys.executable, __file__, "--child", "--config", model, "--layers", str(args.layers)]
        cmd += ["--frames", str(args.frames), "--steps", str(args.steps), "--size", args.size]
        cmd += ["--output", str(out), "--summary", str(summary), "--cache", cache]
        if args.weights == "checkpoint":
            cmd += ["--dit_ckpt", str(work / "dit.magi_jax")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    s["process_wall"] = wall
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,4.5B_distill", help="comma-separated: tiny and/or a variant name")
    ap.add_argument("--layers", type=int, default=2, help="DiT layers of the non-tiny model")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="32x32")
    ap.add_argument(
        "--weights",
        choices=("checkpoint", "random"),
        default="checkpoint",
        help="the non-tiny DiT: read from a checkpoint written before the timed runs (as released "
        "weights are), or random weights drawn in each run (about 10 s of RNG at 4.5B shapes)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dit_ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--summary", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import jax  # only to name the device

    print(f"device: {jax.devices()[0].platform}:{jax.devices()[0].device_kind} (x{jax.device_count()})")
    print(f"generation: {args.frames} frames {args.size}, {args.steps} steps; cache in a fresh temporary folder")
    failed = False
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="magi_startup_") as tmp:
            work = Path(tmp)
            cache = str(work / "jax_cache")
            if model != "tiny" and args.weights == "checkpoint":
                args.config = model
                write_checkpoint(args, work / "dit.magi_jax")
            runs = [one_run(model, args, cache, work, n) for n in (1, 2)]
        name = "TINY" if model == "tiny" else f"{model} shape, {args.layers} layers, {args.weights} weights"
        print(f"\n[{name}]")
        for n, s in enumerate(runs, 1):
            print(
                f"  run {n}: first chunk after {s['time_to_first_chunk']:6.2f}s, compilation "
                f"{s['seconds']['compilation']:6.2f}s, {s['compilations']:3d} compiled, "
                f"{s['cache_hits']:3d} cache hits, total {s['seconds']['total']:6.2f}s "
                f"(process {s['process_wall']:.2f}s)"
            )
            parts = sorted(((v, k) for k, v in s["seconds"].items() if k != "total" and v >= 0.05), reverse=True)
            print("         " + ", ".join(f"{k} {v:.2f}s" for v, k in parts))
        ratio = runs[1]["time_to_first_chunk"] / runs[0]["time_to_first_chunk"]
        ok = ratio <= 1 / 3
        failed |= not ok
        print(f"  second / first time to first chunk: {ratio:.2f} (goal <= 0.33: {'met' if ok else 'NOT met'})")
    if os.environ.get("BENCH_STRICT") and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
