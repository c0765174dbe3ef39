"""The chunk-pipelined sampler: MAGI-1's autoregressive flow-matching loop, jitted.

The video is cut into chunks of `chunk_width` latent frames. Each chunk is denoised over
`num_steps` flow-matching steps; the steps are grouped in stages of
`num_steps / window_size`, and every stage a new chunk enters the window while the oldest
leaves clean, so up to `window_size` chunks are in flight at different noise levels. At
the first step of a stage the chunk that has just become clean is run once more at the
clean time to write its keys and values into the KV cache (later chunks attend to it).
With a prefix (I2V: one latent frame, V2V: whole and partial chunks) the whole prefix
chunks are encoded into the cache first, and prefix frames are written back into the
window before every forward.

How it runs: everything about the schedule - which chunks are in the window, their flow
times, key ranges, step sizes - is host-side numpy, computed once per run (sampler_plan.py). The
device runs one jitted function per distinct window shape (chunks in the window, whether
the extra clean chunk is present, and for distilled models whether the near-clean copy
is appended): a `fori_loop` over that shape's steps of a stage, carrying the latents and
the KV cache. Ramp-up and ramp-down stages use smaller windows, not padded slots, so no
forward is spent on empty chunks. Clean chunks are handed out between dispatches, the
moment they leave the window.

Memory does not grow with the video. The KV cache is a ring (kv_cache.py) of `cache_rows`
rows (allocated in a multiple of the devices they split over, `cache_shape`), and the plan
says which rows each call reads and writes (ForwardCall.cache_slots).
The loop carries the latents of `latent_slots` chunks (the window and the clean chunk run
again with it); the plan says which chunk sits in slot 0 (`Group.slot_base`), and between
stages the oldest slots leave and the next chunks' initial noise enters. A stage's inputs
are its own chunks' captions, asked for when a chunk enters the window (so a prompt may
change while the video streams), and the prefix frames that fall in the slots. Only the
host plan grows with the length (a few numbers per step). `Sampler(ring=False)` keeps a
cache row and a latent slot for every token and frame of the video instead: the same code
without wrap-around, the same results (the tests compare them).

Initial noise: runs of up to WHOLE_DRAW_MAX_CHUNKS chunks draw it as upstream does, one
randn over the whole latent video (so upstream runs replay from the same seed); longer runs
draw each chunk's noise from (seed, chunk) when the chunk enters the slots, so nothing grows
with the length (`noise_draw`: "video", "chunk" or "auto"). Either way the same seed gives
the same video.

Shapes: C latent channels, T latent frames of the video, h x w latent size, R chunks in a
window, L caption tokens, Cc caption channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import sharding
from magi_jax.attention import used_caption_tokens
from magi_jax.compile_cache import SavedProgram
from magi_jax.config import MagiConfig
from magi_jax.dit import DiT
from magi_jax.forward_call import NULL_ROW, Captions, ForwardCall, Window
from magi_jax.guidance import guided_velocity
from magi_jax.kv_cache import KVCache
from magi_jax.sampler_plan import Group, Layout, StepPlan, cache_shape, latent_slots, layout, plan, prefix_call

f32 = np.float32


# ----------------------------------------------------------------------------- device loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """What the loop carries: the latents of the chunks in the slots (from Group.slot_base
    on) and the KV cache."""

    x: jax.Array  # (C, slots * chunk_width, h, w) float32
    cache: KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StageInputs:
    """Inputs of one stage (every step of it): its chunks' captions and the prefix frames in
    the latent slots."""

    captions: Captions  # (2, D, L, Cc) the stage's denoising chunks: row 0 caption, row 1 null caption
    null: Captions  # (1, 1, L, Cc) what the re-encoded clean chunk reads (upstream: chunk 0's null
    # caption, chunk 1's null mask)
    prefix: jax.Array  # (C, slots * chunk_width, h, w) float32 prefix frames in the slots (zeros past them)
    prefix_end: jax.Array  # () int32: slot frames below it are prefix


@dataclass(frozen=True)
class Program:
    """The static part of a compiled sampler step (a jit static argument)."""

    graphdef: nnx.GraphDef
    config: MagiConfig


def _window(x, start_frame, frames):
    c, _, h, w = x.shape
    return jax.lax.dynamic_slice(x, (0, start_frame, 0, 0), (c, frames, h, w))


def window_captions(run: StageInputs, window: Window) -> Captions:
    """Both caption rows of the window's chunks (2, R, L, Cc); the re-encoded clean chunk
    reads the null caption."""
    if not window.extra_clean_chunk:
        return run.captions
    null = Captions(*(jnp.broadcast_to(a, (2, *a.shape[1:])) for a in (run.null.tokens, run.null.mask)))
    return null.concat(run.captions)


def advance(program: Program, params, state: SamplerState, run: StageInputs, group: Group):
    """Runs the group's live steps (a fori_loop over its step records) on the latent slots.

    Returns the new state and [step, chunk] of the first step that made NaN/Inf latents
    ([-1, -1]: none), read by the host only when it syncs anyway."""
    model = nnx.merge(program.graphdef, params)
    config = program.config
    window = group.window
    r, extra = window.chunks, int(window.extra_clean_chunk)
    cw = config.runtime.chunk_width

    def step(i, carry):
        st, bad = carry
        plan_i: StepPlan = jax.tree.map(lambda a: a[i], group.steps)
        call = plan_i.call
        with jax.named_scope("window"):
            start = (call.first_chunk - group.slot_base) * cw  # the window's first frame in the slots
            xw = _window(st.x, start, r * cw)
            frames = start + jnp.arange(r * cw)
            xw = jnp.where((frames < run.prefix_end)[None, :, None, None], _window(run.prefix, start, r * cw), xw)
            captions = window_captions(run, window)
        with jax.named_scope("guided_forward"):
            v, cache = guided_velocity(model, config, xw, captions, call, st.cache)
        with jax.named_scope("integrate"):
            xw, v = xw[:, extra * cw :], v[:, extra * cw :]
            dt = jnp.repeat(plan_i.dt, cw)[None, :, None, None]
            x_new = (xw + v * dt).astype(st.x.dtype)
            x = jax.lax.dynamic_update_slice(st.x, x_new, (0, (group.first_chunk - group.slot_base) * cw, 0, 0))
        return SamplerState(x, cache), _first_non_finite(bad, i, x_new, group.first_chunk, cw)

    state, bad = jax.lax.fori_loop(0, group.count, step, (state, jnp.full((2,), -1, jnp.int32)))
    # keep the cache where the rules put it (rows over `seq`, kv heads over `model`)
    cache = KVCache(sharding.constrain(state.cache.k, KVCache.AXES), sharding.constrain(state.cache.v, KVCache.AXES))
    return SamplerState(state.x, cache), bad


class NonFiniteError(FloatingPointError):
    """A sampler step produced NaN or Inf latents (bad weights, an overflow in low precision)."""


def _first_non_finite(bad, step, x_new, first_chunk, chunk_width):
    """[step, chunk] of the first step whose new latents hold NaN/Inf ([-1, -1]: none so far)."""
    per_chunk = jnp.isfinite(x_new).reshape(x_new.shape[0], -1, chunk_width, *x_new.shape[2:])
    ok = per_chunk.all(axis=(0, 2, 3, 4))
    chunk = first_chunk + jnp.argmin(ok).astype(jnp.int32)  # first chunk with a bad value
    hit = jnp.stack([jnp.asarray(step, jnp.int32), chunk])
    return jnp.where((bad[0] < 0) & ~ok.all(), hit, bad)


def _raise_non_finite(pending: list, total: int):
    """Raises NonFiniteError for the first group in `pending` that met a NaN/Inf step; empties it."""
    for done_before, g, bad in pending:
        step, chunk = (int(v) for v in np.asarray(bad))
        if step >= 0:
            t = float(np.asarray(g.steps.call.t)[step][-1])
            raise NonFiniteError(
                f"sampler step {done_before + step + 1} of {total} made chunk {chunk} NaN/Inf "
                f"(t = {t:.4f}); the weights or the inputs hold non-finite values, "
                "or a low-precision overflow: check the checkpoint, or run with --dtype float32"
            )
    pending.clear()


def encode_prefix(program: Program, params, state: SamplerState, x, captions: Captions, call: ForwardCall):
    """Writes the clean prefix chunks' keys and values into the cache (output discarded)."""
    model = nnx.merge(program.graphdef, params)
    with jax.named_scope("encode_prefix"):
        _, cache = guided_velocity(model, program.config, x, captions, call, state.cache)
    return SamplerState(state.x, cache)


