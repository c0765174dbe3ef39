"""MAGI-1's special tokens and the per-chunk captions the sampler reads.

MAGI-1 was trained with learned "special token" embeddings prepended to the T5 caption:
quality (HQ), first-frame dynamics (static / dynamic), borderness, 3-D / 2-D anime style,
and a duration token saying how many chunks remain after this one (so each chunk gets its
own caption). Which tokens are prepended is configured by runtime flags (`pad_hq`,
`pad_duration`, ... in RuntimeConfig; upstream reads them from the environment variables
PAD_HQ, PAD_DURATION, PAD_STATIC, PAD_DYNAMIC, PAD_BORDERNESS, PAD_THREE_D_MODEL,
PAD_TWO_D_ANIME and NEG_PROMPT, which `MagiConfig.apply_env()` maps onto them).

Prepending works token by token in a fixed flag order, each time truncating back to the
maximum length, so the last token in the order ends up first: the released flags give
[DURATION, HQ, caption...]. The mask gains a leading one per token (and becomes float, as
upstream's concatenation promotes it). Clean prefix chunks get the learned null caption
with an all-zero mask; the null (unconditional) side is the null caption, optionally with
negative tokens prepended, and a mask with its first 50 tokens set (hard-coded upstream).
Token values are rounded to float16 when loaded, as upstream does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from magi_jax.config import RuntimeConfig

TOKENS_FILE = Path(__file__).resolve().parent / "assets" / "special_tokens.npz"
MAX_TOKENS = 800  # upstream truncates to this after each prepend
NULL_CAPTION_TOKENS = 50  # the null caption's mask covers its first 50 tokens
DURATION_CAP = 8  # DURATION_TOKEN_k for k chunks remaining, k capped at 8

# token name -> (array in the npz, row)
TOKEN_ROWS = {
    "CAPTION_TOKEN": ("caption_token", 0),
    "LOGO_TOKEN": ("logo_token", 0),
    "TRANS_TOKEN": ("other_tokens", 0),
    "HQ_TOKEN": ("other_tokens", 1),
    "STATIC_FIRST_FRAMES_TOKEN": ("other_tokens", 2),
    "DYNAMIC_FIRST_FRAMES_TOKEN": ("other_tokens", 3),
    "BORDERNESS_TOKEN": ("other_tokens", 4),
    "THREE_D_MODEL_TOKEN": ("other_tokens", 15),
    "TWO_D_ANIME_TOKEN": ("other_tokens", 16),
    **{f"DURATION_TOKEN_{k}": ("other_tokens", 6 + k) for k in range(1, DURATION_CAP + 1)},
}
# runtime flag -> token, in upstream's prepend order
FLAG_ORDER = (
    ("pad_static", "STATIC_FIRST_FRAMES_TOKEN"),
    ("pad_dynamic", "DYNAMIC_FIRST_FRAMES_TOKEN"),
    ("pad_borderness", "BORDERNESS_TOKEN"),
    ("pad_hq", "HQ_TOKEN"),
    ("pad_three_d_model", "THREE_D_MODEL_TOKEN"),
    ("pad_two_d_anime", "TWO_D_ANIME_TOKEN"),
)
NEGATIVE_TOKENS = ("CAPTION_TOKEN", "LOGO_TOKEN", "TRANS_TOKEN", "BORDERNESS_TOKEN")


@functools.cache
def _npz(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def token_table(source=None, channels: int | None = None) -> dict[str, np.ndarray]:
    """name -> embedding (D,) float32 holding float16-rounded values (the first `channels` dims).

    `source`: an npz path (default: the released tokens shipped in the package) or a mapping
    with its arrays (caption_token, logo_token, other_tokens).
    """
    arrays = source if isinstance(source, dict) else _npz(str(source or TOKENS_FILE))
    table = {}
    for name, (array, row) in TOKEN_ROWS.items():
        vec = arrays[array][row]
        if channels is not None:
            vec = vec[:channels]
        table[name] = vec.astype(np.float16).astype(np.float32)
    return table


def caption_token_keys(rt: RuntimeConfig) -> list[str]:
    """Tokens prepended to the caption, in prepend order ("DURATION_TOKEN" = per-chunk token)."""
    keys = [token for flag, token in FLAG_ORDER if getattr(rt, flag)]
    if rt.pad_duration:
        keys.append("DURATION_TOKEN")
    return keys


def negative_token_keys(rt: RuntimeConfig) -> list[str]:
    return list(NEGATIVE_TOKENS) if rt.neg_prompt else []


def _prepend(token, embs, masks, max_len):
    """token (D,) or per chunk (C, D) in front of embs (N, C, L, D); masks (N, C, L) or None."""
    n, c, _, d = embs.shape
    tok = np.broadcast_to(np.asarray(token, embs.dtype).reshape(-1, 1, d), (c, 1, d))
    embs = np.concatenate([np.broadcast_to(tok[None], (n, c, 1, d)), embs], axis=2)[:, :, :max_len]
    if masks is not None:
        masks = np.asarray(masks)
        if not np.issubdtype(masks.dtype, np.floating):  # upstream's concat promotes to the embeddings' dtype
            masks = masks.astype(embs.dtype)
        masks = np.concatenate([np.ones((n, c, 1), masks.dtype), masks], axis=2)[:, :, :max_len]
    return embs, masks


def pad_special_tokens(keys, embs, masks, table, max_len: int = MAX_TOKENS, remaining=None):
    """Prepends each token of `keys` in order to every chunk's caption (upstream's rule).

    `remaining`: chunks left after each chunk of `embs` (the duration token); by default the
    chunks of `embs` are the whole run."""
    for key in keys:
        if key == "DURATION_TOKEN":
            c = embs.shape[1]
            left = range(c - 1, -1, -1) if remaining is None else remaining
            per_chunk = np.stack([table[f"DURATION_TOKEN_{min(k, DURATION_CAP - 1) + 1}"] for k in left])
            embs, masks = _prepend(per_chunk, embs, masks, max_len)
        else:
            embs, masks = _prepend(table[key], embs, masks, max_len)
    return embs, masks


def caption_side(caption, mask, null_caption, chunk_num, clean_chunks, rt, table, max_len=MAX_TOKENS):
    """Row 0 of the sampler's captions: (1, chunk_num, L, D) embeddings and masks.

    caption (1, 1, L, D) and mask (1, L) from the text encoder, repeated for every denoised
    chunk, or one caption per denoised chunk: (1, denoised, L, D) and (1, denoised, L);
    null_caption (1, L', D) the DiT's learned null caption (used for the clean prefix chunks,
    with a zero mask).
    """
    denoised = chunk_num - clean_chunks
    caption, mask = np.asarray(caption), np.asarray(mask)
    if mask.ndim == 2:  # one caption for the whole run
        embs, masks = np.repeat(caption, denoised, axis=1), np.repeat(mask[:, None], denoised, axis=1)
    elif caption.shape[1] == mask.shape[1] == denoised:
        embs, masks = caption, mask
    else:
        raise ValueError(f"{caption.shape[1]} per-chunk captions for {denoised} denoised chunks")
    embs, masks = pad_special_tokens(caption_token_keys(rt), embs, masks, table, max_len)
    null = np.repeat(np.asarray(null_caption, embs.dtype)[:, None], clean_chunks, axis=1)
    embs = np.concatenate([null, embs], axis=1)
    masks = np.concatenate([np.zeros((1, clean_chunks, masks.shape[2]), masks.dtype), masks], axis=1)
    return embs, masks


def null_side(null_caption, null_mask, chunk_num, rt, table, max_len=MAX_TOKENS):
    """Row 1: the null caption for every chunk (negative tokens prepended when enabled);
    null_mask (1, chunk_num, L) gives shape and dtype, its first 50 tokens are set."""
    embs = np.repeat(np.asarray(null_caption)[:, None], chunk_num, axis=1)
    keys = negative_token_keys(rt)
    if keys:
        embs, _ = pad_special_tokens(keys, embs, None, table, max_len)
    masks = np.zeros_like(np.asarray(null_mask))
    masks[:, :, :NULL_CAPTION_TOKENS] = 1
    return embs, masks


def sampler_captions(caption, mask, null_caption, chunk_num, clean_chunks, rt, table, max_len=MAX_TOKENS):
    """The (2, chunk_num, L, D) captions and (2, chunk_num, L) masks the sampler reads.

    An empty prompt (all-zero mask) uses the null side for both rows, as upstream does.
    """
    cap_e, cap_m = caption_side(caption, mask, null_caption, chunk_num, clean_chunks, rt, table, max_len)
    null_e, null_m = null_side(null_caption, np.zeros_like(cap_m), chunk_num, rt, table, max_len)
    if np.asarray(mask).sum() == 0:
        cap_e, cap_m = null_e, null_m
    if cap_e.shape[2] != null_e.shape[2]:
        raise ValueError(
            f"caption has {cap_e.shape[2]} tokens after special tokens but the null caption has "
            f"{null_e.shape[2]}; encode prompts to {null_e.shape[2]} tokens (model caption_max_length)"
        )
    return np.concatenate([cap_e, null_e]).astype(np.float32), np.concatenate([cap_m, null_m]).astype(np.float32)
