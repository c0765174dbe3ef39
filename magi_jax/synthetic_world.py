"""A procedural video world: coloured balls under simple 2-D physics, each clip captioned.

The data a small MAGI model can be trained on here, with no download: a plain background
and one or two balls that
  * roll in one of four directions and bounce off the walls (`roll`),
  * fall under gravity and bounce on the floor (`fall`),
  * roll toward each other and collide elastically (`collide`).
The caption states what the simulation did ("a red ball rolls to the right and bounces off
the wall"), written from the events the physics recorded, never from what was intended.
Clip `index` of `seed` is a function of (seed, index) only, so any number of clips can be
drawn, in any order, and drawn again.

A few (colour, direction) pairs of rolling balls are held out of the training clips
(`HELD_OUT`): prompts made of them test whether a model composes colour and motion.
`describe` reads a clip back from its pixels (the dominant ball's colour and which way it moves),
which is how generated videos are checked against their prompts.

    python -m magi_jax.synthetic_world --out clips/ --count 2000 [--size 64x64 --frames 32]

writes clip_00000.mp4 with clip_00000.txt beside it, the folder layout train_data reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 45, 45),
    "green": (45, 185, 70),
    "blue": (55, 90, 235),
    "yellow": (235, 215, 45),
    "purple": (155, 65, 205),
    "orange": (245, 140, 35),
}
BACKGROUND = (20, 20, 24)
SCENES = ("roll", "fall", "collide")
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows downward
HELD_OUT = (("purple", "left"), ("yellow", "up"), ("orange", "down"))
# the prompts a model of this world is scored on (tests/test_world_model.py, bench/world_model_eval.py):
# six seen (colour, direction) pairs that differ in both
SCORED = (
    ("red", "right"),
    ("blue", "left"),
    ("green", "up"),
    ("yellow", "down"),
    ("orange", "right"),
    ("purple", "up"),
)
GRAVITY = 600.0  # pixels / s^2 at 64 pixels of height; scaled with the frame
SUBSTEPS = 8  # physics steps per frame: no ball crosses a wall or another ball between them
RESTITUTION = 0.85  # a bounce keeps this fraction of the speed along the contact normal


@dataclass(frozen=True)
class Event:
    frame: int
    kind: str  # "wall", "floor", "collide"
    balls: tuple[int, ...]
    side: str = ""  # a wall's side: left, right, top


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    scene: str
    colours: tuple[str, ...]
    direction: str  # a rolling ball's direction, "" for other scenes
    tracks: np.ndarray  # (T, balls, 2) centres (x, y) in pixels
    events: tuple[Event, ...]


def _simulate(pos, vel, radius, frames: int, fps: int, size, gravity: float):
    """Integrates the balls (semi-implicit Euler, SUBSTEPS per frame) inside the frame's walls.
    Returns the centres per frame (T, N, 2) and the events, in order."""
    w, h = size
    pos, vel = pos.astype(np.float64).copy(), vel.astype(np.float64).copy()
    dt = 1.0 / (fps * SUBSTEPS)
    tracks, events = np.zeros((frames, len(pos), 2)), []
    for f in range(frames):
        tracks[f] = pos
        for _ in range(SUBSTEPS):
            vel[:, 1] += gravity * dt
            pos += vel * dt
            for i, r in enumerate(radius):
                for axis, low_side, high_side, limit in ((0, "left", "right", w), (1, "top", "floor", h)):
                    if pos[i, axis] < r and vel[i, axis] < 0:
                        pos[i, axis], vel[i, axis] = 2 * r - pos[i, axis], -RESTITUTION * vel[i, axis]
                        side = low_side
                    elif pos[i, axis] > limit - r and vel[i, axis] > 0:
                        pos[i, axis], vel[i, axis] = 2 * (limit - r) - pos[i, axis], -RESTITUTION * vel[i, axis]
                        side = high_side
                    else:
                        continue
                    kind = "floor" if side == "floor" and gravity else "wall"
                    events.append(Event(f, kind, (i,), "bottom" if side == "floor" else side))
            for i in range(len(pos)):
                for j in range(i + 1, len(pos)):
                    d = pos[j] - pos[i]
                    dist = float(np.hypot(*d))
                    closing = float(np.dot(vel[j] - vel[i], d))
                    if dist < radius[i] + radius[j] and closing < 0:  # equal masses: exchange the normal parts
                        n = d / max(dist, 1e-9)
                        push = RESTITUTION * np.dot(vel[i] - vel[j], n) * n
                        vel[i], vel[j] = vel[i] - push, vel[j] + push
                        events.append(Event(f, "collide", (i, j)))
    return tracks, tuple(events)


def _render(tracks, radius, colours, size) -> np.ndarray:
    """Anti-aliased discs on the background, later balls in front: (T, H, W, 3) uint8."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    out = np.empty((len(tracks), h, w, 3), np.float32)
    out[:] = BACKGROUND
    for b, (r, name) in enumerate(zip(radius, colours)):
        cx, cy = tracks[:, b, 0, None, None], tracks[:, b, 1, None, None]
        cover = np.clip(r + 0.5 - np.sqrt((x - cx) ** 2 + (y - cy) ** 2), 0.0, 1.0)[..., None]
        out = out * (1 - cover) + np.asarray(COLOURS[name], np.float32) * cover
    return np.round(out).astype(np.uint8)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _caption(scene: str, colours, direction: str, events, frames: int) -> str:
    """What a viewer sees happen: events in the last two frames are left out (the ball is
    not seen coming back)."""
    events = [e for e in events if e.frame <= frames - 3]
    first = colours[0]
    if scene == "roll":
        verb = "rolls to the" if direction in ("left", "right") else "moves"
        text = f"{_a(first)} ball {verb} {direction}"
        if any(e.kind == "wall" for e in events):
            text += " and bounces off the wall"
        return text
    if scene == "fall":
        text = f"{_a(first)} ball falls"
        if any(e.kind == "floor" for e in events):
            text += " and bounces on the floor"
        return text
    text = f"{_a(colours[0])} ball and {_a(colours[1])} ball roll toward each other"
    if any(e.kind == "collide" for e in events):
        text += " and collide"
    return text


