"""The command users run: prompt (+ image or video) -> MAGI-1 video.

    python -m magi_jax.generate --prompt "A red fox trots through snow" --output_path fox.mp4
    python -m magi_jax.generate --config_file 4.5B_distill --mode i2v --image_path cat.jpg \
        --prompt "The cat wakes up" --output_path cat.mp4
    python -m magi_jax.generate --config_file 4.5B_distill --duration 60s --output_path story.mp4 \
        --prompt "a cat sleeps on a sofa" --prompt "20s: the cat wakes up" --prompt "40s: it jumps out"

Upstream's flags keep upstream's meaning (`--config_file`, `--mode`, `--prompt`,
`--image_path`, `--prefix_video_path`, `--output_path`); ours override the config
(`--seed`, `--num_steps`, `--num_frames`, `--size`, `--dtype`, checkpoint paths, ...).
Without a config (or with `--config_file tiny`) the tiny variant runs the bundled model, a
small MAGI-1 trained here on the procedural ball world (world_model.py), so the first command
needs no download; `--random_weights` runs tiny with random weights instead (a smoke test of
the pipeline that produces noise, and says so).

Data path: text encoder -> special tokens and per-chunk captions -> sampler (DiT + KV
cache) -> each clean chunk decoded by the VAE and appended to the mp4 as soon as it
leaves the window. Every input is checked before any model is loaded, and the mp4 is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magi_jax.config import ConfigError, MagiConfig, load_config, parse_size

MODES = ("t2v", "i2v", "v2v")


class UsageError(ValueError):
    """Bad command-line input; the message says what to change."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m magi_jax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--config_file",
        default=None,
        help="upstream JSON config or variant name (default: tiny, with its bundled weights: see world_model.py)",
    )
    ap.add_argument("--mode", default="t2v", help="t2v, i2v or v2v")
    ap.add_argument(
        "--prompt",
        action="append",
        help="the video's text; repeat as --prompt 'SECONDS: text' for a story that changes (see timeline.py)",
    )
    ap.add_argument("--image_path", default=None, help="conditioning image (i2v)")
    ap.add_argument("--prefix_video_path", default=None, help="video to continue (v2v)")
    ap.add_argument("--output_path", required=True, help="the .mp4 to write")
    ours = ap.add_argument_group("magi-jax overrides")
    ours.add_argument("--seed", type=int, default=None)
    ours.add_argument("--num_steps", type=int, default=None)
    ours.add_argument("--num_frames", type=int, default=None, help="frames to generate (after any prefix)")
    ours.add_argument("--duration", default=None, help="video length instead of --num_frames: 60s, 1m30s, ...")
    ours.add_argument("--prompt_file", default=None, help="a story: one 'SECONDS: text' line per prompt")
    ours.add_argument(
        "--extend", action="store_true", help="v2v: continue from the video's last frames; the output holds it whole"
    )
    ours.add_argument("--size", default=None, help="HEIGHTxWIDTH in pixels, multiples of 16 (e.g. 720x1280)")
    ours.add_argument("--fps", type=int, default=None)
    ours.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="DiT parameter dtype")
    ours.add_argument("--dit_ckpt", default=None, help="DiT weights: magi-jax checkpoint or upstream folder")
    ours.add_argument("--vae_ckpt", default=None, help="VAE folder (upstream layout)")
    ours.add_argument("--t5_ckpt", default=None, help="T5 folder (upstream t5_pretrained layout)")
    ours.add_argument(
        "--random_weights",
        action="store_true",
        help="tiny with random weights instead of the bundled ones (a pipeline smoke test; the video is noise)",
    )
    ours.add_argument(
        "--prefix_frames",
        type=int,
        default=32,
        help="v2v: prefix frames taken from the start of the video (upstream: 32); 0 = last whole seconds, up to 5",
    )
    ours.add_argument("--aspect_policy", default="fit", help="i2v image resize: fit, crop or pad")
    ours.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA adapter written by python -m magi_jax.train, merged into the DiT at SCALE (default 1); repeatable",
    )
    ours.add_argument(
        "--mesh",
        default=None,
        help="device mesh: 'model=2,seq=4' or '2x4' (model x seq), or 'auto': the mesh with the fewest devices on "
        "model whose memory plan fits; default: all devices on the sequence axis",
    )
    add_run_flags(ap)  # compilation cache, timing summary, profile
    return ap.parse_args(argv)


