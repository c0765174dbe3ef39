"""The sampler's host plan: everything about a run's schedule, computed once in numpy.

For a config and a video length (`layout`): which chunks are in the window at every step,
their flow times and step sizes, which keys each chunk sees, and where the ring KV cache
and the latent slots put them (`plan`: stages of groups of steps, one jitted program per
distinct window shape; sampler.py runs them). Nothing here touches a device, and only the
plan grows with the length of the video (a few numbers per step).

Shapes: C latent channels, T latent frames, h x w latent size, R chunks in a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from magi_jax import schedule
from magi_jax.attention import CAPTION_MULTIPLE
from magi_jax.config import ConfigError, MagiConfig
from magi_jax.forward_call import ForwardCall, Window
from magi_jax.guidance import ChunkGeometry, DispatchStep, plan_call

f32 = np.float32


@dataclass(frozen=True)
class Layout:
    """Sizes of one run, derived from the config and the prefix."""

    chunk_num: int  # chunks of the whole latent video, prefix included
    clean_chunks: int  # whole prefix chunks (encoded into the cache, never denoised)
    prefix_frames: int  # latent frames of prefix (0 for T2V)
    chunk_width: int
    latent_shape: tuple  # (C, T, h, w)
    chunk_tokens: int

    @property
    def frames(self) -> int:
        return self.latent_shape[1]


def layout(config: MagiConfig, prefix_frames: int = 0) -> Layout:
    """The run's sizes, after checking the config can be split as the schedule requires.

    Every error is raised here, before anything is compiled.
    """
    m, rt = config.model, config.runtime
    problems = []
    f = rt.spatial_downsample_factor
    unit = f * m.patch_size  # pixels per DiT token
    if rt.video_size_h % unit or rt.video_size_w % unit:
        hu = max(unit, round(rt.video_size_h / unit) * unit)
        wu = max(unit, round(rt.video_size_w / unit) * unit)
        problems.append(
            f"video size {rt.video_size_h}x{rt.video_size_w} must be a multiple of {unit} "
            f"(VAE {f}x, patch {m.patch_size}); use {hu}x{wu}"
        )
    if rt.window_size < 1 or rt.num_steps % rt.window_size:
        problems.append(f"num_steps ({rt.num_steps}) must be a multiple of window_size ({rt.window_size})")
    n2c = rt.noise2clean_kvrange
    if n2c and rt.num_steps % len(n2c):
        problems.append(f"num_steps ({rt.num_steps}) must be a multiple of len(noise2clean_kvrange) ({len(n2c)})")
    generated = rt.num_frames // rt.temporal_downsample_factor
    if rt.num_frames % rt.temporal_downsample_factor:
        tdf = rt.temporal_downsample_factor
        lo, hi = rt.num_frames // tdf * tdf, -(-rt.num_frames // tdf) * tdf
        why = " (the VAE's temporal factor)" if lo else ""
        problems.append(
            f"num_frames ({rt.num_frames}) must be a multiple of {tdf}{why}; use {f'{lo} or {hi}' if lo else hi}"
        )
    elif generated < 1:
        problems.append(
            f"num_frames ({rt.num_frames}) gives no latent frame to generate; use at least "
            f"{rt.temporal_downsample_factor}"
        )
    if rt.chunk_width % m.t_patch_size:
        problems.append(f"chunk_width ({rt.chunk_width}) must be a multiple of t_patch_size ({m.t_patch_size})")
    if problems:
        raise ConfigError("; ".join(problems))
    cw = rt.chunk_width
    chunk_num = math.ceil((generated + prefix_frames) / cw)
    h, w = rt.latent_hw
    tokens = cw // m.t_patch_size * (h // m.patch_size) * (w // m.patch_size)
    return Layout(chunk_num, prefix_frames // cw, prefix_frames, cw, (m.latent_channels, chunk_num * cw, h, w), tokens)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepPlan:
    """One sampler step; in a `Group` every array has a leading axis over the group's steps."""

    call: ForwardCall  # the guided call: window, flow times, key ranges, rope, cache writes
    dt: jax.Array  # (D,) float32 flow-time increment of each denoising chunk
    near_clean: jax.Array  # () bool: first denoising chunk past the distill threshold (upstream's flag)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Group:
    """Consecutive steps of one stage that share a window shape: one compilation each.

    `steps` is padded to the stage's step count by repeating its last step, so groups of
    one window shape share one compiled loop; only the first `count` run.
    """

    steps: StepPlan  # (stage steps, ...)
    first_chunk: jax.Array | int  # first denoising chunk of the stage
    count: jax.Array | int  # steps that run
    slot_base: jax.Array | int  # the chunk whose latents are in slot 0 during the stage

    @property
    def window(self) -> Window:
        return self.steps.call.window


