"""Training data: videos with captions -> cached latents and text embeddings -> batches.

    python -m magi_jax.train_data --videos clips/ --out data/ --config_file 4.5B_base \
        --vae_ckpt VAE --t5_ckpt T5 [--num_frames 96 --size 480x832 --fps 24]

Input: a folder of `name.mp4` with a caption in `name.txt` beside each, or a JSONL file of
{"video": path, "caption": text} lines (paths relative to the file); there "caption" may
also be a list with one caption per chunk (MAGI-1 reads a caption per chunk: say what each
chunk shows). Each video is read once (the first `num_frames` frames at `fps`, resized to
the training size with upstream's ffmpeg filters), encoded by the VAE (tiled, times
scale_factor, as the generate command encodes a prefix) and its captions by T5, and stored
as one npz shard per clip:
  latents          (C, T, h, w) float16
  caption          (n, Cc) float16, the caption's n valid T5 tokens (the padding is not
                   stored); per-chunk captions are stored one after another, with
  caption_lengths  (chunks,) int32, each chunk caption's token count
A video that cannot be read, is too short or has no caption is reported by name and
skipped; `skipped.txt` lists them. Shards are written under a temporary name and renamed,
and `index.jsonl` (one line per clip) plus `meta.json` are written at the end.

Streaming (`ClipData`): the batch of step s is a function of (seed, s) only - epoch e of
the data is a seeded permutation - so a resumed run sees exactly the batches it would have.
Captions get the same special tokens (quality, duration per chunk) the sampler prepends at
inference (special_tokens.caption_side), so a fine-tune learns the prompt format it will be
used with.

Prefixes (`ClipData(..., prefixes=True)`): each step's clips are cut to their first k
chunks, k drawn per step from 1..R (seeded), with the captions a k-chunk video gets. The
duration token counts the chunks left in the video, so on whole clips a short generation's
first chunk would read the token of a late chunk of a long clip (a rolling ball that has
already bounced back, say); a cut clip is exactly the k-chunk video the sampler makes, since
attention is block-causal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magi_jax.config import MagiConfig

INDEX = "index.jsonl"
META = "meta.json"
SKIPPED = "skipped.txt"
CACHED_CLIPS = 64


class DataError(ValueError):
    """A dataset that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Source:
    name: str
    video: Path
    caption: str | tuple[str, ...] | None  # one per chunk when a tuple; None: caption missing


def find_sources(videos) -> list[Source]:
    """Videos and captions from a folder (name.mp4 + name.txt) or a JSONL file."""
    path = Path(videos)
    if path.is_dir():
        out = []
        for v in sorted(path.glob("*.mp4")):
            txt = v.with_suffix(".txt")
            out.append(Source(v.stem, v, txt.read_text().strip() if txt.exists() else None))
        if not out:
            raise DataError(f"{path} holds no .mp4 files; put name.mp4 with name.txt (its caption) there")
        return out
    if path.is_file():
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                video = Path(row["video"])
                caption = row.get("caption")
                if isinstance(caption, list):
                    caption = tuple(c.strip() for c in caption)
                    caption = caption if caption and all(caption) else None
                else:
                    caption = (caption or "").strip() or None
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise DataError(
                    f'{path}:{n}: expected {{"video": path, "caption": text or [text per chunk]}}'
                ) from None
            video = video if video.is_absolute() else path.parent / video
            out.append(Source(video.stem, video, caption))
        if not out:
            raise DataError(f"{path} lists no videos")
        return out
    raise DataError(f"--videos {videos}: no such folder or JSONL file")


def _write_npz(path: Path, **arrays):
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)


def prepare(sources, out, config: MagiConfig, vae, text, progress: bool = True) -> dict:
    """Encodes every usable source into `out`; returns {"clips": n, "skipped": [(name, why)]}.

    `vae` (vae_runtime.Vae) and `text` (t5.TextEncoder) are loaded by the caller; frames, size and fps
    come from config.runtime (num_frames, video_size_h/w, fps)."""
    from magi_jax.video_io import MediaError, read_video

    rt = config.runtime
    chunks = rt.num_frames // (rt.temporal_downsample_factor * rt.chunk_width)
    skipped = []

    def videos():
        for src in sources:
            try:
                if src.caption is None:
                    raise DataError("no caption (name.txt beside the video, or a caption in the JSONL)")
                if isinstance(src.caption, tuple) and len(src.caption) != chunks:
                    raise DataError(
                        f"{len(src.caption)} per-chunk captions for {chunks} chunks ({rt.num_frames} frames); "
                        f"give one caption or {chunks}"
                    )
                video = read_video(src.video, rt.fps, rt.video_size_w, rt.video_size_h, prefix_frames=rt.num_frames)
                if len(video) < rt.num_frames:
                    raise DataError(f"{len(video)} frames at {rt.fps} fps, {rt.num_frames} needed")
            except (DataError, MediaError, OSError, ValueError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"skipped {src.video}: {reason}", file=sys.stderr)
                skipped.append((str(src.video), reason))
                continue
            yield src.name, src.caption, video

    clips = write_dataset(videos(), out, config, vae, text, len(sources), progress)
    if not clips:
        raise DataError(f"none of the {len(sources)} videos could be used (see the reasons above)")
    (Path(out) / SKIPPED).write_text("".join(f"{v}\t{why}\n" for v, why in skipped))
    return {"clips": clips, "skipped": skipped}


