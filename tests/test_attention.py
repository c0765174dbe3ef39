"""Attention: each chunk reads exactly its visible keys, in every implementation.

The reference is a plain softmax over a boolean mask in float64 (numpy). The implementations
read a key buffer laid out by global position: a chunk's range is a contiguous run of rows,
read as blocks over the range only (xla, pallas) or as a static-size slice with a length
(cudnn, dpa). The Pallas kernel runs here in Pallas's interpreter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax import attention, pallas_attention
from magi_jax.attention import (
    KeyBuffer,
    KeyParts,
    _flash,
    _Tiles,
    available_implementations,
    chunk_cross_attention,
    chunk_self_attention,
    implementation,
    key_buffer,
    used_caption_tokens,
)

# what runs here, plus the TPU kernel in Pallas's interpreter
IMPLEMENTATIONS = sorted(set(available_implementations()) | {"pallas"})


def _softmax_ref(q, k, v, visible):
    """q (N, H, D), k/v (K, G, D), visible (K,) -> (N, H, D) float64; no visible key: zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, h, d = q.shape
    g = k.shape[1]
    out = np.zeros((n, h, d))
    if not visible.any():
        return out
    for head in range(h):
        kv = head // (h // g)
        s = q[:, head] @ k[visible, kv].T / np.sqrt(d)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, head] = (p / p.sum(axis=1, keepdims=True)) @ v[visible, kv]
    return out


def _rand(shape, seed, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)


def _chunks(n=8, r=4, h=4, g=2, d=8, rows=40, dtype=jnp.float32):
    q = _rand((r, n, h, d), 0, dtype, 2.0)  # queries by chunk
    k = _rand((rows, g, d), 1, dtype, 2.0)
    v = _rand((rows, g, d), 2, dtype)
    return q, k, v


