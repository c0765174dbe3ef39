"""One generation, end to end: load the parts, encode the prompt, sample, decode, write.

The order keeps memory low, as upstream does: the text encoder runs first and is freed
before the DiT is loaded; the VAE encodes the prefix (I2V / V2V) before sampling and then
decodes each chunk the moment the sampler hands it out, appending its frames to the mp4.

Weights: the released upstream layout (`<load>/inference_weight[.fp8][.distill]/`, the VAE
folder, `<t5_pretrained>/t5-v1_1-xxl/`) is converted on the fly; a magi-jax checkpoint
written by convert_torch_weights.py is restored directly (found next to the upstream folder
as `<folder>.magi_jax`, or given as the path itself). Without weights (no config given)
the TINY variant runs with random weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import run_guard
from magi_jax.config import MagiConfig

ASSETS = Path(__file__).resolve().parent / "assets"


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _prefer_checkpoint(path: Path) -> Path:
    """`<path>.magi_jax` when convert_torch_weights.py wrote one, else `path`."""
    from magi_jax.checkpoint import CONVERTED_SUFFIX, is_checkpoint

    converted = path.with_name(path.name + CONVERTED_SUFFIX)
    return converted if is_checkpoint(converted) else path


def text_encoder(config: MagiConfig, random_weights: bool):
    """The T5 encoder: released weights from t5_pretrained, or a random tiny one."""
    import jax

    from magi_jax import t5

    if random_weights:
        cfg = dataclasses.replace(t5.TINY, d_model=config.model.caption_channels)
        model = t5.T5Encoder(cfg, jnp.float32, rngs=nnx.Rngs(0))
        return t5.TextEncoder(model, t5.Tokenizer(ASSETS / "tiny_spiece.model"))
    if not config.runtime.t5_pretrained:
        raise FileNotFoundError("runtime_config.t5_pretrained is empty; pass --t5_ckpt (the folder with t5-v1_1-xxl)")
    device = jax.devices("cpu")[0] if config.runtime.t5_device == "cpu" else None
    return t5.load_text_encoder(_prefer_checkpoint(Path(config.runtime.t5_pretrained)), jnp.float32, device)


def dit_model(config: MagiConfig, random_weights: bool, source: Path | None, mesh=None):
    """The DiT: released or converted weights read into their shardings on `mesh`, or random (TINY)."""
    from magi_jax.dit import DiT
    from magi_jax.dit_weights import load_dit

    if random_weights:
        return DiT(config.model, fp8_quant=config.engine.fp8_quant, distill=config.engine.distill, rngs=nnx.Rngs(0))
    return load_dit(_prefer_checkpoint(source), config, mesh)


def vae_model(config: MagiConfig, random_weights: bool):
    from magi_jax.vae import TINY
    from magi_jax.vae_tiling import TileConfig
    from magi_jax.vae_weights import load_vae, random_vae

    tiles = TileConfig.for_fps(config.runtime.fps)
    scale = config.runtime.scale_factor
    if random_weights:
        return random_vae(TINY, scale_factor=scale, tiles=tiles)
    if not config.runtime.vae_pretrained:
        raise FileNotFoundError("runtime_config.vae_pretrained is empty; pass --vae_ckpt (the released vae folder)")
    return load_vae(_prefer_checkpoint(Path(config.runtime.vae_pretrained)), scale_factor=scale, tiles=tiles)


def prefix_latents(plan, vae) -> np.ndarray | None:
    """I2V: the image's latent frame; V2V: the prefix video's latents (bf16, as upstream)."""
    if plan.image is not None:
        return vae.encode_image(plan.image)
    if plan.video is not None:
        return vae.encode_pixels(plan.video)
    return None


def run(plan) -> dict:
    """Generates plan.output; returns a summary (frames, seconds, ...)."""
    from tqdm import tqdm

    from magi_jax import sharding
    from magi_jax.sampler import Sampler
    from magi_jax.special_tokens import sampler_captions, token_table
    from magi_jax.video_io import VideoWriter

    cfg, m = plan.config, plan.config.model
    start = time.time()
    if plan.random_weights:
        _log(
            "note: no weights given - running the TINY variant with random weights, so the video is noise. "
            "For real videos pass --config_file 4.5B_distill (or another released config) with its weights "
            "downloaded, or --dit_ckpt/--vae_ckpt/--t5_ckpt (see README)."
        )

    _log(f"[1/4] encoding the prompt ({'random tiny T5' if plan.random_weights else cfg.runtime.t5_pretrained})")
    with text_encoder(cfg, plan.random_weights) as text:
        caption, mask = text.encode([plan.prompt], m.caption_max_length)

    mesh = None if plan.mesh is None else sharding.make_mesh(plan.mesh)
    _log("[2/4] loading the DiT and the VAE" + ("" if mesh is None else f", sharding over {dict(mesh.shape)}"))
    dit = dit_model(cfg, plan.random_weights, plan.dit_source, mesh)
    for path, scale in getattr(plan, "loras", ()):
        from magi_jax.lora import merge_lora

        _log(f"      merging LoRA adapter {path} at scale {scale}")
        merge_lora(dit, path, cfg, scale)
    vae = vae_model(cfg, plan.random_weights)
    prefix = prefix_latents(plan, vae)
    sampler = Sampler(dit, cfg, mesh=mesh)
    lay = sampler.layout(0 if prefix is None else prefix.shape[1])
    null = np.asarray(dit.y_embedder.null_caption[...], np.float32)[None]
    table = token_table(channels=m.caption_channels)
    y, y_mask = sampler_captions(
        caption[:, None], mask, null, lay.chunk_num, lay.clean_chunks, cfg.runtime, table, max_len=m.caption_max_length
    )

    chunks = lay.chunk_num - lay.clean_chunks
    _log(f"[3/4] sampling {chunks} chunks of {lay.chunk_width} latent frames, {cfg.runtime.num_steps} steps each")
    frames = 0
    writer_here = sharding.is_writer()  # on a pod every host samples its shards; process 0 writes
    interactive = sys.stderr.isatty() and writer_here
    output = VideoWriter(plan.output, cfg.runtime.fps) if writer_here else contextlib.nullcontext()
    bars = tqdm(total=chunks, desc="chunks", unit="chunk", file=sys.stderr, disable=None if writer_here else True)
    with output as writer, bars as bar:
        steps = tqdm(desc="steps", unit="step", file=sys.stderr, leave=False) if interactive else None
        if steps is not None:
            sampler.on_step = lambda: steps.update(1)
        for latents in sampler.chunks(y, y_mask, prefix=prefix):
            run_guard.check()  # a signal swallowed inside a gc callback stops the run here
            if writer is not None:
                video = vae.decode_latents(latents[0])
                writer.write(video)
                frames += len(video)
            bar.update(1)
        if steps is not None:
            steps.close()
    seconds = time.time() - start
    _log(f"[4/4] wrote {plan.output}: {frames} frames at {cfg.runtime.fps} fps in {seconds:.1f}s")
    return {"frames": frames, "seconds": seconds, "compilations": sampler.compilations}