def _dispatches(group: Group, one_by_one: bool):
    """The group as dispatched: whole, or one step at a time with its step records shifted
    (same shapes and a traced count: the same compiled program, the same arithmetic)."""
    if not one_by_one:
        yield group
        return
    for j in range(int(group.count)):
        steps = jax.tree.map(lambda v, j=j: np.concatenate([v[j:], np.repeat(v[-1:], j, 0)]), group.steps)
        yield dataclasses.replace(group, steps=steps, count=np.int32(1))


@jax.jit
def _marker(x):
    """A scalar that is ready when `x` is (x itself is donated to the next step)."""
    return x[0, 0, 0, 0]


def shift_slots(state: SamplerState, fresh, frames: int) -> SamplerState:
    """Drops the first `frames` latent frames of the slots and appends `fresh` ones."""
    x = jnp.concatenate([state.x[:, frames:], fresh.astype(state.x.dtype)], axis=1)
    return SamplerState(x, state.cache)


# Runs up to this many chunks draw their initial noise as upstream does, in one randn over
# the whole latent video (so upstream runs replay from the same seed); longer runs draw each
# chunk's noise from (seed, chunk) when it is needed, so nothing grows with the length.
WHOLE_DRAW_MAX_CHUNKS = 32
NOISE_DRAWS = ("auto", "video", "chunk")