def write_dataset(items, out, config: MagiConfig, vae, text, total: int | None = None, progress: bool = True) -> int:
    """Encodes (name, caption, frames (T, H, W, 3) uint8) items into the dataset folder `out`
    (one npz shard per clip, then index and meta); returns the number of clips. `caption` is
    a string, or a sequence of one string per chunk. Each caption's embedding is computed once."""
    from tqdm import tqdm

    m = config.model
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    index, captions, shape = [], {}, None
    for name, caption, video in tqdm(
        items, desc="encoding", unit="video", total=total, file=sys.stderr, disable=None if progress else True
    ):
        latents = vae.encode_pixels(video).astype(np.float32)
        per_chunk = not isinstance(caption, str)
        texts = list(caption) if per_chunk else [caption]
        for t in texts:
            if t not in captions:
                emb, mask = text.encode([t], m.caption_max_length)
                captions[t] = np.asarray(emb[0, : int(np.asarray(mask[0]).sum())], np.float16)
        arrays = {"latents": latents.astype(np.float16), "caption": np.concatenate([captions[t] for t in texts])}
        if per_chunk:
            arrays["caption_lengths"] = np.asarray([len(captions[t]) for t in texts], np.int32)
        file = f"clips/{len(index):06d}.npz"
        _write_npz(out / file, **arrays)
        index.append(
            {"name": name, "file": file, "caption": texts if per_chunk else caption, "frames": int(latents.shape[1])}
        )
        shape = shape or list(latents.shape)  # the first clip's, as meta records it
    if index:
        meta = {
            "clips": len(index),
            "latent_shape": shape,
            "caption_channels": m.caption_channels,
            "fps": config.runtime.fps,
        }
        (out / INDEX).write_text("".join(json.dumps(r) + "\n" for r in index))
        (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return len(index)


class ClipData:
    """Batches of prepared clips: `batch(step, size)` -> objective.Clip of host arrays."""

    def __init__(self, folder, config: MagiConfig, seed: int = 0, prefixes: bool = False):
        from magi_jax.special_tokens import token_table

        self.folder = Path(folder)
        if not (self.folder / INDEX).exists() or not (self.folder / META).exists():
            raise DataError(f"{folder} is not a prepared dataset (no {INDEX}); run python -m magi_jax.train_data")
        self.items = [json.loads(line) for line in (self.folder / INDEX).read_text().splitlines() if line.strip()]
        meta = json.loads((self.folder / META).read_text())
        self.config, self.seed, self.prefixes = config, seed, prefixes
        m, rt = config.model, config.runtime
        c, t = meta["latent_shape"][:2]
        if c != m.latent_channels or meta["caption_channels"] != m.caption_channels:
            raise DataError(
                f"{folder} was prepared for {c} latent / {meta['caption_channels']} caption channels, the model "
                f"takes {m.latent_channels} / {m.caption_channels}; prepare it with this model's VAE and T5"
            )
        if t % rt.chunk_width:
            raise DataError(
                f"clips have {t} latent frames, not a multiple of chunk_width {rt.chunk_width}; prepare with "
                f"--num_frames a multiple of {rt.chunk_width * rt.temporal_downsample_factor}"
            )
        self.chunks = t // rt.chunk_width
        self.table = token_table(channels=m.caption_channels)
        self._cache: dict[int, tuple] = {}

    def __len__(self):
        return len(self.items)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def indices(self, step: int, size: int) -> list[int]:
        n = len(self.items)
        out = []
        for g in range(step * size, (step + 1) * size):
            out.append(int(self.order(g // n)[g % n]))
        return out

    def _load(self, i: int):
        """(latents, caption tokens (1, n, L, Cc), masks) of item i, cached; n is 1 (one caption
        for every chunk) or R (one per chunk)."""
        if i not in self._cache:
            m = self.config.model
            with np.load(self.folder / self.items[i]["file"]) as z:
                latents, tokens = z["latents"].astype(np.float32), z["caption"].astype(np.float32)
                lengths = z["caption_lengths"] if "caption_lengths" in z else None
            length = m.caption_max_length
            if lengths is None:
                pieces = [tokens]
            elif len(lengths) == self.chunks:
                pieces = np.split(tokens, np.cumsum(lengths)[:-1])
            else:
                raise DataError(
                    f"{self.items[i]['file']} has {len(lengths)} per-chunk captions for {self.chunks} chunks; "
                    "prepare the dataset again"
                )
            emb = np.zeros((1, len(pieces), length, m.caption_channels), np.float32)
            mask = np.zeros((1, len(pieces), length), np.float32)
            for k, piece in enumerate(pieces):
                n = min(len(piece), length)
                emb[0, k, :n], mask[0, k, :n] = piece[:n], 1
            if len(self._cache) >= CACHED_CLIPS:  # streamed: only the most recent clips stay in memory
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = (latents, emb, mask, lengths is not None)
        return self._cache[i]

    def clip(self, i: int, chunks: int | None = None):
        """(latents (C, T, h, w), caption (R, L, Cc), mask (R, L)) float32 for item i, or for
        its first `chunks` chunks as a video of that length."""
        from magi_jax.special_tokens import caption_side

        m, rt = self.config.model, self.config.runtime
        k = chunks or self.chunks
        latents, emb, mask, per_chunk = self._load(i)
        if per_chunk:
            emb, mask = emb[:, :k], mask[:, :k]
        else:  # one caption, repeated for every chunk by caption_side
            mask = mask[:, 0]
        null = np.zeros((1, m.caption_max_length, m.caption_channels), np.float32)  # no clean chunks: unused
        cap, cmask = caption_side(emb, mask, null, k, 0, rt, self.table, max_len=m.caption_max_length)
        return latents[:, : k * rt.chunk_width], cap[0].astype(np.float32), cmask[0].astype(np.float32)

    def chunks_at(self, step: int) -> int:
        """Chunks of each clip of step `step`: all of them, or with `prefixes` a seeded 1..R."""
        if not self.prefixes:
            return self.chunks
        # stream (seed + 7, step): apart from the epoch permutations' (seed, epoch)
        return int(np.random.default_rng([self.seed + 7, step]).integers(1, self.chunks + 1))

    def batch(self, step: int, size: int):
        from magi_jax.objective import Clip

        k = self.chunks_at(step)
        rows = [self.clip(i, k) for i in self.indices(step, size)]
        return Clip(*(np.stack([r[j] for r in rows]) for j in range(3)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_jax.train_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", required=True, help="folder of name.mp4 + name.txt, or a JSONL file")
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--config_file", default=None, help="variant or JSON (default: tiny with random VAE/T5)")
    ap.add_argument("--vae_ckpt", default=None)
    ap.add_argument("--t5_ckpt", default=None)
    ap.add_argument("--num_frames", type=int, default=None, help="frames per clip (a multiple of 4 * chunk_width)")
    ap.add_argument("--size", default=None, help="HEIGHTxWIDTH, multiples of the VAE factor x the DiT patch (16)")
    ap.add_argument("--fps", type=int, default=None)
    args = ap.parse_args(argv)

    from magi_jax.config import ConfigError, load_config, parse_size
    from magi_jax.pipeline import default_weights, text_encoder, vae_model
    from magi_jax.sampler_plan import layout

    try:
        config = load_config(args.config_file or "tiny")
        runtime = {}
        if args.num_frames:
            runtime["num_frames"] = args.num_frames
        if args.fps:
            runtime["fps"] = args.fps
        if args.size:
            runtime["video_size_h"], runtime["video_size_w"] = parse_size(args.size)
        if args.vae_ckpt:
            runtime["vae_pretrained"] = args.vae_ckpt
        if args.t5_ckpt:
            runtime["t5_pretrained"] = args.t5_ckpt
        config = config.replace(runtime=runtime)
        rt = config.runtime
        step = rt.chunk_width * rt.temporal_downsample_factor
        layout(config)  # the sampler's size rules (VAE factor x patch), with the size to use
        if rt.num_frames % step:
            raise DataError(f"--num_frames must be a multiple of {step} (whole chunks)")
        sources = find_sources(args.videos)
        # the generate command's rule: the tiny variant encodes with its bundled VAE and T5
        config, random = default_weights(config, args.config_file, bool(args.vae_ckpt or args.t5_ckpt))
        if random:
            print("note: no weights given - tiny random VAE and T5 (a smoke test)", file=sys.stderr)
        vae = vae_model(config, random)
        with text_encoder(config, random) as text:
            result = prepare(sources, args.out, config, vae, text)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['clips']} clips to {args.out}; skipped {len(result['skipped'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
