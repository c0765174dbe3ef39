"""A prompt timeline: the story changes mid-video, chunk by chunk.

MAGI-1 gives every chunk its own caption (upstream only ever repeats one prompt). A
timeline is a list of segments `(start seconds, prompt)`; each chunk gets the caption of
the segment its first generated frame falls in, with upstream's special tokens (the
duration token still counts the chunks left in the run). Earlier chunks never see a later
prompt: clean chunks enter the KV cache under the null caption, so switching prompts needs
no re-encoding of the past, and a change leaves every chunk that started before it as it
would have been without the change.

Sources of prompts:
  * the command line: `--prompt "a cat sleeps" --prompt "3s: the cat wakes up"` (a prompt
    without a time starts at 0s; times are `3`, `2.5s`, `1m30s`), or `--prompt_file` with
    one `TIME: text` line per segment (blank lines and `#` comments skipped);
  * the Python API: a string, a list of (start, prompt), or a callable
    `prompt(chunk, seconds) -> str` asked when each chunk enters the sampler's window (for
    interactive use: the caller may change its answer while the video streams).

A bad timeline (times out of order, negative, past the video's end, empty text) is one
TimelineError naming the line, raised before any model is loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magi_jax import special_tokens

PromptFn = Callable[[int, float], str]
LIVE_PROMPTS_KEPT = 8  # encodings a callable source keeps (each is L x Cc floats: 13 MB for the XXL T5)

# "3", "2.5s", "1m30s", "2m" followed by a colon
_TIME = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*m\s*)?(?:(\d+(?:\.\d+)?)\s*s?)?\s*:\s?(.*)$", re.S)


class TimelineError(ValueError):
    """A timeline that cannot be used; the message names the entry and the fix."""


@dataclass(frozen=True)
class Segment:
    start: float  # seconds into the generated video
    prompt: str


def parse_time_prefix(text: str) -> tuple[float | None, str]:
    """'3s: text' -> (3.0, 'text'); text without a leading time -> (None, text)."""
    match = _TIME.match(text)
    if match is None or (match.group(1) is None and match.group(2) is None):
        return None, text.strip()
    minutes, seconds, rest = match.groups()
    return float(minutes or 0) * 60 + float(seconds or 0), rest.strip()


def parse_entries(entries: Sequence[str], where: Sequence[str] | None = None) -> list[Segment]:
    """Segments from `TIME: text` entries; the first may omit its time (it starts at 0s).

    `where` names each entry in errors (a file's line numbers; default '--prompt #n')."""
    where = where or [f"--prompt #{i + 1}" for i in range(len(entries))]
    segments = []
    for i, (text, name) in enumerate(zip(entries, where)):
        start, prompt = parse_time_prefix(text)
        if start is None:
            if i:
                raise TimelineError(
                    f"{name} ({text!r}) has no start time; write it as 'SECONDS: text' (e.g. '3s: {text.strip()}'), "
                    "only the first prompt may omit it"
                )
            start = 0.0
        segments.append(Segment(start, prompt))
    return check(segments, where=where)


def read_prompt_file(path) -> list[Segment]:
    """A story file: one `TIME: text` per line; blank lines and lines starting with # skipped."""
    p = Path(path)
    if not p.is_file():
        raise TimelineError(f"--prompt_file {p} does not exist (check the path)")
    lines, where = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
            where.append(f"{p.name} line {n}")
    if not lines:
        raise TimelineError(f"--prompt_file {p} holds no prompt; write one 'TIME: text' per line")
    return parse_entries(lines, where)


def check(segments: Sequence, duration: float | None = None, where: Sequence[str] | None = None) -> list[Segment]:
    """Validates (start, prompt) pairs; `duration` (seconds) bounds the start times when known."""
    segs = [s if isinstance(s, Segment) else Segment(float(s[0]), str(s[1])) for s in segments]
    where = where or [f"segment {i + 1}" for i in range(len(segs))]
    if not segs:
        raise TimelineError("the prompt timeline is empty; give at least one prompt")
    for i, (seg, name) in enumerate(zip(segs, where)):
        if not seg.prompt.strip():
            raise TimelineError(f"{name} at {seg.start:g}s has no text; describe what happens from then on")
        if not math.isfinite(seg.start) or seg.start < 0:
            raise TimelineError(f"{name} starts at {seg.start:g}s; start times must be 0 or more seconds")
        if i == 0 and seg.start != 0:
            raise TimelineError(
                f"{name} starts at {seg.start:g}s, so nothing describes the video before it; start the first prompt "
                "at 0s (or give it without a time)"
            )
        if i and seg.start <= segs[i - 1].start:
            raise TimelineError(
                f"{name} starts at {seg.start:g}s, not after the previous prompt ({segs[i - 1].start:g}s); "
                "list prompts in order of their start times"
            )
        if duration is not None and seg.start >= duration:
            raise TimelineError(
                f"{name} starts at {seg.start:g}s, past the video's end ({duration:g}s); "
                "generate a longer video (--num_frames / --duration) or move the prompt earlier"
            )
    return segs


def prompt_at(segments: Sequence[Segment], seconds: float) -> str:
    """The prompt of the segment `seconds` falls in."""
    starts = [s.start for s in segments]
    return segments[max(0, int(np.searchsorted(starts, seconds + 1e-9, side="right")) - 1)].prompt


def chunk_seconds(chunk: int, chunk_width: int, prefix_frames: int, temporal_factor: int, fps: int) -> float:
    """When the chunk's first generated frame plays in the output video.

    The output starts after a video prefix (V2V) but includes the conditioning image's
    frame (I2V, one prefix latent frame), as the sampler hands chunks out."""
    first_out = 0 if prefix_frames == 1 else prefix_frames
    latent = max(chunk * chunk_width, first_out) - first_out
    return latent * temporal_factor / fps


def as_prompt_fn(source) -> tuple[PromptFn, list[Segment] | None]:
    """A prompt source (string, segments, (start, prompt) pairs or callable) as a function of
    (chunk, seconds), with the checked segments when the source is a fixed timeline."""
    if callable(source):
        return source, None
    segments = check([(0.0, source)] if isinstance(source, str) else source)
    return (lambda chunk, seconds: prompt_at(segments, seconds)), segments


class ChunkCaptions:
    """Per-chunk sampler captions from a prompt source: `captions(chunk)` -> caption (2, L, Cc)
    and mask (2, L), row 0 the chunk's caption, row 1 the null caption - the rows of
    special_tokens.sampler_captions for that chunk. Each distinct prompt is encoded once.

    encode(prompts) -> (embeddings (N, L, Cc), masks (N, L)), e.g. a TextEncoder's encode at
    the DiT's caption length; null_caption (1, L, Cc) the DiT's learned null caption.
    `asked` records (chunk, seconds, prompt) for every chunk, in the order chunks started.
    """

    def __init__(self, source, encode, null_caption, runtime, table, max_len, chunk_num, prefix_frames=0):
        self.prompt, self.segments = as_prompt_fn(source)
        self._encode, self._rt, self._table, self._max_len = encode, runtime, table, max_len
        self._null = np.asarray(null_caption, np.float32)
        self.chunk_num, self.prefix_frames = chunk_num, prefix_frames
        self.clean_chunks = prefix_frames // runtime.chunk_width
        self._encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.asked: list[tuple[int, float, str]] = []
        null_e, null_m = special_tokens.null_side(
            self._null, np.zeros((1, 1, max_len), np.float32), 1, runtime, table, max_len
        )
        self._null_rows = null_e[0, 0].astype(np.float32), null_m[0, 0].astype(np.float32)

    def encode_all(self):
        """Encodes every prompt of a fixed timeline now (so the text encoder can be freed)."""
        for seg in self.segments or ():
            self._embedding(seg.prompt)

    def _embedding(self, prompt: str):
        if prompt not in self._encoded:
            emb, mask = self._encode([prompt])
            self._encoded[prompt] = np.asarray(emb[:1], np.float32), np.asarray(mask[:1])
            if self.segments is None and len(self._encoded) > LIVE_PROMPTS_KEPT:  # a live source: keep recent ones
                self._encoded.pop(next(iter(self._encoded)))
        self._encoded[prompt] = self._encoded.pop(prompt)  # most recently used last
        return self._encoded[prompt]

    def seconds(self, chunk: int) -> float:
        rt = self._rt
        return chunk_seconds(chunk, rt.chunk_width, self.prefix_frames, rt.temporal_downsample_factor, rt.fps)

    def __call__(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        null_e, null_m = self._null_rows
        if chunk < self.clean_chunks:  # clean prefix chunks: the null caption, zero mask
            cap = self._null[0].astype(np.float32)
            return np.stack([cap, null_e]), np.stack([np.zeros_like(null_m), null_m])
        seconds = self.seconds(chunk)
        prompt = self.prompt(chunk, seconds)
        if not isinstance(prompt, str) or not prompt.strip():
            raise TimelineError(f"the prompt for chunk {chunk} ({seconds:g}s) is {prompt!r}; return non-empty text")
        self.asked.append((chunk, seconds, prompt))
        emb, mask = self._embedding(prompt)
        if mask.sum() == 0:  # an empty caption after cleaning: the null side for both rows, as upstream
            return np.stack([null_e, null_e]), np.stack([null_m, null_m])
        remaining = [self.chunk_num - chunk - 1]
        keys = special_tokens.caption_token_keys(self._rt)
        e, m = special_tokens.pad_special_tokens(
            keys, emb[:, None], mask[:, None], self._table, self._max_len, remaining=remaining
        )
        if e.shape[2] != null_e.shape[0]:
            raise ValueError(
                f"caption has {e.shape[2]} tokens after special tokens but the null caption has {null_e.shape[0]}; "
                f"encode prompts to {null_e.shape[0]} tokens (model caption_max_length)"
            )
        return np.stack([e[0, 0], null_e]).astype(np.float32), np.stack([m[0, 0], null_m]).astype(np.float32)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every chunk's captions at once, (2, chunk_num, L, Cc) and (2, chunk_num, L)."""
        rows = [self(i) for i in range(self.chunk_num)]
        return np.stack([r[0] for r in rows], 1), np.stack([r[1] for r in rows], 1)


# ----------------------------------------------------------------------------- command line

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?\s*$")


def parse_duration(text: str) -> float:
    """'60s', '90', '1m30s', '2m' -> seconds."""
    match = _DURATION.match(text)
    if not text.strip() or match is None or (match.group(1) is None and match.group(2) is None):
        raise TimelineError(f"--duration {text!r} is not a length of video; write e.g. 60s, 90 or 1m30s")
    seconds = float(match.group(1) or 0) * 60 + float(match.group(2) or 0)
    if seconds <= 0:
        raise TimelineError(f"--duration {text!r} is no video at all; give a positive length (e.g. 10s)")
    return seconds


def frames_for(seconds: float, fps: int, temporal_factor: int) -> int:
    """Frames to generate for `seconds` of video: the nearest multiple of the VAE's factor."""
    return max(1, round(seconds * fps / temporal_factor)) * temporal_factor


def cli_segments(prompts: Sequence[str] | None, prompt_file: str | None) -> list[Segment]:
    """The timeline of the command line: repeated --prompt entries or a --prompt_file."""
    if prompts and prompt_file:
        raise TimelineError("give --prompt or --prompt_file, not both (a story file holds every prompt)")
    if prompt_file:
        return read_prompt_file(prompt_file)
    if not prompts:
        raise TimelineError(
            "no prompt: give --prompt TEXT (repeat it as --prompt '3s: TEXT' for a story) or --prompt_file"
        )
    return parse_entries(prompts)


def encode_story(encode, segments: Sequence[Segment]) -> Callable:
    """Encodes each distinct prompt of a fixed timeline once, now (so the encoder can be freed);
    returns an `encode` for ChunkCaptions that looks them up."""
    done = {p: encode([p]) for p in dict.fromkeys(s.prompt for s in segments)}
    return lambda prompts: done[prompts[0]]
