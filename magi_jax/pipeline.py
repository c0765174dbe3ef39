"""One generation, end to end: load the parts, encode the prompts, sample, decode, write.

The order keeps memory low, as upstream does: the text encoder runs first (every prompt of
the timeline, each once) and is freed before the DiT is loaded; the VAE encodes the prefix
(I2V / V2V) before sampling and then decodes each chunk the moment the sampler hands it
out, appending its frames to the mp4. Nothing grows with the video's length: the sampler
runs in constant device memory (sampler.py), each chunk is asked for its caption as it
enters the window (timeline.ChunkCaptions), and the mp4 is streamed to ffmpeg chunk by
chunk, so a video of minutes takes the memory of a video of seconds.

Weights: the released upstream layout (`<load>/inference_weight[.fp8][.distill]/`, the VAE
folder, `<t5_pretrained>/t5-v1_1-xxl/`) is converted on the fly; a magi-jax checkpoint
written by convert_torch_weights.py is restored directly (found next to the upstream folder
as `<folder>.magi_jax`, or given as the path itself). Without weights the tiny variant runs
the bundled model (world_model.py: trained here on the procedural ball world), or, with
`--random_weights`, random weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import compile_cache, run_guard, sharding
from magi_jax.chunk_sink import ChunkSink
from magi_jax.config import MagiConfig
from magi_jax.progress import Progress
from magi_jax.timing import Timeline, render, summary, write_json

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLE = ASSETS / "tiny"  # the tiny variant's trained weights (world_model.py writes them)
BUNDLE_PARTS = ("t5", "vae", "dit")


def _log(msg: str):
    if sharding.is_writer():  # on a pod every host runs the same command; one reports
        print(msg, file=sys.stderr, flush=True)


def weights_source(path, model: str):
    """Where to read weights given as `path`: `<path>.magi_jax` when convert_torch_weights.py
    wrote one, else `path`; a gs:// URL must hold a converted checkpoint (storage.py)."""
    from magi_jax.checkpoint import CONVERTED_SUFFIX, is_checkpoint
    from magi_jax.storage import local, location

    path = location(path)
    converted = path.with_name(path.name + CONVERTED_SUFFIX)
    if is_checkpoint(converted):
        return converted
    return path if is_checkpoint(path) else local(path, model)


def bundled_weights() -> Path | None:
    """The bundled weights' folder when every part is there (a source checkout may lack them)."""
    from magi_jax.checkpoint import is_checkpoint

    return BUNDLE if all(is_checkpoint(BUNDLE / p) for p in BUNDLE_PARTS) else None


def default_weights(config: MagiConfig, config_file, named: bool, random: bool = False) -> tuple[MagiConfig, bool]:
    """(config, random_weights) by the commands' one rule: with no weights `named`, the tiny
    variant (`config_file` None or "tiny") reads the bundled weights when the package has them;
    `random` (or no config and no bundle) gives random ones."""
    tiny = config_file in (None, "tiny")
    bundle = bundled_weights() if tiny and not named and not random else None
    if bundle is not None:
        return with_bundled_weights(config, bundle), False
    return config, random or (config_file is None and not named)


def with_bundled_weights(config: MagiConfig, folder: Path) -> MagiConfig:
    """`config` reading its DiT, VAE and T5 from a bundle folder (t5/, vae/, dit/)."""
    paths = {"load": folder / "dit", "vae_pretrained": folder / "vae", "t5_pretrained": folder / "t5"}
    return config.replace(runtime={k: str(v) for k, v in paths.items()})


# Below this many parameters a random initialiser is compiled for compile speed: TINY's DiT,
# VAE and T5 (0.1M, 0.9M, 0.06M values) compile in 2.7 s instead of 8.9 s, and, unoptimised,
# draw about 100 ns per value slower (0.08 s for the VAE). A larger one runs slower than its
# compilation saves (a tiny T5 with 4096 channels, 7.9M values: 0.9 s instead of 0.08 s), and
# with a warm compilation cache only the run is paid.
RUN_ONCE_PARAMETERS = 2_000_000