def add_run_flags(ap: argparse.ArgumentParser):
    """The command's flags for RunOptions."""
    g = ap.add_argument_group("speed and diagnostics")
    g.add_argument(
        "--compilation_cache",
        default=None,
        help="folder of the persistent compilation cache, or 'off' (default: $MAGI_JAX_CACHE_DIR, else "
        "~/.cache/magi_jax/jax_cache)",
    )
    g.add_argument("--json_summary", default=None, help="write the timing summary to this JSON file")
    g.add_argument("--profile", default=None, help="write a jax.profiler trace (TensorBoard / XProf) to this folder")
    g.add_argument(
        "--no_overlap", action="store_true", help="sample, decode and write one after the other (for comparisons)"
    )


def options_from_args(args: argparse.Namespace, start: float | None = None):
    """The flags as pipeline.RunOptions; a summary path that cannot be written is refused now,
    not after the run."""
    from magi_jax.pipeline import RunOptions

    if args.json_summary:
        target = Path(args.json_summary)
        if target.is_dir():
            raise UsageError(f"--json_summary {target} is a folder; give a file name, e.g. {target / 'summary.json'}")
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"--json_summary: folder {parent} does not exist; create it or choose another path")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"--json_summary: folder {parent} is not writable; choose another path")
    return RunOptions(
        overlap=not args.no_overlap,
        json_summary=args.json_summary,
        profile=args.profile,
        compilation_cache=args.compilation_cache,
        start=start,
    )


@dataclass
class Plan:
    """Everything the run needs, resolved and checked before heavy work starts."""

    config: MagiConfig
    mode: str
    prompt: str
    output: Path
    random_weights: bool
    image: np.ndarray | None = None  # (1, H, W, 3) uint8, already resized
    video: np.ndarray | None = None  # (T, H, W, 3) uint8, already resampled and cut
    dit_source: Path | None = None
    mesh: dict | None = None  # {axis: size} when more than one device takes part
    loras: tuple = ()  # ((adapter folder, scale), ...) merged into the DiT in this order
    timeline: list | None = None  # timeline.Segment list (prompt = the first one's text)
    keep_video: Path | None = None  # --extend: the video whose frames open the output


