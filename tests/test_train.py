"""Training: the objective agrees with the sampler, the loop learns, resumes exactly, shards.

TINY model, synthetic clips (tests/train_clips.py). The sharded steps run in process on the
session's 8 host devices (conftest.py).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_clips import blob_latents, clips, mechanics_config

from magi_jax import compile_cache, sharding
from magi_jax.dit import DiT
from magi_jax.forward_call import Captions, ForwardCall, Rows, Window
from magi_jax.kv_cache import KVCache
from magi_jax.lora import LoRAConfig
from magi_jax.objective import (
    ObjectiveConfig,
    block_causal_ranges,
    clip_call,
    clip_loss,
    clip_velocity,
    drop_caption,
    sample_chunk_times,
    warp_time,
)
from magi_jax.schedule import init_t
from magi_jax.train import TrainConfig, Trainer, TrainError, checkpoints

CFG = mechanics_config()
STEADY = ObjectiveConfig(caption_dropout=0.0, clean_context_prob=0.0)


def _batch(n=3):
    return clips(CFG, [blob_latents(CFG, 2 * np.pi * i / n) for i in range(n)], list(range(n)))


def test_times_are_monotone_and_warped_like_the_sampler():
    u = jnp.linspace(0, 1, 9)
    np.testing.assert_allclose(warp_time(u), init_t(8), atol=1e-6)  # the sampler's sd3 schedule
    ocfg = ObjectiveConfig(clean_context_prob=0.5)
    saw_clean = False
    for i in range(50):
        u, t, clean = sample_chunk_times(jax.random.key(i), 4, ocfg, CFG.runtime.clean_t)
        assert np.all(np.diff(np.asarray(t)) <= 0), t  # earlier chunks are cleaner
        k = int(clean.sum())
        assert np.all(np.asarray(clean)[:k]) and k < 4  # clean chunks lead, one noisy chunk at least
        np.testing.assert_array_equal(np.asarray(t)[:k], np.float32(CFG.runtime.clean_t))
        saw_clean |= k > 0
    assert saw_clean
    np.testing.assert_array_equal(block_causal_ranges(3, 5), [[0, 5], [0, 10], [0, 15]])
    np.testing.assert_array_equal(block_causal_ranges(3, 5, span=2), [[0, 5], [0, 10], [5, 15]])


def test_window_times_are_the_moments_the_sampler_passes_through():
    """window_prob: the chunks of a clip sit where the sampler's window puts them - staggered by
    1/window in u, a chunk at u = 0 entering, later ones not started - including the first
    chunk alone near pure noise, where every generation starts (sorted uniform times put it
    there about once in 10,000 clips)."""
    window = CFG.runtime.window_size
    ocfg = ObjectiveConfig(clean_context_prob=0.0, window_prob=1.0, window=window)
    first_near_noise = 0
    for i in range(200):
        u, t, clean = sample_chunk_times(jax.random.key(i), 6, ocfg, CFG.runtime.clean_t)
        u, t, clean = np.asarray(u), np.asarray(t), np.asarray(clean)
        assert np.all(np.diff(t) <= 0), t
        moving = (u > 0) & (u < 1) & ~clean
        steps = np.diff(u[moving])
        np.testing.assert_allclose(steps, -1.0 / window, atol=1e-6)  # staggered by one stage
        assert np.all(u[clean] == 1.0) and np.all(clean[: int(clean.sum())])  # clean chunks lead
        first_near_noise += u[0] < 1.0 / window
    assert first_near_noise > 10
    sorted_uniform = ObjectiveConfig(clean_context_prob=0.0)
    firsts = [float(sample_chunk_times(jax.random.key(i), 4, sorted_uniform, 0.9999)[0][0]) for i in range(200)]
    assert sum(f < 1.0 / window for f in firsts) < 3


def test_training_forward_equals_the_kv_cached_sampler_forward():
    """Clean earlier chunks: one block-causal pass over the clip predicts, for the noisy
    chunks, what the sampler computes by caching the clean chunks first and attending to them."""
    model = DiT(CFG.model, rngs=nnx.Rngs(3))
    m, cw = CFG.model, CFG.runtime.chunk_width
    batch = _batch(1)
    x1, cap, mask = batch.latents[0], batch.caption[0], batch.caption_mask[0]
    r, k = x1.shape[1] // cw, 2
    tokens = cw * (x1.shape[2] // m.patch_size) * (x1.shape[3] // m.patch_size)
    noise = np.random.default_rng(0).standard_normal(x1.shape).astype(np.float32)
    t = np.array([CFG.runtime.clean_t] * k + [0.6, 0.2], np.float32)
    tf = np.repeat(t, cw)[None, :, None, None]
    clean = (np.arange(r) < k).repeat(cw)[None, :, None, None]
    xt = np.where(clean, x1, tf * x1 + (1 - tf) * noise).astype(np.float32)

    train = jax.jit(lambda x, t: clip_velocity(model, CFG, x, t, cap, mask, None))(xt, t)

    # sampler order: the clean chunks write the cache (prefix encoding), then the noisy ones read it
    @jax.jit
    def cached_forward(xt, t):
        cache = KVCache.create(m.num_layers, r * tokens, m.num_query_groups, m.kv_channels, jnp.float32)
        frames = jnp.arange(r, dtype=jnp.int32) * cw
        prefix = ForwardCall(
            t=t[:k], kv_range=jnp.asarray(block_causal_ranges(k, tokens)), frame0=frames[:k],
            t_total=jnp.full(k, k * cw), first_chunk=jnp.int32(0), write_count=jnp.int32(k * tokens),
            window=Window(k), rows=Rows(write_row=0),
        )  # fmt: skip
        _, cache = model(xt[:, : k * cw], Captions(cap[None, :k], mask[None, :k]), prefix, cache)
        kv = jnp.asarray(block_causal_ranges(r, tokens)[k:])
        noisy = ForwardCall(
            t=t[k:], kv_range=kv, frame0=frames[k:], t_total=jnp.full(r - k, r * cw),
            first_chunk=jnp.int32(k), write_count=jnp.int32(0), window=Window(r - k), rows=Rows(read_cache=True),
        )  # fmt: skip
        rest = (xt[:, k * cw :], Captions(cap[None, k:], mask[None, k:]))
        with_cache, _ = model(*rest, noisy, cache)
        alone_call = noisy.replace(kv_range=kv - k * tokens, first_chunk=jnp.int32(0), rows=Rows())
        alone, _ = model(*rest, alone_call)
        return with_cache[0], alone[0]

    cached, alone = cached_forward(xt, t)
    scale = np.abs(train).max()
    # rope times of the prefix pass use T_total = k*cw: an identity rescale, equal up to rounding
    np.testing.assert_allclose(np.asarray(cached), np.asarray(train[:, k * cw :]), rtol=0, atol=2e-5 * scale)
    # control: without the cached chunks the noisy chunks' prediction is different
    assert np.abs(np.asarray(alone) - np.asarray(train[:, k * cw :])).max() > 1e-2 * scale


def test_caption_dropout_is_the_unconditional_pass():
    """A dropped clip sees exactly what the sampler's unconditional pass feeds: the learned null
    caption with its 50-token mask and the dropped-caption AdaLN token."""
    model = DiT(CFG.model, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    batch = _batch(1)
    cap, mask = batch.caption[0], batch.caption_mask[0]
    x = batch.latents[0]
    t = np.array([0.9, 0.7, 0.4, 0.1], np.float32)
    r, tokens = 4, 32
    kv = block_causal_ranges(r, tokens)
    call = clip_call(jnp.asarray(t), 2, tokens)  # the training forward's own call
    np.testing.assert_array_equal(call.kv_range, kv)
    np.testing.assert_array_equal(call.frame0, np.arange(r) * 2)
    np.testing.assert_array_equal(call.t_total, np.full(r, 8))

    @jax.jit
    def forwards(params):
        def run(drop):
            p, c, mk = drop_caption(params, cap, mask, drop)
            return nnx.merge(graphdef, p)(x, Captions(c[None], mk[None]), call)[0]

        m = nnx.merge(graphdef, params)
        null = m.y_embedder.null_caption[...]
        null_mask = (jnp.arange(null.shape[0]) < 50).astype(jnp.float32)
        nulls = Captions(
            jnp.broadcast_to(null, (1, r, *null.shape)), jnp.broadcast_to(null_mask, (1, r, null.shape[0]))
        )
        want = m(x, nulls, call.replace(rows=Rows(drop_caption=(True,))))[0]
        ref = m(x, Captions(cap[None], mask[None]), call)[0]
        return run(jnp.bool_(True)), want, run(jnp.bool_(False)), ref

    dropped, want, kept, ref = forwards(params)
    # equal up to float rounding: the two sides are different computations in one program,
    # which XLA may round differently (it does when compiled without optimisations, as the
    # tests are: conftest.py); a wrong caption would be off by 1e-3 or more (last line)
    for got, expected in ((dropped, want), (kept, ref)):
        expected = np.asarray(expected)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert np.abs(np.asarray(want) - np.asarray(ref)).max() > 1e-3  # the caption matters


def test_loss_ignores_clean_context_and_scores_the_velocity():
    """The loss is the mean squared error to x1 - x0 over noisy chunks only: a model that
    predicts that exact velocity on noisy chunks (and anything on clean ones) scores 0."""
    model = DiT(CFG.model, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    clip = jax.tree.map(lambda a: a[0], _batch(1))
    ocfg = ObjectiveConfig(clean_context_prob=1.0, caption_dropout=0.0)
    key = jax.random.key(5)

    @jax.jit
    def both(params):
        loss, aux = clip_loss(graphdef, params, rest, CFG, ocfg, clip, key, 64)
        # replay the draws of clip_loss to build the exact target and check the weighting by hand
        kt, kn, _ = jax.random.split(key, 3)
        u, t, clean = sample_chunk_times(kt, 4, ocfg, CFG.runtime.clean_t)
        x0 = jax.random.normal(kn, clip.latents.shape, jnp.float32)
        tf = jnp.repeat(t, 2)[None, :, None, None]
        xt = jnp.where(jnp.repeat(clean, 2)[None, :, None, None], clip.latents, tf * clip.latents + (1 - tf) * x0)
        pred = clip_velocity(nnx.merge(graphdef, params, rest), CFG, xt, t, clip.caption, clip.caption_mask, None)
        return loss, aux, pred - (clip.latents - x0), clean

    loss, aux, diff, clean = both(params)
    assert aux["clean_chunks"] >= 1 and float(loss) > 0.1
    keep = ~np.repeat(np.asarray(clean), 2)
    err = np.asarray(diff)[:, keep]
    np.testing.assert_allclose(float(loss), float(np.mean(err**2)), rtol=1e-5)


@pytest.mark.slow
def test_shortcut_target_is_two_half_steps_without_gradient():
    """Shortcut distillation: at the finest step count the target is the flow-matching
    velocity; at a coarser one it is the model's own two half steps, and no gradient flows
    through it (the gradient equals that of the prediction against a constant target)."""
    cfg = mechanics_config(engine=dict(distill=True), runtime=dict(cfg_number=1))
    model = DiT(cfg.model, distill=True, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    clip = jax.tree.map(lambda a: a[0], _batch(1))
    ocfg = ObjectiveConfig(shortcut=True, caption_dropout=0.0, clean_context_prob=0.0)
    key = jax.random.key(2)

    def loss(p, n):
        return clip_loss(graphdef, p, rest, cfg, ocfg, clip, key, n)[0]

    def fwd(p, x, tt, e):
        return clip_velocity(nnx.merge(graphdef, p, rest), cfg, x, tt, clip.caption, clip.caption_mask, None, e)

    @jax.jit
    def check(params):
        # by hand: the teacher's two steps at 32 (embedding 16), the student at 16 (embedding 8)
        kt, kn, _ = jax.random.split(key, 3)
        u, t, _ = sample_chunk_times(kt, 4, ocfg, cfg.runtime.clean_t)
        x1 = clip.latents
        x0 = jax.random.normal(kn, x1.shape, jnp.float32)
        per = lambda v: jnp.repeat(v, 2)[None, :, None, None]  # noqa: E731
        xt = per(t) * x1 + (1 - per(t)) * x0
        t2, t3 = warp_time(jnp.minimum(u + 1 / 32, 1)), warp_time(jnp.minimum(u + 1 / 16, 1))
        v1 = fwd(params, xt, t, 16.0)
        v2 = fwd(params, xt + v1 * per(t2 - t), t2, 16.0)
        target = (v1 * per(t2 - t) + v2 * per(t3 - t2)) / per(t3 - t)
        by_hand = lambda p: jnp.mean(jnp.square(fwd(p, xt, t, 8.0) - target))  # noqa: E731
        fm = jnp.mean(jnp.square(fwd(params, xt, t, 32.0) - (x1 - x0)))
        l16, g = jax.value_and_grad(loss)(params, 16)
        h16, g_hand = jax.value_and_grad(by_hand)(params)
        return l16, h16, g, g_hand, loss(params, 64), fm

    l16, h16, g, g_hand, l64, fm = check(params)
    np.testing.assert_allclose(float(l16), float(h16), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_hand)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(l64), float(fm), rtol=1e-5)


def test_bad_train_options_are_refused():
    with pytest.raises(TrainError, match="grad_accum"):
        TrainConfig(batch_size=3, grad_accum=2).check(CFG)
    with pytest.raises(TrainError, match="shortcut"):
        TrainConfig(objective=ObjectiveConfig(shortcut=True)).check(CFG)
    distill = CFG.replace(engine=dict(distill=True), runtime=dict(cfg_number=1))
    with pytest.raises(TrainError, match="--shortcut"):
        TrainConfig().check(distill)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four steps straight through, and two + save + restore + two, from the same start."""
    out = tmp_path_factory.mktemp("run")
    tcfg = TrainConfig(learning_rate=1e-3, warmup_steps=1, batch_size=4, grad_accum=2, save_every=2, seed=3)
    batches = [_batch(4) for _ in range(4)]

    a = Trainer(DiT(CFG.model, rngs=nnx.Rngs(0)), CFG, tcfg)
    state = a.init_state()
    straight = []
    for s in range(4):
        state, m = a.step(state, batches[s])
        straight.append(float(m["loss"]))
        if s == 1:
            a.save(state, out)
    b = a  # one compiled step for both runs; the state comes back from disk
    resumed_state = b.restore(checkpoints(out)[-1])
    resumed = []
    for s in range(2, 4):
        resumed_state, m = b.step(resumed_state, batches[s])
        resumed.append(float(m["loss"]))
    return dict(out=out, straight=straight, resumed=resumed, state=state, resumed_state=resumed_state, trainer=a)