def random_init(build, name: str, identity):
    """`build()` (a module made with nnx.Rngs) as one jitted program: one compilation instead
    of one small program per parameter (eager init), saved like the sampler's programs so a
    warm start loads it without tracing (the values differ from eager init by rounding:
    random weights are noise either way). `identity`: everything `build` depends on (its
    config), as SavedProgram needs."""
    graphdef, shapes = nnx.split(nnx.eval_shape(build))
    small = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) < RUN_ONCE_PARAMETERS
    program = compile_cache.SavedProgram(
        lambda: jax.tree.leaves(nnx.split(build())[1]),  # plain leaves: any output tree saves
        f"random_{name}",
        identity=identity,
        options=compile_cache.RUN_ONCE_OPTIONS if small else None,
    )
    leaves = jax.block_until_ready(program())
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(shapes), leaves))


def text_encoder(config: MagiConfig, random_weights: bool, mesh=None):
    """The T5 encoder: released weights from t5_pretrained, or a random tiny one. Its weights
    go from the host straight to where `t5_device` says: `cpu` (the host CPU), else the run's
    mesh (split over all its devices) or the default device."""
    from magi_jax import t5

    if random_weights:
        cfg = dataclasses.replace(t5.TINY, d_model=config.model.caption_channels)
        model = random_init(lambda: t5.T5Encoder(cfg, jnp.float32, rngs=nnx.Rngs(0)), "t5", cfg)
        return t5.TextEncoder(model, t5.Tokenizer(ASSETS / "tiny_spiece.model"))
    if not config.runtime.t5_pretrained:
        raise FileNotFoundError("runtime_config.t5_pretrained is empty; pass --t5_ckpt (the folder with t5-v1_1-xxl)")
    placement = t5.host_device() if config.runtime.t5_device == "cpu" else mesh
    return t5.load_text_encoder(weights_source(config.runtime.t5_pretrained, "T5"), jnp.float32, placement)


def dit_model(config: MagiConfig, random_weights: bool, source: Path | None, mesh=None):
    """The DiT: released or converted weights read into their shardings on `mesh`, or random (TINY)."""
    from magi_jax.dit import DiT
    from magi_jax.dit_weights import load_dit

    if random_weights:
        eng = config.engine
        return random_init(
            lambda: DiT(config.model, fp8_quant=eng.fp8_quant, distill=eng.distill, rngs=nnx.Rngs(0)),
            "dit",
            (config.model, eng.fp8_quant, eng.distill),
        )
    return load_dit(source, config, mesh)  # generate._dit_source chose it (a converted copy first)


def vae_model(config: MagiConfig, random_weights: bool):
    """The VAE: loaded, or random (the tiny variant's); its patch must be the config's
    spatial_downsample_factor and its latent channels the DiT's."""
    from magi_jax.vae import WORLD, VaeConfigError, VaeModel
    from magi_jax.vae_runtime import Vae
    from magi_jax.vae_tiling import TileConfig
    from magi_jax.vae_weights import load_vae

    rt = config.runtime
    tiles = TileConfig.for_fps(rt.fps)
    if random_weights:
        model = random_init(lambda: VaeModel(WORLD, rngs=nnx.Rngs(0)), "vae", WORLD)
        vae = Vae(model, scale_factor=rt.scale_factor, tiles=tiles)
    elif not rt.vae_pretrained:
        raise FileNotFoundError("runtime_config.vae_pretrained is empty; pass --vae_ckpt (the released vae folder)")
    else:
        vae = load_vae(weights_source(rt.vae_pretrained, "VAE"), scale_factor=rt.scale_factor, tiles=tiles)
    cfg = vae.model.cfg
    if cfg.patch_size != rt.spatial_downsample_factor or cfg.z_chans != config.model.latent_channels:
        raise VaeConfigError(
            f"the VAE has {cfg.patch_size}x{cfg.patch_size}-pixel patches and {cfg.z_chans} latent channels, "
            f"the config expects {rt.spatial_downsample_factor} (runtime_config.spatial_downsample_factor) "
            f"and {config.model.latent_channels}; use the VAE this model was trained with"
        )
    return vae


def prefix_latents(plan, vae) -> np.ndarray | None:
    """I2V: the image's latent frame; V2V: the prefix video's latents (bf16, as upstream)."""
    if plan.image is not None:
        return vae.encode_image(plan.image)
    if plan.video is not None:
        return vae.encode_pixels(plan.video)
    return None


@dataclass(frozen=True)
class RunOptions:
    """How to run, beyond what to generate (the Plan): speed and diagnostics."""

    overlap: bool = True  # decode and write while the sampler works; False: one thing at a time
    json_summary: str | None = None  # write the timing summary here as JSON
    profile: str | None = None  # write a jax.profiler trace here (after a warm-up pass)
    compilation_cache: str | None = None  # folder, "off", or None: $MAGI_JAX_CACHE_DIR / the default
    start: float | None = None  # time.perf_counter() when the run began (default: now)