@dataclass(frozen=True)
class Stage:
    groups: list[Group]
    done_chunk: int | None  # chunk that leaves the window clean after this stage

    @property
    def first_chunk(self) -> int:
        return int(self.groups[0].first_chunk)

    @property
    def denoising(self) -> int:
        """Chunks the stage denoises (its captions)."""
        return self.groups[0].window.denoising

    @property
    def slot_base(self) -> int:
        return int(self.groups[0].slot_base)


def _kv_ranges(config: MagiConfig, lay: Layout, slice_point: int, steps_of_chunks: list[int]) -> np.ndarray:
    """Key range [start, end) (global tokens) of each window chunk at its denoise step."""
    rt = config.runtime
    n = rt.num_steps
    out = []
    for j, step in enumerate(steps_of_chunks):
        end = slice_point + j + 1
        if not rt.noise2clean_kvrange:
            start = 0
        else:
            per = n // len(rt.noise2clean_kvrange)
            clean = rt.clean_chunk_kvrange if rt.clean_chunk_kvrange != -1 else rt.noise2clean_kvrange[-1]
            span = clean if step == n else rt.noise2clean_kvrange[step // per]
            start = max(0, end - span)
        out.append((start * lay.chunk_tokens, end * lay.chunk_tokens))
    return np.array(out, np.int32)


def prefix_kv_ranges(config: MagiConfig, lay: Layout) -> np.ndarray:
    """Key ranges of the prefix-encoding call: each clean chunk sees its predecessors."""
    rt = config.runtime
    if rt.clean_chunk_kvrange != -1:
        span = rt.clean_chunk_kvrange
    elif rt.noise2clean_kvrange:
        span = rt.noise2clean_kvrange[-1]
    else:
        span = 8
    ends = np.arange(1, lay.clean_chunks + 1)
    starts = np.maximum(ends - span, 0)
    return (np.stack([starts, ends], 1) * lay.chunk_tokens).astype(np.int32)


def cache_window_rows(config: MagiConfig, lay: Layout) -> int:
    """Cache rows a window can see below its first chunk (bounds attention cost)."""
    rt = config.runtime
    if not rt.noise2clean_kvrange:
        return lay.chunk_num * lay.chunk_tokens
    widest = max(max(rt.noise2clean_kvrange), rt.clean_chunk_kvrange)
    return max(1, widest - 1) * lay.chunk_tokens


def kv_span(config: MagiConfig, chunk_tokens: int) -> int | None:
    """Static bound on the keys one chunk's kv_range covers (Window.kv_span): the widest range
    the schedule gives a chunk (noise2clean / clean-chunk ranges, the prefix encoding's
    included), None when ranges are unbounded."""
    rt = config.runtime
    if not rt.noise2clean_kvrange:
        return None
    return max(max(rt.noise2clean_kvrange), rt.clean_chunk_kvrange) * chunk_tokens


def cache_rows(config: MagiConfig, lay: Layout, ring: bool = True) -> int:
    """Rows of the KV cache ring: the widest span any call reads below its window plus a
    window's chunks, and at least the prefix (written by one call); never more than the
    whole video's tokens (`ring=False`: exactly those).

    Why that suffices: a call whose window starts at chunk c writes chunks up to
    c + window_size (c - 1 is the extra clean chunk when present), so in a ring of
    (widest - 1 + window_size) chunks it overwrites chunk c + 1 - widest at the oldest, which
    no later call reads: they read from chunk c + 1 - (widest - 1) on."""
    whole = lay.chunk_num * lay.chunk_tokens
    if not ring:
        return whole
    written = config.runtime.window_size * lay.chunk_tokens
    return min(whole, max(cache_window_rows(config, lay) + written, lay.clean_chunks * lay.chunk_tokens))


def cache_shape(config: MagiConfig, lay: Layout, ring: bool = True, split: int = 1) -> tuple[int, int, int, int]:
    """(layers, rows, key/value heads, head dim) of the KV cache arrays: `cache_rows`, rounded
    up to a multiple of `split`, the devices its rows are split over (`kv_seq`). A ring of
    five 12,150-token chunks (a V2V prefix at 4.5B, 720x720) is 60,750 rows, which `seq=8`
    does not divide: unpadded it was held whole on every device. The extra rows lie past the
    ring (chunk slots are planned over `cache_rows` alone), so nothing reads or writes them."""
    m = config.model
    rows = cache_rows(config, lay, ring)
    return (m.num_layers, -(-rows // split) * split, m.num_query_groups, m.kv_channels)


def latent_slots(config: MagiConfig, lay: Layout, ring: bool = True) -> int:
    """Chunks of latents the sampler carries: a window and the clean chunk run again with it."""
    return min(lay.chunk_num, config.runtime.window_size + 1) if ring else lay.chunk_num


def slot_base(first_chunk: int, lay: Layout, slots: int) -> int:
    """The chunk in latent slot 0 while the stage's denoising chunks start at `first_chunk`
    (the extra clean chunk, first_chunk - 1, is in the slots too)."""
    return min(max(first_chunk - 1, 0), lay.chunk_num - slots)


def chunk_geometry(config: MagiConfig, lay: Layout, ring: bool = True) -> ChunkGeometry:
    tokens = lay.chunk_tokens
    return ChunkGeometry(lay.chunk_width // config.model.t_patch_size, tokens, cache_rows(config, lay, ring) // tokens)


def plan(config: MagiConfig, lay: Layout, ring: bool = True) -> list[Stage]:
    """Every step of the run as typed host records, grouped by window shape (`ring`: the
    cache slots and latent slots of the ring buffers, else of whole-video buffers)."""
    rt, eng = config.runtime, config.engine
    n, win, cw = rt.num_steps, rt.window_size, lay.chunk_width
    per_stage = n // win
    t_sched = schedule.init_t(n, eng.shortcut_mode)
    intervals = schedule.init_interval(n, eng.shortcut_mode)
    table = schedule.stage_table(lay.chunk_num, win, lay.clean_chunks)
    distilled = rt.cfg_number == 1
    window_rows = cache_window_rows(config, lay)
    span = kv_span(config, lay.chunk_tokens)
    geometry = chunk_geometry(config, lay, ring)
    slots = latent_slots(config, lay, ring)
    counts = np.zeros(lay.chunk_num, int)
    stages = []
    for stage in range(table.shape[1]):
        cs, ce, ts, te = (int(v) for v in table[:, stage])
        groups: list[tuple[Window, list[StepPlan]]] = []
        for idx in range(per_stage):
            extra = cs > lay.clean_chunks and idx == 0
            denoise_steps = [j * per_stage + idx for j in range(ts, te)][::-1]
            t = t_sched[denoise_steps]
            dt = (t_sched[[s + 1 for s in denoise_steps]] - t).astype(f32)
            slice_point = cs - 1 if extra else cs
            if extra:
                t = np.concatenate([np.array([rt.clean_t], f32), t])
                denoise_steps = [n, *denoise_steps]
            kv = _kv_ranges(config, lay, slice_point, denoise_steps)
            # prefix frames are written into the window; whole prefix chunks count as clean
            prefix_start = slice_point * cw
            if lay.prefix_frames > prefix_start:
                t[: (lay.prefix_frames - prefix_start) // cw] = 1.0
            near_clean = float(t[int(extra)]) > eng.distill_nearly_clean_chunk_threshold
            window = Window(
                chunks=ce - cs + int(extra),
                extra_clean_chunk=extra,
                near_clean_copy=distilled and near_clean,
                cache_window=window_rows,
                kv_span=span,
                caption_block=CAPTION_MULTIPLE,
            )
            dispatch = DispatchStep(
                first_chunk=slice_point,
                t=t,
                kv_range=kv,
                near_clean=near_clean,
                distill_dt=schedule.distill_dt(n, intervals[idx]) if eng.distill else None,
            )
            step = StepPlan(plan_call(config, window, dispatch, geometry), dt, np.bool_(near_clean))
            if groups and groups[-1][0] == window:
                groups[-1][1].append(step)
            else:
                groups.append((window, [step]))
        stage_groups = []
        for _, steps in groups:
            padded = steps + [steps[-1]] * (per_stage - len(steps))
            stacked = jax.tree.map(lambda *a: np.stack(a), *padded)
            base = slot_base(cs, lay, slots)
            stage_groups.append(Group(stacked, np.int32(cs), np.int32(len(steps)), np.int32(base)))
        counts[cs:ce] += per_stage
        done = cs if counts[cs] == n else None
        stages.append(Stage(stage_groups, done))
    return stages


def prefix_call(config: MagiConfig, lay: Layout, ring: bool = True) -> ForwardCall:
    """The call that encodes the whole prefix chunks (clean time, each sees its predecessors)."""
    rt = config.runtime
    k = lay.clean_chunks
    dt0 = schedule.distill_dt(rt.num_steps, schedule.init_interval(rt.num_steps, config.engine.shortcut_mode)[0])
    step = DispatchStep(
        first_chunk=0,
        t=np.full((k,), rt.clean_t, f32),
        kv_range=prefix_kv_ranges(config, lay),
        encodes_prefix=True,
        distill_dt=dt0 if config.engine.distill else None,
    )
    window = Window(chunks=k, kv_span=kv_span(config, lay.chunk_tokens), caption_block=CAPTION_MULTIPLE)
    return plan_call(config, window, step, chunk_geometry(config, lay, ring))