@pytest.mark.parametrize("split_edge", [False, True], ids=["masked", "split_edge"])
@pytest.mark.parametrize("block", [3, 8, 16, 64])
def test_flash_loop_equals_softmax_over_the_range(block, split_edge):
    # ranges that start and end inside blocks, reach the buffer's end, and are empty
    q, k, v = _chunks()
    qt = jnp.asarray(q[0].reshape(8, 2, 2, 8).transpose(1, 2, 0, 3).reshape(2, 16, 8))
    for lo, hi in [(0, 40), (5, 29), (33, 40), (17, 18), (12, 12)]:
        tiles = _Tiles(8, block, -(-40 // block), split_edge)
        got = _flash(qt, jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1), jnp.int32(lo), jnp.int32(hi), tiles)
        got = np.asarray(got).reshape(2, 2, 8, 8).transpose(2, 0, 1, 3).reshape(8, 4, 8)
        visible = (np.arange(40) >= lo) & (np.arange(40) < hi)
        np.testing.assert_allclose(got, _softmax_ref(q[0], k, v, visible), atol=2e-6, err_msg=f"[{lo}, {hi})")


def test_gqa_head_mapping():
    # query head h reads kv head h // (H / G): give kv head 1 zero values
    q, k, v = _chunks()
    v = v.at[:, 1].set(0.0)
    out = np.asarray(chunk_self_attention(q, KeyBuffer(k, v, 0), jnp.array([[0, 40]] * 4, jnp.int32), 8, impl="xla"))
    assert np.abs(out[..., 2:, :]).max() == 0 and np.abs(out[..., :2, :]).max() > 0


def _sampler_like(dtype, seed=0):
    """Keys as a forward sees them: a cache window read below new_start, then this call's keys;
    kv ranges like the sampler's (growing, one cut by the span, the near-clean copy alone, one
    empty)."""
    n, r, window, h, g, d = 8, 5, 24, 4, 2, 8
    q = _rand((r, n, h, d), seed, dtype)  # queries by chunk
    k_new, v_new = _rand((r * n, g, d), seed + 1, dtype), _rand((r * n, g, d), seed + 2, dtype)
    start, new_start = 4, 20  # window rows cover positions 4..27; 20..27 are unwritten (zero)
    written = (start + np.arange(window)) < new_start
    kw = jnp.where(written[:, None, None], _rand((window, g, d), seed + 3, dtype), 0)
    vw = jnp.where(written[:, None, None], _rand((window, g, d), seed + 4, dtype), 0)
    ranges = jnp.array([[4, 28], [4, 36], [12, 44], [44, 52], [60, 60]], jnp.int32)
    return q, (kw, vw, start), (k_new, v_new, new_start), ranges, n


def _sampler_like_ref(q, window, new, ranges, n, span):
    kw, vw, start = window
    k_new, v_new, new_start = new
    pos = np.concatenate([start + np.arange(kw.shape[0]), new_start + np.arange(k_new.shape[0])])
    ok = np.concatenate([start + np.arange(kw.shape[0]) < new_start, np.ones(k_new.shape[0], bool)])
    k, v = np.concatenate([np.asarray(kw, np.float64), k_new]), np.concatenate([np.asarray(vw, np.float64), v_new])
    out = []
    for c, (lo, hi) in enumerate(np.asarray(ranges)):
        visible = ok & (pos >= lo) & (pos < min(hi, lo + span))
        out.append(_softmax_ref(q[c], k, v, visible))
    return np.stack(out)


def test_key_buffer_rows_are_global_positions():
    q, window, new, ranges, n = _sampler_like(jnp.float32)
    k, v, base = key_buffer(new[0], new[1], new[2], window)
    assert int(base) == 4 and k.shape[0] == 24 + 40
    np.testing.assert_array_equal(k[:16], window[0][:16])  # positions 4..19: cache
    np.testing.assert_array_equal(k[16:56], new[0])  # positions 20..59: this call
    assert np.all(np.asarray(k[56:]) == 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_available_implementation_matches_the_reference(impl, dtype):
    if dtype == jnp.float32 and impl in ("cudnn", "pallas"):
        pytest.skip("fused kernels take 16-bit inputs; float32 uses the reference")
    q, window, new, ranges, n = _sampler_like(dtype)
    k, v, base = key_buffer(*new[:2], new[2], window)
    span = 16  # the [4, 36) chunk sees its first 16 keys only
    got = np.asarray(chunk_self_attention(q, KeyBuffer(k, v, base), ranges, n, span, impl=impl), np.float32)
    want = _sampler_like_ref(q, window, new, ranges, n, span)
    tol = 2e-6 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, want, atol=tol)
    assert np.all(got[4:] == 0), "a chunk with no visible key gets zeros"

    cap_k, cap_v = _rand((5, 10, 2, 8), 7, dtype), _rand((5, 10, 2, 8), 8, dtype)
    lengths = np.array([7, 10, 0, 1, 3])
    cap_mask = jnp.asarray(np.arange(10)[None] < lengths[:, None])  # prefixes, one empty
    for block in (None, 4):  # one key block, or the sampler's fixed blocks (Window.caption_block)
        got = np.asarray(chunk_cross_attention(q, cap_k, cap_v, cap_mask, block, impl=impl), np.float32)
        for c in range(5):
            want = _softmax_ref(q[c], cap_k[c], cap_v[c], np.arange(10) < lengths[c])
            np.testing.assert_allclose(got[c], want, atol=tol, err_msg=f"chunk {c}, block {block}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_keys_outside_a_chunks_slice_are_never_read(impl):
    # NaN keys/values before each range's start and past start + span: a masked read would
    # still multiply them (0 * NaN = NaN). The fused kernels get 16-bit inputs, as
    # `implementation` gives them (cuDNN refuses float32; on a GPU, Pallas's interpreter
    # multiplies float32 in TF32).
    fused = impl in ("cudnn", "pallas")
    dtype, tol = (jnp.bfloat16, 3e-2) if fused else (jnp.float32, 2e-6)
    q, k, v = _chunks(rows=64, dtype=dtype)
    ranges = jnp.array([[8, 24], [16, 32], [24, 40], [40, 56]], jnp.int32)
    span = 16
    rows = np.arange(64)
    for c, lo in enumerate(np.asarray(ranges)[:, 0]):
        poison = (rows < lo) | (rows >= lo + span)
        kc = jnp.where(poison[:, None, None], jnp.nan, k)
        vc = jnp.where(poison[:, None, None], jnp.nan, v)
        out = np.asarray(chunk_self_attention(q, KeyBuffer(kc, vc, 0), ranges, 8, span, impl=impl))[c]
        np.testing.assert_allclose(np.asarray(out, np.float32), _softmax_ref(q[c], k, v, ~poison), atol=tol)


def _equations(fn, *args):
    """Every equation of fn's traced program, those of nested programs (maps, conditionals,
    custom rules, kernels) included."""

    def walk(j):
        for e in j.eqns:
            yield e
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    sub = getattr(sub, "jaxpr", sub)  # a closed program's own
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i != "xla"])
def test_fused_paths_slice_without_sorting_gathering_or_repeating(impl):
    # the kernels get each chunk's `span` rows (no sort, no gather, no copy per query head)
    q, window, new, ranges, n = _sampler_like(jnp.bfloat16)
    keys = key_buffer(*new[:2], new[2], window)
    attend = lambda q, keys, ranges: chunk_self_attention(q, keys, ranges, n, 16, impl=impl)  # noqa: E731
    prims = {e.primitive.name for e in _equations(attend, q, keys, ranges)}
    assert not prims & {"sort", "gather", "argsort"}, prims