def _pipeline(sampler, vae, inputs, writer, sink_kw, on_dispatch=None):
    """Chunks from the sampler (device arrays) -> decode dispatched at once -> the sink, which
    reads and writes them (on its thread when overlapping); returns the sink."""
    sink = ChunkSink(writer, **sink_kw)
    try:
        for k, latents in enumerate(sampler.chunks(inputs[0], inputs[1], prefix=inputs[2], on_dispatch=on_dispatch)):
            run_guard.check()  # a signal swallowed inside a gc callback stops the run here
            with jax.profiler.TraceAnnotation(f"chunk {k}: decode dispatch"):
                frames = None if writer is None else vae.decode_chunk(latents[0])
            sink.put(latents, frames)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink


def run(plan, options: RunOptions | None = None) -> dict:
    """Generates plan.output; returns the timing summary (see timing.py) and prints it."""
    options = options or RunOptions()
    start = time.perf_counter() if options.start is None else options.start
    cache_dir = compile_cache.enable(options.compilation_cache)
    with compile_cache.recording() as stats:
        timeline = Timeline(stats, start)
        timeline.mark_setup_done()
        summary = _run(plan, options, timeline, cache_dir)
    if sharding.is_writer():
        _log(render(summary))
        if options.json_summary:
            write_json(options.json_summary, summary)
    return summary


@dataclass
class Parts:
    """What a run loads before sampling: the sampler (DiT inside), the VAE, and the sampler's
    inputs (per-chunk captions (a timeline.ChunkCaptions), None, prefix latents or None)."""

    sampler: object
    vae: object
    inputs: tuple
    layout: object


def load_parts(plan, timeline: Timeline) -> Parts:
    """Text encoder (loaded, used, freed), DiT, VAE, prefix latents; each timed in its phase."""
    from magi_jax.sampler import Sampler
    from magi_jax.special_tokens import token_table
    from magi_jax.timeline import ChunkCaptions, Segment, encode_story

    cfg, m = plan.config, plan.config.model
    if plan.random_weights:
        _log(
            "note: running the tiny variant with random weights, so the video is noise. "
            "For real videos pass --config_file 4.5B_distill (or another released config) with its weights "
            "downloaded, or --dit_ckpt/--vae_ckpt/--t5_ckpt (see README)."
        )

    story = getattr(plan, "timeline", None) or [Segment(0.0, plan.prompt)]
    what = "the prompt" if len(story) == 1 else f"{len(story)} prompts"
    _log(f"[1/4] encoding {what} ({'random tiny T5' if plan.random_weights else cfg.runtime.t5_pretrained})")
    # each load waits for its arrays: dispatch is asynchronous, and the next phase must not
    # be charged for this one's work
    mesh = None if plan.mesh is None else sharding.make_mesh(plan.mesh)
    with timeline.phase("load_t5"):
        encoder = text_encoder(cfg, plan.random_weights, mesh)
    with timeline.phase("text_encoding"), encoder as text:  # every prompt of the story, each once
        encoded = encode_story(lambda p: text.encode(p, m.caption_max_length), story)

    _log("[2/4] loading the DiT and the VAE" + ("" if mesh is None else f", sharding over {dict(mesh.shape)}"))
    with timeline.phase("load_dit"):
        dit = dit_model(cfg, plan.random_weights, plan.dit_source, mesh)
        for path, scale in getattr(plan, "loras", ()):
            from magi_jax.lora import merge_lora

            _log(f"      merging LoRA adapter {path} at scale {scale}")
            merge_lora(dit, path, cfg, scale)
        sampler = Sampler(dit, cfg, mesh=mesh)
        jax.block_until_ready(sampler.params)
    with timeline.phase("load_vae"):
        vae = vae_model(cfg, plan.random_weights)
        jax.block_until_ready(vae.state)
    with timeline.phase("prefix_encoding"):
        prefix = prefix_latents(plan, vae)
    with timeline.phase("text_encoding"):
        lay = sampler.layout(0 if prefix is None else prefix.shape[1])
        null = np.asarray(dit.y_embedder.null_caption[...], np.float32)[None]
        table = token_table(channels=m.caption_channels)
        captions = ChunkCaptions(
            story, encoded, null, cfg.runtime, table, m.caption_max_length, lay.chunk_num, lay.prefix_frames
        )
    return Parts(sampler, vae, (captions, None, prefix), lay)