class _CaptionFeed:
    """Per-chunk captions, asked for in chunk order as chunks enter the window and held until
    they leave it. `source(chunk)` -> (caption (2, L, Cc), mask (2, L)): row 0 the caption,
    row 1 the null caption. Keeps what the re-encoded clean chunk reads: chunk 0's null
    caption and chunk 1's null mask (upstream's choice)."""

    def __init__(self, source: Callable[[int], tuple]):
        self._source = source
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._asked = 0
        self._null_tokens = self._null_mask = None

    def _ask(self, end: int):
        while self._asked < end:
            i = self._asked
            cap, mask = (np.asarray(a, np.float32) for a in self._source(i))
            if i == 0:
                self._null_tokens, self._null_mask = cap[NULL_ROW], mask[NULL_ROW]
            elif i == 1:
                self._null_mask = mask[NULL_ROW]
            self._held[i] = cap, mask
            self._asked += 1

    def _stacked(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Caption tokens (2, count, L, Cc) and masks (2, count, L) of chunks [first, first + count)."""
        self._ask(first + count)
        held = [self._held[i] for i in range(first, first + count)]
        return np.stack([h[0] for h in held], 1), np.stack([h[1] for h in held], 1)

    def stage(self, first: int, count: int) -> tuple[Captions, Captions]:
        """A stage's captions: (2, count, l, Cc) of chunks [first, first + count), and the
        (1, 1, l, Cc) null caption the re-encoded clean chunk reads.

        Both are cut to the l leading tokens any of them reads (attention.used_caption_tokens),
        so the padding is never projected. l is rounded up to CAPTION_MULTIPLE: each bucket is
        one compilation per window shape, and prompts whose lengths fall in the same bucket
        (a timeline's segments, a live source's next prompt) run the same programs. A prompt
        in a longer bucket leaves the other chunks of its window bit-identical on the xla
        path (its cross-attention reads CAPTION_MULTIPLE-token key blocks: Window.caption_block); the fused kernels
        (cudnn, pallas, dpa) take the whole padded length, which moves them by float rounding."""
        tokens, mask = self._stacked(first, count)
        null_tokens, null_mask = self._null_tokens[None, None], self._null_mask[None, None]
        length = mask.shape[-1]
        used = used_caption_tokens(np.concatenate([mask.reshape(-1, length), null_mask.reshape(-1, length)]))
        return _device_captions(tokens, mask, used), _device_captions(null_tokens, null_mask, used)

    def prefix_null(self, count: int) -> Captions:
        """(2, count, l, Cc): both rows the null caption of the prefix chunks [0, count), cut
        to the leading tokens they read (as `stage`)."""
        tokens, mask = self._stacked(0, count)
        tokens, mask = tokens[[NULL_ROW, NULL_ROW]], mask[[NULL_ROW, NULL_ROW]]
        return _device_captions(tokens, mask, used_caption_tokens(mask))

    def release(self, chunk: int):
        self._held.pop(chunk, None)


def _device_captions(tokens: np.ndarray, mask: np.ndarray, used: int) -> Captions:
    """The first `used` caption tokens, on the device."""
    return Captions(jnp.asarray(tokens[..., :used, :]), jnp.asarray(mask[..., :used]))


def _array_captions(caption, caption_mask, lay: Layout) -> Callable[[int], tuple]:
    """Whole-run caption arrays as a per-chunk source, after checking their shapes."""
    expect = (2, lay.chunk_num)
    if caption_mask is None or tuple(caption.shape[:2]) != expect or tuple(caption_mask.shape[:2]) != expect:
        got = None if caption_mask is None else tuple(caption_mask.shape)
        raise ValueError(
            f"caption has shape {tuple(caption.shape)} / mask {got}; expected "
            f"{expect} leading dims (caption and null caption for each of {lay.chunk_num} chunks)"
        )
    caption, caption_mask = np.asarray(caption, np.float32), np.asarray(caption_mask, np.float32)
    return lambda i: (caption[:, i], caption_mask[:, i])


class _SlotPrefix:
    """The prefix frames that fall in the latent slots from a given base chunk on: (frames
    (C, slots * chunk_width, h, w) float32, zeros past the prefix; prefix_end () int32)."""

    def __init__(self, prefix: np.ndarray | None, lay: Layout, slots: int):
        c, _, h, w = lay.latent_shape
        self._prefix = None if prefix is None else np.asarray(prefix, np.float32)
        self._frames = 0 if prefix is None else prefix.shape[1]
        self._cw, self._shape = lay.chunk_width, (c, slots * lay.chunk_width, h, w)
        self._none = jnp.zeros(self._shape, jnp.float32)
        self._at: dict[int, jax.Array] = {}

    def at(self, base: int) -> tuple[jax.Array, jax.Array]:
        first = base * self._cw
        end = jnp.int32(self._frames - first)
        if self._frames <= first:
            return self._none, end
        if base not in self._at:
            buf = np.zeros(self._shape, np.float32)
            part = self._prefix[:, first : first + self._shape[1]]
            buf[:, : part.shape[1]] = part
            self._at[base] = jnp.asarray(buf)
        return self._at[base], end


class Sampler:
    """Generates latent chunks with a DiT; compiled functions are reused across runs.

    Memory does not grow with the video (module docstring): the KV cache is a ring of
    `cache_rows` rows and the loop carries the latents of a window plus one chunk.
    `ring=False` keeps a row and a slot for every token and frame of the video instead (the
    same results, for checking). `noise_draw` ("auto", "video", "chunk"): how initial noise
    is drawn from a seed (module docstring).
    `sampler.compilations` counts the programs it has run so far (one per window shape);
    programs are shared by every sampler of the process (compile_cache.SavedProgram), so a
    second sampler of the same model and shapes compiles nothing.
    """

    def __init__(self, model: DiT, config: MagiConfig, mesh=None, *, ring: bool = True, noise_draw: str = "auto"):
        """`mesh` (sharding.make_mesh): parameters, the KV cache and the window's tokens are
        sharded by sharding.RULES; None runs on the default device."""
        if noise_draw not in NOISE_DRAWS:
            raise ValueError(f"unknown noise draw {noise_draw!r}; use one of {', '.join(NOISE_DRAWS)}")
        self.config = config
        self.mesh = mesh
        self.ring = ring
        self.noise_draw = noise_draw
        if mesh is not None:
            model = sharding.place(model, mesh)
        self.graphdef, self.params = nnx.split(model)
        self.steps_done = 0  # sampler steps dispatched in the current run
        self.cache_sharding = None
        self.cache_shape = None  # the KV cache of the current run (for checks and logs)
        # the program (graphdef and config) is a static argument: executables are shared and
        # saved keyed by it
        self._advance = SavedProgram(advance, "advance", static_argnums=(0,), donate_argnums=(2,))
        self._prefix = SavedProgram(encode_prefix, "encode_prefix", static_argnums=(0,), donate_argnums=(2,))
        self._shift = jax.jit(shift_slots, static_argnames="frames", donate_argnames="state")

    @property
    def compilations(self) -> int:
        return self._advance.programs + self._prefix.programs

    def _program(self) -> Program:
        return Program(self.graphdef, self.config)

    def layout(self, prefix_frames: int = 0) -> Layout:
        return layout(self.config, prefix_frames)

    def initial_noise(self, seed: int, lay: Layout) -> jax.Array:
        """The whole video's noise in one draw (upstream's layout: one randn over (C, T, h, w))."""
        return jax.random.normal(jax.random.key(seed), lay.latent_shape, jnp.float32)

    def chunk_noise(self, seed: int, lay: Layout, chunk: int) -> jax.Array:
        """One chunk's noise drawn on its own, (C, chunk_width, h, w): the draw of long runs."""
        c, _, h, w = lay.latent_shape
        key = jax.random.fold_in(jax.random.key(seed), chunk)
        return jax.random.normal(key, (c, lay.chunk_width, h, w), jnp.float32)

    def noise_source(self, lay: Layout, noise, seed: int) -> Callable[[int, int], jax.Array]:
        """`f(a, b)`: the initial noise of chunks [a, b), (C, (b - a) * chunk_width, h, w),
        from `noise` (C, T, h, w) when given, else drawn from `seed` as `noise_draw` says."""
        draw = self.noise_draw
        if draw not in NOISE_DRAWS:
            raise ValueError(f"unknown noise draw {draw!r}; use one of {', '.join(NOISE_DRAWS)}")
        cw = lay.chunk_width
        if noise is not None:
            if tuple(noise.shape) != lay.latent_shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {lay.latent_shape}")
            whole = np.asarray(noise, np.float32)
        elif draw == "video" or (draw == "auto" and lay.chunk_num <= WHOLE_DRAW_MAX_CHUNKS):
            whole = np.asarray(self.initial_noise(seed, lay))  # on the host: the device holds only the slots
        else:
            return lambda a, b: jnp.concatenate([self.chunk_noise(seed, lay, i) for i in range(a, b)], axis=1)
        return lambda a, b: jnp.asarray(whole[:, a * cw : b * cw])

    def chunks(
        self,
        caption,
        caption_mask: np.ndarray | None = None,
        *,
        prefix: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        seed: int | None = None,
        on_dispatch: Callable[[int, jax.Array], None] | None = None,
    ) -> Iterator[jax.Array]:
        """Yields each clean chunk's latents (1, C, frames, h, w) as soon as it leaves the window.

        The latents are a device array, handed out without waiting for the device: the
        caller decides when to read them, so the next stage is dispatched before anything
        waits (the generate pipeline decodes and writes the chunk meanwhile).

        caption, caption_mask: (2, chunk_num, L, Cc) / (2, chunk_num, L) - per chunk the
        caption (row 0, null caption for clean prefix chunks) and the null caption (row 1),
        as `text_inputs` prepares them; or `caption` a function chunk -> (caption (2, L, Cc),
        mask (2, L)), asked when the chunk enters the window (timeline.ChunkCaptions: the
        prompt may change while the video streams). prefix: (C, frames, h, w) clean latents
        (I2V: one frame, V2V: several), in the VAE's dtype. noise: (C, T, h, w) to replay a
        run; else drawn from `seed` (the config's by default) as `noise_draw` says.
        on_dispatch(steps, marker): progress; called after every step is dispatched, with a
        small device array that becomes ready when the step is done (steps are then
        dispatched one by one, through the same compiled programs: no host callback is
        compiled in, which would keep the programs out of the compilation cache and fails
        on more than one device).
        """
        cfg = self.config
        prefix_frames = 0 if prefix is None else int(prefix.shape[1])
        lay = self.layout(prefix_frames)
        c, _, h, w = lay.latent_shape
        if prefix is not None:
            if prefix.ndim != 4 or prefix.shape[0] != c or prefix.shape[2:] != (h, w):
                raise ValueError(f"prefix latents have shape {tuple(prefix.shape)}, expected ({c}, frames, {h}, {w})")
        feed = _CaptionFeed(caption if callable(caption) else _array_captions(caption, caption_mask, lay))
        noise_of = self.noise_source(lay, noise, cfg.runtime.seed if seed is None else seed)
        stages = plan(cfg, lay, self.ring)

        m = cfg.model
        split = 1 if self.mesh is None else sharding.split_count("kv_seq", mesh=self.mesh)
        layers, rows, groups, head_dim = cache_shape(cfg, lay, self.ring, split)
        cache = KVCache.create(layers, rows, groups, head_dim, m.dtype)
        if self.mesh is not None:
            where = sharding.array_sharding(KVCache.AXES, cache.k.shape, self.mesh)
            cache = KVCache(jax.device_put(cache.k, where), jax.device_put(cache.v, where))
        self.cache_shape = cache.k.shape
        slots = latent_slots(cfg, lay, self.ring)
        base = 0
        state = SamplerState(noise_of(0, slots), cache)
        slot_prefix = _SlotPrefix(prefix, lay, slots)
        program = self._program()

        with self._mesh_context():
            if lay.clean_chunks:
                k = lay.clean_chunks
                null = feed.prefix_null(k)
                x = jnp.asarray(prefix[:, : k * lay.chunk_width])
                state = self._prefix(program, self.params, state, x, null, prefix_call(cfg, lay, self.ring))
                for i in range(k):
                    feed.release(i)

        self.steps_done = 0
        total = sum(g.count for st in stages for g in st.groups)
        pending = []  # (steps before, group, its [first bad step, chunk]) not yet read back
        earlier = []  # the same for the stages before the current one
        for stage in stages:
            with self._mesh_context():
                if stage.slot_base > base:  # the oldest slots leave; later chunks' noise enters
                    fresh = noise_of(base + slots, stage.slot_base + slots)
                    state = self._shift(state, fresh, frames=(stage.slot_base - base) * lay.chunk_width)
                    base = stage.slot_base
                # chunks entering the window are asked for now
                captions, null = feed.stage(stage.first_chunk, stage.denoising)
                run = StageInputs(captions, null, *slot_prefix.at(base))
                for g in stage.groups:
                    for dispatch in _dispatches(g, one_by_one=on_dispatch is not None):
                        done_before = self.steps_done
                        self.steps_done += int(dispatch.count)
                        state, bad = self._advance(program, self.params, state, run, dispatch)
                        pending.append((done_before, dispatch, bad))
                        if on_dispatch is not None:
                            on_dispatch(int(dispatch.count), _marker(state.x))
            self.cache_sharding = state.cache.k.sharding  # where the cache lives (for checks and logs)
            if stage.done_chunk is not None:
                # NaN/Inf flags of the earlier stages only: they are done (or nearly) while this
                # stage runs, so reading them does not make the host wait for this stage
                _raise_non_finite(earlier, total)
                earlier, pending = pending, []
                feed.release(stage.done_chunk)
                yield self._clean_chunk(state, lay, stage.done_chunk, base)
        _raise_non_finite(earlier + pending, total)

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @staticmethod
    def _clean_chunk(state: SamplerState, lay: Layout, chunk: int, base: int) -> jax.Array:
        """A finished chunk's frames (`base`: the chunk in slot 0); prefix frames are not
        handed out again, except that I2V keeps its first chunk whole (the generated version
        of the conditioning frame)."""
        cw = lay.chunk_width
        start = max(chunk * cw, lay.prefix_frames)
        if chunk == 0 and lay.prefix_frames == 1:
            start = 0
        # dispatched before the next stage donates x
        return _handed_out(state.x, start - base * cw, (chunk + 1 - base) * cw)


def _handed_out(x: jax.Array, start: int, stop: int) -> jax.Array:
    """Latent frames [start, stop) of x, as (1, C, T, H, W) this process can read whole.

    The latents are sharded over the mesh; on a pod a host holds only its shards. The frames
    are copied to every device first (a collective every host runs, as all run the sampler),
    and a host reads its own replica. One process with a mesh does the same, so that the
    decoder sees the same single-device array either way.
    """
    if not isinstance(x.sharding, jax.sharding.NamedSharding):
        return x[None, :, start:stop]
    replicated = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
    return _frames_everywhere(x, start, stop, replicated).addressable_data(0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _frames_everywhere(x, start: int, stop: int, replicated):
    # one function: jit keeps a program per (range, mesh) rather than tracing anew per chunk
    return jax.lax.with_sharding_constraint(x[None, :, start:stop], replicated)