def test_the_pallas_kernel_on_a_mesh_equals_one_device():
    """Heads over `model` and each chunk's queries over `seq` (8 tokens a chunk on seq=3: padded
    to 9, the padding's outputs dropped): the same numbers as one device."""
    from magi_jax import sharding

    q, window, new, ranges, n = _sampler_like(jnp.bfloat16)
    keys = key_buffer(*new[:2], new[2], window)
    cap_k, cap_v = _rand((5, 10, 2, 8), 7, jnp.bfloat16), _rand((5, 10, 2, 8), 8, jnp.bfloat16)
    cap_mask = jnp.asarray(np.arange(10)[None] < np.array([7, 10, 0, 1, 3])[:, None])

    parts = KeyParts(new[0], new[1], jnp.int32(new[2]), window)

    def both(q, keys, cap_k, cap_v):
        a = chunk_self_attention(q, keys, ranges, n, 16, impl="pallas")
        in_place = chunk_self_attention(q, parts, ranges, n, 16, impl="pallas")
        return a, in_place, chunk_cross_attention(q, cap_k, cap_v, cap_mask, impl="pallas")

    host = jax.devices("cpu")  # the session's 8 host devices, also beside a single GPU
    with jax.default_device(host[0]):
        want = jax.jit(both)(q, keys, cap_k, cap_v)
    mesh = sharding.make_mesh(sharding.parse_mesh("model=2,seq=3", 6), host[:6])
    assert n % 3
    with jax.set_mesh(mesh):
        got = jax.jit(both)(q, keys, cap_k, cap_v)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _kernel_operands(fn, *args):
    """Shapes of every operand of every Pallas kernel call in fn's program."""
    return [[tuple(v.aval.shape) for v in e.invars] for e in _equations(fn, *args) if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("k_tile", [512, 8], ids=["one_block_each", "blocks_of_8"])
@pytest.mark.parametrize("span", [16, None], ids=["span16", "whole"])
def test_the_pallas_kernel_reads_the_cache_window_and_the_call_keys_where_they_lie(span, k_tile, monkeypatch):
    """Given KeyParts, the kernel reads the window and this call's keys as two buffers (no
    joined buffer of W + S rows is built) with the joined buffer's numbers; the window's
    unwritten rows (NaN here) are never read. With key blocks of 8 rows the window is 3 blocks
    and the call's keys 5: ranges start and end inside blocks, and cross from one buffer into
    the other."""
    monkeypatch.setattr(pallas_attention, "K_TILE", k_tile)
    q, (kw, vw, start), (k_new, v_new, new_start), ranges, n = _sampler_like(jnp.bfloat16)
    unwritten = (start + np.arange(kw.shape[0]) >= new_start)[:, None, None]
    window = (jnp.where(unwritten, jnp.nan, kw), jnp.where(unwritten, jnp.nan, vw), start)
    parts = KeyParts(k_new, v_new, jnp.int32(new_start), window)

    def run(q, parts):
        return chunk_self_attention(q, parts, ranges, n, span, impl="pallas")

    got = np.asarray(run(q, parts), np.float32)
    want = _sampler_like_ref(q, (kw, vw, start), (k_new, v_new, new_start), ranges, n, span or 64)
    np.testing.assert_allclose(got, want, atol=3e-2)
    assert np.all(got[4:] == 0), "a chunk with no visible key gets zeros"

    g, d, w, s = k_new.shape[1], k_new.shape[2], kw.shape[0], k_new.shape[0]
    operands = _kernel_operands(run, q, parts)
    assert operands, "no Pallas kernel in the program"
    for shapes in operands:
        assert (g, w, d) in shapes and (g, s, d) in shapes, shapes
        assert not any(len(sh) == 3 and sh[1] == w + s for sh in shapes), shapes


def test_gradients_through_the_window_and_call_keys_equal_the_joined_buffers(monkeypatch):
    """Training's backward through the in-place reads is the joined buffer's. (The backward
    recomputes through Pallas's TPU flash kernel, which has no interpreter: here through the
    xla path, for both.)"""

    def flash_here(qc, kt, vt, lo, hi, span):
        k, v = jnp.swapaxes(kt, 0, 1), jnp.swapaxes(vt, 0, 1)
        return attention._xla(qc, k, v, lo, hi, attention._Tiles(8, 8, -(-k.shape[0] // 8)))

    monkeypatch.setattr(attention, "_flash_by_slices", flash_here)
    q, window, (k_new, v_new, new_start), ranges, n = _sampler_like(jnp.bfloat16)

    def loss(q, kw, vw, k_new, v_new, joined):
        parts = KeyParts(k_new, v_new, jnp.int32(new_start), (kw, vw, window[2]))
        keys = parts.joined() if joined else parts
        out = chunk_self_attention(q, keys, ranges, n, 16, impl="pallas")
        return jnp.sum(out.astype(jnp.float32) * jnp.linspace(-1, 1, out.size).reshape(out.shape))

    args = (q, window[0], window[1], k_new, v_new)
    grads = [jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args, j) for j in (False, True)]
    for got, want in zip(*grads):
        assert np.abs(np.asarray(want, np.float32)).max() > 0
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_the_pallas_kernel_walks_only_the_key_blocks_of_each_range():
    """Block sparsity: for every range, the steps that compute are exactly the key blocks the
    range touches, each reads the block whose rows it masks against, and the steps after the
    range read the range's last block again (an unchanged block index is not copied)."""
    rng = np.random.default_rng(0)
    k_tile, rows = 128, 1000
    last = -(-rows // k_tile) - 1
    lo = rng.integers(0, rows, 400)
    hi = np.minimum(lo + rng.integers(0, 600, 400), rows)
    hi[:20] = lo[:20]  # empty ranges
    span = int((hi - lo).max())
    steps = min(-(-span // k_tile) + 1, last + 1)
    lo_, hi_ = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
    read = np.stack([np.asarray(pallas_attention.key_block(lo_, hi_, j, k_tile, last)) for j in range(steps)], 1)
    work = np.stack([np.asarray(pallas_attention.computes(lo_, hi_, j, k_tile)) for j in range(steps)], 1)
    start = np.stack([np.asarray(pallas_attention.block_start(lo_, j, k_tile)) for j in range(steps)], 1)
    for c in range(len(lo)):
        touched = set(range(lo[c] // k_tile, -(-hi[c] // k_tile))) if hi[c] > lo[c] else set()
        assert set(read[c][work[c]]) == touched and work[c].sum() == len(touched), (lo[c], hi[c])
        np.testing.assert_array_equal(read[c][work[c]] * k_tile, start[c][work[c]])
        idle = read[c][~work[c]]
        assert np.all(idle == (max(touched) if touched else lo[c] // k_tile)), (lo[c], hi[c], read[c])
    assert work.sum() < 0.6 * work.size  # most steps of the short ranges are skipped


def test_used_caption_tokens_cuts_shared_padding():
    mask = np.zeros((2, 3, 800), np.float32)
    mask[0, :, :50] = 1
    mask[1, 1, :66] = 1
    assert used_caption_tokens(mask) == 80  # 66 rounded up to a multiple of 16
    assert used_caption_tokens(mask, multiple=1) == 66
    assert used_caption_tokens(np.ones((1, 800))) == 800
    assert used_caption_tokens(np.zeros((1, 800))) == 16


@pytest.mark.parametrize(
    "backend, dtype, env, want",
    [
        ("cpu", jnp.bfloat16, None, "xla"),
        ("gpu", jnp.bfloat16, None, "cudnn"),
        ("gpu", jnp.float32, None, "xla"),
        ("tpu", jnp.bfloat16, None, "pallas"),
        ("cpu", jnp.bfloat16, "dpa", "dpa"),
    ],
)
def test_implementation_follows_the_backend(monkeypatch, backend, dtype, env, want):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: backend)
    if env:
        monkeypatch.setenv("MAGI_ATTENTION", env)
    else:
        monkeypatch.delenv("MAGI_ATTENTION", raising=False)
    assert implementation(dtype) == want


def test_unknown_implementation_is_refused(monkeypatch):
    monkeypatch.setenv("MAGI_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="MAGI_ATTENTION='fastest'"):
        implementation()


@pytest.mark.parametrize("variant", ["tiny", "4.5B_base", "4.5B_distill", "24B_base"])
def test_every_scheduled_range_fits_the_static_span(variant):
    # a range wider than its call's span would be cut: the span each planned call carries
    # (Window.kv_span) must bound every range the sampler and the prefix encoding give a chunk
    from magi_jax.config import load_config
    from magi_jax.sampler_plan import layout, plan, prefix_call

    cfg = load_config(variant).replace(runtime=dict(video_size_h=128, video_size_w=128, num_frames=96))
    lay = layout(cfg, prefix_frames=2 * cfg.runtime.chunk_width * 4)
    calls = [prefix_call(cfg, lay)] + [g.steps.call for stage in plan(cfg, lay) for g in stage.groups]
    spans = {call.window.kv_span for call in calls}
    assert len(spans) == 1, spans  # one bound for the run
    span = spans.pop()
    assert span is not None and span < lay.chunk_num * lay.chunk_tokens  # a real bound
    widest = max(int(np.diff(np.asarray(call.kv_range), axis=-1).max()) for call in calls)
    assert widest <= span, (widest, span)
    assert widest == span  # and the tightest one