@pytest.mark.slow
def test_resume_is_bit_identical(trained):
    assert trained["resumed"] == trained["straight"][2:]
    for x, y in zip(jax.tree.leaves(trained["state"]), jax.tree.leaves(trained["resumed_state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [p.name for p in checkpoints(trained["out"])] == ["step_00000002"]
    assert not list(Path(trained["out"]).glob(".*tmp*"))  # nothing half-written is left


@pytest.mark.slow
def test_resume_refuses_another_state(trained, tmp_path):
    from magi_jax.lora import LoRAConfig

    other = Trainer(DiT(CFG.model, rngs=nnx.Rngs(0)), CFG, TrainConfig(lora=LoRAConfig(rank=2)))
    with pytest.raises(TrainError, match="another train state"):
        other.restore(checkpoints(trained["out"])[-1])


def test_master_weights_are_float32_for_a_bf16_model():
    """bf16 parameters train through float32 master weights and float32 AdamW state; each
    forward sees the parameters in bf16. `master_dtype="param"` keeps everything in bf16."""
    cfg = CFG.replace(model=dict(params_dtype="bfloat16"))
    tr = Trainer(DiT(cfg.model, rngs=nnx.Rngs(0)), cfg, TrainConfig(batch_size=2))
    state = tr.init_state()
    f32 = jnp.dtype(jnp.float32)
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {f32}
    assert {a.dtype for a in jax.tree.leaves(state.opt_state) if a.ndim} == {f32}
    forward = {p: v.get_value().dtype for p, v in nnx.to_flat_state(nnx.state(tr.model(state)))}
    assert forward[("segments", 0, "layers", "q", "kernel")] == jnp.bfloat16  # cast back for the forward
    assert forward == {p: v.get_value().dtype for p, v in nnx.to_flat_state(nnx.state(DiT(cfg.model)))}
    lean = Trainer(DiT(cfg.model, rngs=nnx.Rngs(0)), cfg, TrainConfig(batch_size=2, master_dtype="param"))
    lean_state = lean.init_state()
    assert jnp.dtype(jnp.bfloat16) in {a.dtype for a in jax.tree.leaves(lean_state.params)}
    assert jnp.dtype(jnp.bfloat16) in {a.dtype for a in jax.tree.leaves(lean_state.opt_state) if a.ndim}


@pytest.mark.slow
def test_overfits_a_handful_of_clips():
    """The loop learns: on three synthetic clips the loss falls below a third of its start
    within 150 steps (fixed seeds, deterministic)."""
    tcfg = TrainConfig(learning_rate=1e-2, warmup_steps=10, total_steps=150, batch_size=3, objective=STEADY)
    tr = Trainer(DiT(CFG.model, rngs=nnx.Rngs(0)), CFG, tcfg)
    state = tr.init_state()
    batch = _batch(3)
    losses = []
    for _ in range(150):
        state, m = tr.step(state, batch)
        losses.append(float(m["loss"]))
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert end < start / 3, (start, end, losses[::10])


def _train_steps(tcfg, batch, mesh, steps=2):
    trainer = Trainer(DiT(CFG.model, rngs=nnx.Rngs(0)), CFG, tcfg, mesh)
    state = trainer.init_state()
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.slow
@pytest.mark.parametrize("kind,mesh_text", [("full", "data=2,model=4"), ("lora", "data=8")])
def test_sharded_step_equals_single_device(kind, mesh_text):
    """Two train steps (grad_accum 2) on a mesh of the session's 8 host devices equal the
    single-device steps, compile once, and parameters stay in the rules table's layout."""
    assert jax.device_count() == 8
    batch = clips(CFG, [blob_latents(CFG, a) for a in np.linspace(0, 3, 8)], list(range(8)))
    lcfg = LoRAConfig(rank=4) if kind == "lora" else None
    tcfg = TrainConfig(
        learning_rate=1e-3, warmup_steps=1, batch_size=8, grad_accum=2, lora=lcfg, objective=ObjectiveConfig()
    )
    ref_state, ref_losses = _train_steps(tcfg, batch, None)
    ref = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(ref_state.params)}
    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text))
    with compile_cache.recording() as stats:
        state, losses = _train_steps(tcfg, batch, mesh)
    assert sum("_train_step" in name for name in stats.compiled) == 1, "later steps reuse the first one's program"
    got = {p: v.get_value() for p, v in nnx.to_flat_state(state.params)}
    want = sharding.shardings(state.params, mesh)

    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5 * max(ref_losses)
    # Adam normalises updates, so compare with the step size: far below one update
    assert max(float(np.abs(np.asarray(got[p]) - ref[p]).max()) for p in ref) <= 0.05 * tcfg.learning_rate
    assert [str(p) for p, a in got.items() if not a.sharding.is_equivalent_to(want[p], a.ndim)] == []
    if kind == "full":  # the model axis is really used
        assert sum(any(a is not None for a in want[p].spec) for p in want) > 0