def roll_prompt(colour: str, direction: str) -> str:
    """The caption of a `colour` ball rolling `direction` that does not reach the wall."""
    return _caption("roll", (colour,), direction, events=(), frames=0)  # no events: frames unread


def clip(
    seed: int,
    index: int,
    size=(64, 64),
    frames: int = 32,
    fps: int = 24,
    scene: str | None = None,
    include_held_out: bool = False,
) -> Clip:
    """Clip `index` of `seed`: (width, height) pixels, `frames` frames at `fps`. `scene` None
    draws one; held-out (colour, direction) pairs are redrawn unless `include_held_out`."""
    rng = np.random.default_rng([seed, index])
    w, h = size
    scale = min(w, h) / 64.0
    scene = scene or SCENES[int(rng.integers(len(SCENES)))]
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; use one of {', '.join(SCENES)}")
    names = list(COLOURS)
    speed = rng.uniform(35.0, 60.0) * scale
    direction, gravity = "", 0.0
    if scene == "roll":
        while True:
            colours = (names[int(rng.integers(len(names)))],)
            direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
            if include_held_out or (colours[0], direction) not in HELD_OUT:
                break
        radius = np.array([rng.uniform(5.0, 8.0) * scale])
        ux, uy = DIRECTIONS[direction]
        # start in the back half of the frame along the motion, so the ball has room to go
        along = rng.uniform(0.2, 0.45)
        pos = np.array([[w / 2 - ux * along * w, h / 2 - uy * along * h]]) + rng.uniform(-4, 4, (1, 2)) * scale
        vel = np.array([[ux * speed, uy * speed]])
    elif scene == "fall":
        colours = (names[int(rng.integers(len(names)))],)
        radius = np.array([rng.uniform(5.0, 8.0) * scale])
        pos = np.array([[rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * h]])
        vel = np.array([[rng.uniform(-10.0, 10.0) * scale, 0.0]])
        gravity = GRAVITY * scale
    else:
        first, second = rng.choice(len(names), size=2, replace=False)
        colours = (names[int(first)], names[int(second)])
        radius = rng.uniform(5.0, 7.0, 2) * scale
        y0 = h / 2 + rng.uniform(-3, 3) * scale
        pos = np.array([[0.2 * w, y0], [0.8 * w, y0 + rng.uniform(-3, 3) * scale]])
        vel = np.array([[speed, 0.0], [-speed, 0.0]])
    tracks, events = _simulate(pos, vel, radius, frames, fps, (w, h), gravity)
    return Clip(
        frames=_render(tracks, radius, colours, (w, h)),
        caption=_caption(scene, colours, direction, events, frames),
        scene=scene,
        colours=colours,
        direction=direction,
        tracks=tracks.astype(np.float32),
        events=events,
    )