def _run(plan, options: RunOptions, timeline: Timeline, cache_dir) -> dict:
    cfg = plan.config
    parts = load_parts(plan, timeline)
    sampler, vae, inputs, lay = parts.sampler, parts.vae, parts.inputs, parts.layout
    chunks = lay.chunk_num - lay.clean_chunks
    writer_here = sharding.is_writer()  # on a pod every host samples its shards; process 0 writes
    if options.profile:  # compile and run everything once, so the trace shows the steady state
        _log("[3/4] warm-up pass before profiling (compiles every program)")
        with timeline.phase("warmup"):
            _pipeline(sampler, vae, inputs, None if not writer_here else _Discard(), {"overlap": False})
    _log(f"[3/4] sampling {chunks} chunks of {lay.chunk_width} latent frames, {cfg.runtime.num_steps} steps each")
    with _tracing(options.profile):
        sink = _generate(plan, options, timeline, parts)
    timeline.first_chunk = sink.first_written
    timeline.finish()
    if writer_here:
        _log(f"[4/4] wrote {plan.output}: {sink.frames} frames at {cfg.runtime.fps} fps in {timeline.end:.1f}s")
    return summary(
        timeline,
        sink.times,
        frames=sink.frames,
        fps=cfg.runtime.fps,
        output=plan.output,
        cache_dir=cache_dir,
        overlap=options.overlap,
    )


@contextlib.contextmanager
def _tracing(folder):
    """A jax.profiler trace of the block into `folder` (TensorBoard / XProf), when given."""
    if not folder:
        yield
        return
    import jax.profiler

    jax.profiler.start_trace(str(folder))
    try:
        yield
    finally:
        jax.profiler.stop_trace()


def _generate(plan, options: RunOptions, timeline: Timeline, parts: Parts):
    """The pipeline into the mp4, with progress; its seconds go into `timeline`."""
    from magi_jax.video_io import VideoWriter

    cfg, lay = plan.config, parts.layout
    sampler, vae, inputs = parts.sampler, parts.vae, parts.inputs
    chunks = lay.chunk_num - lay.clean_chunks
    writer_here = sharding.is_writer()
    output = VideoWriter(plan.output, cfg.runtime.fps) if writer_here else contextlib.nullcontext()
    with Progress(chunks, sampler_steps(cfg, lay), enabled=writer_here) as progress:
        # a step bar dispatches steps one by one; on a pod every host must dispatch the same
        # programs in the same order, so the reporting host's choice holds for all
        one_by_one = sharding.agreed(progress.wants_steps)
        with output as writer:
            kept = _write_kept_video(plan, writer, timeline)
            sink = _pipeline(
                sampler,
                vae,
                inputs,
                writer,
                dict(
                    overlap=options.overlap,
                    on_written=progress.chunk_written,
                    clock=timeline.clock,
                    start=timeline.start,
                ),
                on_dispatch=progress.dispatched if one_by_one else None,  # a no-op where no bar is shown
            )
            close_start = timeline.clock()
        timeline.seconds["writing"] += timeline.clock() - close_start  # ffmpeg's flush and the rename
    sink.times = timeline.add_pipeline(sink.times)
    sink.frames += kept
    return sink


def _write_kept_video(plan, writer, timeline: Timeline) -> int:
    """--extend: the video being continued opens the output, streamed a few frames at a time
    (never held whole); returns its frame count."""
    keep = getattr(plan, "keep_video", None)
    if writer is None or keep is None:
        return 0
    from magi_jax.video_io import stream_video

    rt = plan.config.runtime
    frames = 0
    with timeline.phase("writing"):
        for part in stream_video(keep, rt.fps, rt.video_size_w, rt.video_size_h):
            writer.write(part)
            frames += len(part)
    return frames


class _Discard:
    """A writer that drops frames (the profile's warm-up pass)."""

    def write(self, frames):
        pass


def sampler_steps(config: MagiConfig, lay) -> int:
    """Steps (forwards over the window) the sampler runs for this layout: the step bar's total."""
    from magi_jax.sampler_plan import plan

    return sum(int(g.count) for stage in plan(config, lay) for g in stage.groups)