def resolve(args: argparse.Namespace) -> Plan:
    """Checks every input; raises UsageError / ConfigError / MediaError with the fix."""
    from magi_jax import timeline
    from magi_jax.sampler_plan import layout
    from magi_jax.video_io import ASPECT_POLICIES, check_output_path, read_image, read_video

    if args.mode not in MODES:
        raise UsageError(f"unknown --mode {args.mode!r}; use one of {', '.join(MODES)}")
    story = timeline.cli_segments(args.prompt, args.prompt_file)
    if args.extend and args.mode != "v2v":
        raise UsageError("--extend continues a video: use it with --mode v2v --prefix_video_path")
    output = check_output_path(args.output_path)
    if args.aspect_policy not in ASPECT_POLICIES:
        raise UsageError(f"unknown --aspect_policy {args.aspect_policy!r}; use one of {', '.join(ASPECT_POLICIES)}")
    if args.mode == "i2v" and not args.image_path:
        raise UsageError("--mode i2v needs --image_path (the image to animate)")
    if args.mode == "v2v" and not args.prefix_video_path:
        raise UsageError("--mode v2v needs --prefix_video_path (the video to continue)")

    from magi_jax.pipeline import default_weights

    given = any(getattr(args, flag) for flag in ("dit_ckpt", "vae_ckpt", "t5_ckpt"))
    if args.random_weights and (given or args.config_file not in (None, "tiny")):
        raise UsageError("--random_weights runs the tiny variant: leave out --config_file and the --*_ckpt flags")
    config = load_config(args.config_file or "tiny").apply_env()
    config, random_weights = default_weights(config, args.config_file, given, args.random_weights)
    runtime = {}
    if args.seed is not None:
        runtime["seed"] = args.seed
    if args.num_steps is not None:
        runtime["num_steps"] = args.num_steps
    if args.num_frames is not None:
        runtime["num_frames"] = args.num_frames
    if args.fps is not None:
        runtime["fps"] = args.fps
    if args.duration is not None:
        if args.num_frames is not None:
            raise UsageError("give --duration or --num_frames, not both")
        fps = runtime.get("fps", config.runtime.fps)
        runtime["num_frames"] = timeline.frames_for(
            timeline.parse_duration(args.duration), fps, config.runtime.temporal_downsample_factor
        )
    if args.size is not None:
        runtime["video_size_h"], runtime["video_size_w"] = parse_size(args.size)
    for flag, field in (("dit_ckpt", "load"), ("vae_ckpt", "vae_pretrained"), ("t5_ckpt", "t5_pretrained")):
        if getattr(args, flag):
            runtime[field] = getattr(args, flag)
            random_weights = False
    model = {"params_dtype": args.dtype} if args.dtype else {}
    config = config.replace(runtime=runtime, model=model)
    rt = config.runtime
    tdf = rt.temporal_downsample_factor
    if args.prefix_frames < 0 or (args.prefix_frames % tdf and args.prefix_frames != 1):
        lo = args.prefix_frames // tdf * tdf
        raise UsageError(f"--prefix_frames {args.prefix_frames} must be 0, 1 or a multiple of {tdf}; use {lo or tdf}")
    layout(config, 0)  # the schedule's divisibility rules, before anything is loaded
    story = timeline.check(story, rt.num_frames / rt.fps, [f"prompt at {s.start:g}s" for s in story])
    import jax

    from magi_jax import sharding
    from magi_jax.memory_plan import check_fits, choose_mesh, plan_memory

    auto = args.mesh == "auto"  # resolved below, once the prefix's length is known
    mesh = sharding.parse_mesh(args.mesh) if not auto and (args.mesh or jax.device_count() > 1) else None
    # media are read (and resized) now: an unreadable file fails before any model loads
    image = video = None
    if args.mode == "i2v":
        image = read_image(args.image_path, rt.video_size_w, rt.video_size_h, args.aspect_policy)
    if args.mode == "v2v":
        video = read_video(
            args.prefix_video_path, rt.fps, rt.video_size_w, rt.video_size_h, args.prefix_frames or None, args.extend
        )
        if len(video) != 1:
            video = video[: len(video) // tdf * tdf]  # the VAE encodes 1 frame or a multiple of 4
        if not len(video):
            raise UsageError(f"--prefix_video_path has fewer than {tdf} frames at {rt.fps} fps; use a longer video")
        layout(config, 1 if len(video) == 1 else len(video) // tdf)
    prefix = 1 if image is not None else 0 if video is None else (1 if len(video) == 1 else len(video) // tdf)
    if auto and jax.device_count() > 1:
        mesh, plan = choose_mesh(config, jax.device_count(), prefix)
        if sharding.is_writer():  # every host of a pod chooses the same mesh; one says so
            print(f"--mesh auto: {sharding.describe_mesh(mesh)} ({plan.describe()})", file=sys.stderr)
    else:
        plan = plan_memory(config, mesh, prefix)
    check_fits(plan)  # refuse, with the numbers, what cannot fit a device
    dit_source = None if random_weights else _dit_source(config)  # weights must exist
    if not random_weights:  # a bucket holds converted checkpoints only: say so before anything loads
        from magi_jax.pipeline import weights_source
        from magi_jax.storage import is_url

        for given, model in ((rt.t5_pretrained, "T5"), (rt.vae_pretrained, "VAE")):
            if is_url(given):
                weights_source(given, model)
    loras = _loras(args.lora, config)
    keep = Path(args.prefix_video_path) if args.extend else None
    return Plan(
        config,
        args.mode,
        story[0].prompt,
        output,
        random_weights,
        image,
        video,
        dit_source,
        mesh,
        loras,
        timeline=story,
        keep_video=keep,
    )


def _loras(texts, config: MagiConfig) -> tuple:
    """--lora PATH[:SCALE] values, each checked against the model before anything loads."""
    from magi_jax.lora import LoRAError, check_compatible, parse_lora_arg

    out = []
    for text in texts:
        try:
            path, scale = parse_lora_arg(text)
            check_compatible(path, config)
        except LoRAError as e:
            raise UsageError(str(e)) from None
        out.append((path, scale))
    return tuple(out)


def _dit_source(config: MagiConfig) -> Path:
    """Where the DiT weights are: a magi-jax checkpoint, or upstream's inference_weight folder."""
    from magi_jax.checkpoint import CONVERTED_SUFFIX, is_checkpoint
    from magi_jax.dit_weights import check_weight_kind
    from magi_jax.storage import local, location

    if not config.runtime.load:
        raise ConfigError("runtime_config.load is empty; pass --dit_ckpt or set load to the downloaded model folder")
    root = location(config.runtime.load)
    if is_checkpoint(root):
        return root
    sub = (
        "inference_weight" + (".fp8" if config.engine.fp8_quant else "") + (".distill" if config.engine.distill else "")
    )
    for candidate in (root.with_name(root.name + CONVERTED_SUFFIX), root / (sub + CONVERTED_SUFFIX), root / sub, root):
        if is_checkpoint(candidate) or (
            candidate.is_dir()
            and (any(candidate.glob("*.safetensors*")) or (candidate / "model.safetensors.index.json").exists())
        ):
            check_weight_kind(candidate, config)  # base vs distilled weights share every key: check now
            return candidate if is_checkpoint(candidate) else local(candidate, "DiT")
    raise ConfigError(
        f"no DiT weights under {root}: expected {root / sub}/model.safetensors (or its shards), as released, or a "
        f"checkpoint written by convert_torch_weights.py; check --dit_ckpt / runtime_config.load"
    )


def main(argv=None) -> int:
    from magi_jax.run_guard import Interrupted, signals_as_exceptions

    # a signal unwinds like an exception: the temporary video is removed on the way out
    with signals_as_exceptions():
        try:
            return _main(argv)
        except Interrupted as e:
            print(f"{e}: no video written", file=sys.stderr)
            return e.exit_code


def _main(argv=None) -> int:
    import time

    started = time.perf_counter()
    from magi_jax.convert import ConversionError
    from magi_jax.memory_plan import MemoryPlanError
    from magi_jax.sampler import NonFiniteError
    from magi_jax.sharding import MeshError, maybe_initialize_distributed
    from magi_jax.tensor_file import CheckpointError
    from magi_jax.timeline import TimelineError
    from magi_jax.vae import VaeConfigError
    from magi_jax.video_io import MediaError

    # what a user can fix: told in one line (conversion errors list the keys), never a traceback
    weights_errors = (CheckpointError, ConversionError, VaeConfigError, FileNotFoundError)
    args = parse_args(argv)
    from magi_jax import compile_cache

    cache_dir = compile_cache.enable(args.compilation_cache)  # before anything compiles
    from magi_jax.pipeline import run

    try:
        maybe_initialize_distributed()  # on a pod: every host runs this same command
        plan = resolve(args)
        options = options_from_args(args, started)
    except (UsageError, ConfigError, MediaError, MeshError, MemoryPlanError, CheckpointError, TimelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(plan, options)
    except (ConfigError, MediaError, *weights_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; no video written", file=sys.stderr)
        return 1
    except Exception as e:
        hint = compile_cache.broken_program_hint(e, cache_dir)
        if hint is None:
            raise
        print(f"error: {hint}; no video written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    if code in (130, 143):
        # Interrupted mid-run: work may still be in flight on XLA's threads, and tearing the
        # interpreter down beneath it can crash (SIGSEGV). The output is already cleaned up,
        # so leave without the teardown and keep the shell's exit code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
