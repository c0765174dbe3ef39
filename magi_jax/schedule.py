"""Time schedules, shortcut intervals, the chunk-pipeline stage table and CFG scale lookup.

Everything here is host-side numpy computed once per run, bit-exact with upstream: the
schedule is float32 and later thresholds compare against it (e.g. init_t(8)[6] is
float32(0.3) = 0.30000001..., which is *above* the distill threshold 0.3), so we follow
torch's float32 arithmetic order, including how `torch.linspace` forms its values.
Convention: t = 0 is noise, t = 1 is clean.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace as torch's CPU kernel forms it, not numpy's float64 one.

    torch computes a float32 step, then start + step*i for the first half and
    end - step*(steps-1-i) for the second, each as one fused multiply-add (one rounding).
    """
    if steps == 1:
        return np.array([start], f32)
    step = np.float64((f32(end) - f32(start)) / f32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    lo = np.float64(f32(start)) + step * i[:half]
    hi = np.float64(f32(end)) - step * (steps - 1 - i[half:])
    return np.concatenate([lo, hi]).astype(f32)


def _shortcut_mode_16_16_8(shortcut_mode: str) -> bool:
    return shortcut_mode == "16,16,8"


def init_t(num_steps: int, shortcut_mode: str = "8,16,16", schedule: dict | None = None) -> np.ndarray:
    """The (num_steps + 1,) float32 flow times, 0 (noise) -> ~1 (clean).

    12 steps is the distilled shortcut schedule: 4 stages of 3 steps of unequal size
    (intervals 2,1,1 or 1,1,2 in units of a 16-step schedule).
    `schedule` is upstream's t_schedule_config: {"tSchedulerFunc": sd3|square|piecewise|identity,
    "shift": 3.0}.
    """
    schedule = schedule or {}
    if num_steps == 12:
        base = _torch_linspace(0, 1, 5) / f32(4)
        offsets = _torch_linspace(0, 1, 5)
        base = base[:3] if _shortcut_mode_16_16_8(shortcut_mode) else np.concatenate([base[:1], base[2:4]])
        t = np.concatenate([base + a for a in offsets])[: num_steps + 1]
    else:
        t = _torch_linspace(0, 1, num_steps + 1)
    kind = schedule.get("tSchedulerFunc", "sd3")
    if kind == "sd3":
        # SD3's resolution shift, written for our reversed time axis (0 = noise)
        shift = float(schedule.get("shift", 3.0))
        if shift < 1.0:
            raise ValueError(f"sd3 schedule shift must be >= 1, got {shift}")
        inv = 1.0 / shift
        t = t * t
        t = f32(inv) * t / (f32(1) + f32(inv - 1) * t)
    elif kind == "square":
        t = t * t
    elif kind == "piecewise":
        t = np.where(t < f32(0.875), t * f32(0.5 / 0.875), f32(0.5) + (t - f32(0.875)) * f32(0.5 / (1 - 0.875)))
    elif kind != "identity":
        raise ValueError(f"unknown tSchedulerFunc {kind!r} (sd3, square, piecewise, identity)")
    return np.asarray(t, f32)


def init_interval(num_steps: int, shortcut_mode: str = "8,16,16") -> np.ndarray:
    """Per-step shortcut interval handed to the distilled model (`distill_interval`).

    Ones (float32), or for step counts divisible by 3 the int64 repeats 2,1,1 / 1,1,2 - the
    dtype is upstream's and decides how the distill step-size embedding is computed.
    """
    if num_steps % 3 == 0:
        pattern = [1, 1, 2] if _shortcut_mode_16_16_8(shortcut_mode) else [2, 1, 1]
        return np.array(pattern * (num_steps // 3), np.int64)
    return np.ones(num_steps, f32)


def stage_table(chunk_num: int, window_size: int, chunk_offset: int = 0) -> np.ndarray:
    """(4, stages) int table [chunk_start, chunk_end, t_start, t_end] of the chunk pipeline.

    Stage s denoises chunks [chunk_start, chunk_end); chunk chunk_end-1-j is at time block
    t_start + j (blocks of num_steps/window_size steps), so a new chunk enters every stage
    and the oldest leaves clean. `chunk_offset` chunks of prefix video are clean already.
    """
    rows = []
    for i in range(chunk_offset, chunk_num + window_size - 1):
        rows.append(
            (
                max(chunk_offset, i - window_size + 1),
                min(chunk_num, i + 1),
                max(0, i - chunk_num + 1),
                min(window_size, i - chunk_offset + 1),
            )
        )
    return np.array(rows, np.int64).reshape(-1, 4).T


def cfg_scale_index(t, cfg_t_range) -> np.ndarray:
    """Index into the per-t-range CFG scales for flow time(s) t (float32 comparison)."""
    edges = np.asarray(cfg_t_range, f32) - f32(1e-7)
    idx = np.searchsorted(edges, np.asarray(t, f32), side="left") - 1
    if np.any(idx < 0) or np.any(idx >= len(edges)):
        raise ValueError(f"flow time(s) {t} outside cfg_t_range {list(cfg_t_range)}")
    return idx


def cfg_scales(t, runtime) -> tuple[np.ndarray, np.ndarray]:
    """(prev_chunk_scale, text_scale) as float32 for flow time(s) t under a RuntimeConfig."""
    idx = cfg_scale_index(t, runtime.cfg_t_range)
    return np.asarray(runtime.prev_chunk_scales, f32)[idx], np.asarray(runtime.text_scales, f32)[idx]


def distill_dt(num_steps: int, interval) -> np.float32:
    """The step size fed to the distill time embedding (upstream's `distill_dt_factor`).

    12-step shortcut: 4 / interval * 2 (interval int64 from `init_interval`), else num_steps/4*2.
    """
    if num_steps == 12:
        return f32(f32(4) / f32(interval) * f32(2))
    return f32(num_steps / 4 * 2)
