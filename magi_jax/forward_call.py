"""The typed description of one DiT forward call, shared by the sampler, guidance and the DiT.

A call runs R chunks of the latent video through the DiT for B guidance rows. Everything
the DiT needs to know besides its inputs (latents, captions) and the KV cache is here:

  which chunks    `first_chunk`: global index of the call's first chunk; its tokens start at
                  cache row first_chunk * N (N tokens per chunk)
  their times     `t` (R,) flow time per chunk (0 noise, 1 clean); `distill_dt` the distilled
                  model's step size (None for base models)
  key ranges      `kv_range` (R, 2): global token positions [start, end) each chunk's queries
                  see (cached chunks and chunks of this call)
  rope positions  `frame0`, `t_total` (R,): first token frame of each chunk and the frame
                  count the time axis is centred on (rope.py)
  the cache       `write_count`: tokens written from the first token on (0: none, traced so
                  a window shape compiles once); `rows.read_cache`, `rows.write_row`,
                  `rows.write_bound`, `window.cache_window` (static); `cache_slots`: the
                  rows of the KV ring the call reads and writes (kv_cache.CacheSlots,
                  planned by the sampler; None reads and writes by position)
  key span        `window.kv_span` (static): the widest kv_range of any chunk, the size of
                  the key slice attention reads per chunk (attention.py)
  guidance rows   `rows.drop_caption`: one entry per row; True takes the AdaLN token of the
                  dropped caption (null-caption rows); `cfg_scales` the 3-way mix weights
                  of each denoising chunk (looked up on the host by schedule.cfg_scales)

Static values (`Window`, `Rows`) are frozen dataclasses held as pytree metadata: they are
part of the jit cache key, so each distinct value compiles once and nothing static is traced.

The sampler plans every step as a `ForwardCall` (guidance.plan_call); guidance derives the
passes it runs from it (the unconditional pass, the near-clean copy) and hands each to the
DiT unchanged in kind.

Captions follow one layout end to end: `Captions.tokens` (B, R, L, Cc) and `.mask` (B, R, L),
row 0 the caption and row 1 the null caption as the sampler holds them for the whole video;
guidance picks rows and chunks, the DiT reads row b for guidance row b.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.kv_cache import CacheSlots

CAPTION_ROW, NULL_ROW = 0, 1


@dataclass(frozen=True)
class Window:
    """The static shape of a guided call: one compilation per value.

    chunks: R, chunks in x, the re-encoded clean chunk included;
    extra_clean_chunk: chunk 0 is a just-cleaned chunk run again (at clean time) only to
      refresh its cache rows (upstream's fwd_extra_1st_chunk);
    near_clean_copy: distilled models append a copy of the first denoising chunk, alone;
    cache_window: cache rows visible below the call's first token (None: all);
    kv_span: the widest key range the schedule gives one chunk, in tokens (None: every key):
      attention reads, per chunk, a slice of this many keys at its range's start;
    caption_block: cross-attention's key block in caption tokens on the xla path (None: one
      block over the call's caption). The sampler uses attention.CAPTION_MULTIPLE, so a chunk's
      result does not depend on how long the other chunks' captions are (a prompt change
      leaves the chunks it shares a window with bit-identical); training keeps one block, a
      loop it would differentiate through block by block.
    """

    chunks: int
    extra_clean_chunk: bool = False
    near_clean_copy: bool = False
    cache_window: int | None = None
    kv_span: int | None = None
    caption_block: int | None = None

    @property
    def denoising(self) -> int:
        return self.chunks - int(self.extra_clean_chunk)


@dataclass(frozen=True)
class Rows:
    """The guidance rows of a pass and how the pass uses the cache (static).

    drop_caption: per row, AdaLN from the dropped-caption token;
    read_cache: attend to cache rows below the first token;
    write_row: the row whose keys/values go to the cache (None: no write);
    write_bound: static bound on the tokens written (None: all the call's tokens).
    """

    drop_caption: tuple[bool, ...] = (False,)
    read_cache: bool = False
    write_row: int | None = None
    write_bound: int | None = None

    @property
    def count(self) -> int:
        return len(self.drop_caption)


@dataclass(frozen=True)
class ForwardCall:
    """One forward call (module docstring). Array fields may carry a leading step axis in
    the sampler's plan; the DiT takes them per call."""

    t: jax.Array  # (R,) float32
    kv_range: jax.Array  # (R, 2) int32
    frame0: jax.Array  # (R,) int32
    t_total: jax.Array  # (R,) int32
    first_chunk: jax.Array  # () int32
    write_count: jax.Array  # () int32
    distill_dt: jax.Array | None = None  # () float32
    cfg_scales: jax.Array | None = None  # (2, D) prev_chunk_scale, text_scale per denoising chunk (cfg 3)
    cache_slots: CacheSlots | None = None  # ring rows read (W,) and written (R,); None: row = position
    window: Window = Window(1)
    rows: Rows = Rows()

    @property
    def chunks(self) -> int:
        return self.t.shape[-1]

    def replace(self, **changes) -> ForwardCall:
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    ForwardCall,
    data_fields=[
        "t",
        "kv_range",
        "frame0",
        "t_total",
        "first_chunk",
        "write_count",
        "distill_dt",
        "cfg_scales",
        "cache_slots",
    ],
    meta_fields=["window", "rows"],
)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Captions:
    """Captions per guidance row and chunk: tokens (B, R, L, Cc), mask (B, R, L) (1 = token)."""

    tokens: jax.Array
    mask: jax.Array

    def row(self, *rows: int) -> Captions:
        """The given guidance rows, in that order."""
        if rows == tuple(range(rows[0], rows[0] + len(rows))):
            pick = slice(rows[0], rows[0] + len(rows))  # a plain slice when it is one
        else:
            pick = np.asarray(rows)
        return Captions(self.tokens[pick], self.mask[pick])

    def chunks(self, start: int, stop: int | None = None) -> Captions:
        return Captions(self.tokens[:, start:stop], self.mask[:, start:stop])

    def leading(self, tokens: int) -> Captions:
        """The first `tokens` caption tokens of every row and chunk (attention.used_caption_tokens
        says how many any chunk reads)."""
        return Captions(self.tokens[:, :, :tokens], self.mask[:, :, :tokens])

    def concat(self, other: Captions) -> Captions:
        """Chunks of `other` after ours."""
        return Captions(
            jnp.concatenate([self.tokens, other.tokens.astype(self.tokens.dtype)], axis=1),
            jnp.concatenate([self.mask, other.mask.astype(self.mask.dtype)], axis=1),
        )