def rolling(seed: int, index: int, colour: str, heading, size=(64, 64), frames: int = 32, fps: int = 24) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one `colour` ball rolling along `heading` (dx, dy), any
    direction - a diagonal, say, which the world's clips never show: new motion to teach a
    model (the LoRA notebook). Speed, size and start are drawn as for a rolling clip."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; use one of {', '.join(COLOURS)}")
    rng = np.random.default_rng([seed, index, 1])
    w, h = size
    scale = min(w, h) / 64.0
    u = np.asarray(heading, np.float64)
    u = u / np.linalg.norm(u)
    radius = np.array([rng.uniform(5.0, 8.0) * scale])
    along = rng.uniform(0.2, 0.35)
    pos = np.array([[w / 2 - u[0] * along * w, h / 2 - u[1] * along * h]]) + rng.uniform(-3, 3, (1, 2)) * scale
    vel = (u * rng.uniform(35.0, 60.0) * scale)[None]
    tracks, _ = _simulate(pos, vel, radius, frames, fps, (w, h), 0.0)
    return _render(tracks, radius, (colour,), (w, h))


# ----------------------------------------------------------------------------- reading clips back


def describe(frames: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, direction) of the dominant ball in uint8 frames (T, H, W, 3), from pixels
    alone: the palette colour most pixels are near, and the larger component of the velocity
    of that colour's centroid, fitted by least squares over the frames it is seen in. A fit
    over the clip, not two frames: a rolling ball in the world's clips runs most of a clip one
    way before any bounce, so the fit reads every clip as its caption
    (tests/test_synthetic_world.py), and one misplaced frame of a generated video does not
    decide it. (None, None) when no palette colour shows."""
    px = np.asarray(frames, np.float32)
    palette = np.asarray([COLOURS[c] for c in COLOURS], np.float32)
    dist = np.linalg.norm(px[..., None, :] - palette, axis=-1)  # (T, H, W, colours)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < 60.0
    counts = np.bincount(nearest[close].ravel(), minlength=len(palette))
    if counts.max() == 0:
        return None, None
    k = int(counts.argmax())
    mask = close & (nearest == k)
    seen = np.asarray([t for t in range(len(px)) if mask[t].any()])
    if len(seen) < 2:
        return list(COLOURS)[k], None
    ys, xs = np.mgrid[0 : px.shape[1], 0 : px.shape[2]]
    centres = np.asarray([(xs[mask[t]].mean(), ys[mask[t]].mean()) for t in seen])
    dx, dy = np.polyfit(seen.astype(np.float64), centres, 1)[0]  # pixels per frame
    if max(abs(dx), abs(dy)) < 1.0 / len(px):  # under a pixel over the whole clip
        return list(COLOURS)[k], None
    if abs(dx) >= abs(dy):
        return list(COLOURS)[k], "right" if dx > 0 else "left"
    return list(COLOURS)[k], "down" if dy > 0 else "up"


# ----------------------------------------------------------------------------- the command


def size_arg(text: str) -> tuple[int, int]:
    """argparse type of a --size in the project's HEIGHTxWIDTH form -> (width, height)."""
    from magi_jax.config import ConfigError, parse_size

    try:
        h, w = parse_size(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 64x96)") from None
    return w, h


def write_clips(out, count: int, seed: int = 0, size=(64, 64), frames: int = 32, fps: int = 24) -> list[Path]:
    """Writes clips [0, count) of `seed` as `clip_%05d.mp4` + `.txt` into `out`; each file
    appears under its name only when complete. Returns the mp4 paths."""
    from magi_jax.video_io import VideoWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        c = clip(seed, i, size, frames, fps)
        path = out / f"clip_{i:05d}.mp4"
        with VideoWriter(path, fps) as writer:
            writer.write(c.frames)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.txt")
        tmp.write_text(c.caption + "\n")
        os.replace(tmp, path.with_suffix(".txt"))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for clip_NNNNN.mp4 and .txt")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="64x64", type=size_arg, help="HEIGHTxWIDTH in pixels")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--fps", type=int, default=24)
    args = ap.parse_args(argv)
    w, h = args.size
    problems = [
        f"{name} must be positive"
        for name, v in (
            ("--count", args.count),
            ("--frames", args.frames),
            ("--fps", args.fps),
            ("width", w),
            ("height", h),
        )
        if v <= 0
    ]
    if min(w, h) < 32:
        problems.append("the frame must be at least 32 pixels on each side (balls are 10-16 pixels wide)")
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    paths = write_clips(args.out, args.count, args.seed, (w, h), args.frames, args.fps)
    print(f"wrote {len(paths)} clips to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
