"""Synthetic training clips for the TINY model: a Gaussian blob moving across the latent frame.

Each clip is one motion (a direction); latent channels are a fixed random mix of the blob, so
the data is low-dimensional and a TINY model can memorise it in a bounded number of steps.
Captions go through special_tokens.caption_side, the format the data pipeline and the
sampler use.
"""

import numpy as np

from magi_jax.config import MagiConfig
from magi_jax.objective import Clip
from magi_jax.special_tokens import caption_side, sampler_captions, token_table


def blob_latents(config: MagiConfig, angle: float, offset=(0.0, 0.0), speed: float = 0.5) -> np.ndarray:
    """(C, T, h, w) float32: a blob starting near the centre (+offset), moving along `angle`."""
    m, rt = config.model, config.runtime
    frames = rt.num_frames // rt.temporal_downsample_factor
    h, w = rt.latent_hw
    t = np.arange(frames)[:, None, None]
    y, x = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    cy = (h - 1) / 2 + offset[0] + speed * t * np.sin(angle)
    cx = (w - 1) / 2 + offset[1] + speed * t * np.cos(angle)
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 4.0)
    mix = np.random.default_rng(7).standard_normal((m.latent_channels, 1, 1, 1))
    lat = mix * (2 * blob - 0.5)
    return (lat / 0.6).astype(np.float32)


def caption_embedding(config: MagiConfig, seed: int, tokens: int = 8):
    """A raw 'T5 output' (1, 1, L, Cc) with its mask (1, L)."""
    m = config.model
    rng = np.random.default_rng(1000 + seed)
    emb = np.zeros((1, 1, m.caption_max_length, m.caption_channels), np.float32)
    emb[0, 0, :tokens] = rng.standard_normal((tokens, m.caption_channels))
    mask = (np.arange(m.caption_max_length) < tokens).astype(np.float32)[None]
    return emb, mask


def clips(config: MagiConfig, latents: list, caption_seeds: list) -> Clip:
    """A batch of clips with per-chunk captions as the data pipeline builds them."""
    rt, m = config.runtime, config.model
    chunks = latents[0].shape[1] // rt.chunk_width
    table = token_table(channels=m.caption_channels)
    null = np.zeros((1, m.caption_max_length, m.caption_channels), np.float32)
    caps, masks = [], []
    for s in caption_seeds:
        emb, mask = caption_embedding(config, s)
        c, k = caption_side(emb, mask, null, chunks, 0, rt, table, max_len=m.caption_max_length)
        caps.append(c[0])
        masks.append(k[0])
    return Clip(np.stack(latents), np.stack(caps).astype(np.float32), np.stack(masks).astype(np.float32))


def sampling_captions(config: MagiConfig, model, seed: int):
    """(2, chunks, L, Cc) caption / null-caption rows for Sampler.chunks, as generate builds them."""
    from magi_jax.sampler_plan import layout

    m = config.model
    lay = layout(config)
    emb, mask = caption_embedding(config, seed)
    null = np.asarray(model.y_embedder.null_caption[...], np.float32)[None]
    table = token_table(channels=m.caption_channels)
    return sampler_captions(emb, mask, null, lay.chunk_num, 0, config.runtime, table, max_len=m.caption_max_length)


# The tiny variant's geometry (patch, latent channels, latent grid: what its VAE and sampler
# lay out) at a width far below the bundled model's (configs/tiny.json: 4 layers of 256).
# Tests of training, sampling and sharding mechanics need no capacity; at this width they
# run at about a thirtieth of the bundled DiT's FLOPs.
MECHANICS = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=16
)


def mechanics_config(model=None, **sections) -> MagiConfig:
    """load_config("tiny") at the MECHANICS width, with `model` fields and other sections changed."""
    from magi_jax.config import load_config

    return load_config("tiny").replace(model={**MECHANICS, **(model or {})}, **sections)
