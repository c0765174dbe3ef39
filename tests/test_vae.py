"""The VAE against upstream's fixtures (kind `vae`), its converter's strictness and its input checks.

Two fixture shapes share the kind, told apart by their JSON:
  * direct calls (`cases[]`): encoder / decoder / posterior of ViTVAE on a video in [-1, 1],
    including the single-frame paths; one test per case;
  * the pixel pipeline (`pipeline`): uint8 video -> tiled encode -> latents and latents ->
    tiled decode -> frames, with the pipeline's tiles and with small tiles that make
    spatial / temporal tiling and blending happen; one test per output (decode outputs of
    one call share a test).
Sizes, tiles, fps, scale factor and dtypes are read from each fixture's JSON.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import parity
import pytest
from flax import nnx
from jax.extend.core import Var

from magi_jax.convert import ConversionError
from magi_jax.safetensors_io import save_file
from magi_jax.torch_weights import open_torch_weights
from magi_jax.vae import RELEASED, TINY, VaeConfig, VaeConfigError, VaeModel
from magi_jax.vae_runtime import Vae
from magi_jax.vae_tiling import (
    TileConfig,
    decode_tiles_traced,
    flattens_to_view,
    model_to_uint8,
    plan,
    run_tiles,
    to_uint8_traced,
)
from magi_jax.vae_weights import build_vae, convert_vae, load_vae, random_vae, vae_rules

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# arrays without their own tolerance entry are held to the array they are a slice / the same call of
DERIVED_TOLERANCE = {"mean": "moments", "logvar": "moments", "decode_first_latent": "decode"}


def _tolerance(fx, key: str) -> dict:
    tol = fx.meta["tolerance"]
    if key in tol:
        return tol[key]
    case, name = key.rsplit("/", 1)
    return tol[f"{case}/{DERIVED_TOLERANCE[name]}"]


def _reference(fx, key: str) -> np.ndarray:
    arr = fx.arrays[key]
    if fx.meta["arrays"][key].get("encoding", "").startswith("bfloat16 bit pattern"):
        arr = arr.view(ml_dtypes.bfloat16)
    return arr


@functools.cache
def _vae(fx) -> Vae:
    """The fixture's VAE, weights through the real converter, in the dtype upstream ran."""
    cfg = VaeConfig.from_json_dict(fx.meta["config"], source=fx.name)
    if "pipeline" in fx.meta:
        # the pipeline's VAE is `.bfloat16()`; its encode output carries that dtype
        enc = next(k for k in fx.meta["arrays"] if k.startswith("encode/"))
        dtype = DTYPES[fx.meta["arrays"][enc]["upstream_dtype"]]
        return Vae(
            build_vae(cfg, convert_vae(fx.weights, cfg, dtype), dtype), scale_factor=fx.meta["pipeline"]["scale_factor"]
        )
    case = fx.meta["cases"][0]["name"]
    dtype = DTYPES[fx.meta["arrays"][f"{case}/moments"]["upstream_dtype"]]
    return Vae(build_vae(cfg, convert_vae(fx.weights, cfg, dtype), dtype))


# --------------------------------------------------------------------------------------
# direct encoder / decoder calls
# --------------------------------------------------------------------------------------


def _direct_cases(fx):
    if "cases" in fx.meta:
        for case in fx.meta["cases"]:
            yield case["name"], case


@pytest.mark.parametrize("fx,case", parity.cases("vae", _direct_cases))
def test_direct_calls(fx, case):
    vae, name, arrays = _vae(fx), case["name"], fx.meta["arrays"]
    video = fx.arrays[f"{name}/video"]
    z = vae.config.z_chans
    got = {}
    moments = np.asarray(vae.moments(video))
    got["moments"] = moments
    got["mean"] = moments[:, :z]
    got["logvar"] = np.clip(moments[:, z:], -30.0, 20.0)
    got["encode"] = vae.encode(video)
    got["encode_first_frame"] = vae.encode(video[:, :, :1])
    # the decoder is fed upstream's own latents, so its check is independent of the encoder's
    if f"{name}/decode" in arrays:
        got["decode"] = vae.decode(fx.arrays[f"{name}/mean"])
    if f"{name}/decode_first_latent" in arrays:
        got["decode_first_latent"] = vae.decode(fx.arrays[f"{name}/encode_first_frame"])
    checked = 0
    for what, value in got.items():
        key = f"{name}/{what}"
        if key in arrays:
            parity.check_array(value, _reference(fx, key), _tolerance(fx, key), f"{fx.name}/{key}")
            checked += 1
    assert checked >= 4, f"{fx.name}/{name}: expected moments/encode/decode arrays, found {checked}"


# --------------------------------------------------------------------------------------
# the pixel pipeline with tiling
# --------------------------------------------------------------------------------------


def _tiles(fx, key: str) -> TileConfig:
    pipe = fx.meta["pipeline"]
    return TileConfig.from_upstream(pipe["pipeline_tiles"] if "/pipeline" in key else pipe["small_tiles"])


def _pipeline_cases(fx):
    if "pipeline" not in fx.meta:
        return
    decodes = {}
    for key in fx.meta["arrays"]:
        if key.startswith("encode/"):
            yield key, {"op": "encode", "outputs": [key]}
        elif key.startswith("decode/") and key != "decode/latent":
            group = key.removesuffix("_uint8").removesuffix("_float")
            decodes.setdefault(group, []).append(key)
    for group, keys in decodes.items():
        yield group, {"op": "decode", "outputs": keys}


@pytest.mark.parametrize("fx,case", parity.cases("vae", _pipeline_cases))
def test_pixel_pipeline(fx, case):
    vae = _vae(fx)
    for key in case["outputs"]:
        tiles, ref = _tiles(fx, key), _reference(fx, key)
        if case["op"] == "encode":
            video = fx.arrays["input/video_thwc_uint8"]
            got = vae.encode_image(video[0], tiles) if key.endswith("_image") else vae.encode_pixels(video, tiles)
            assert got.dtype == np.dtype(DTYPES[fx.meta["arrays"][key]["upstream_dtype"]])
            got = got[None]
        elif key.endswith("_uint8"):
            got = vae.decode_latents(fx.arrays["decode/latent"], tiles)
            assert got.dtype == np.uint8
            got = got.transpose(0, 3, 1, 2)
        else:
            got = vae.decode_float(fx.arrays["decode/latent"], tiles).transpose(0, 3, 1, 2)
        parity.check_array(got, ref, _tolerance(fx, key), f"{fx.name}/{key}")


# --------------------------------------------------------------------------------------
# config and converter strictness
# --------------------------------------------------------------------------------------


def _direct_fixture():
    found = [fx for fx in parity.fixtures("vae") if "cases" in fx.meta]
    if not found:
        pytest.skip("no direct-call VAE fixture")
    return found[0]


def test_released_config_and_tiny():
    assert (RELEASED.embed_dim, RELEASED.depth, RELEASED.num_heads, RELEASED.z_chans) == (1024, 24, 16, 16)
    assert (RELEASED.patch_length, RELEASED.patch_size, RELEASED.unpatch_channels) == (4, 8, 4)
    released_json = {"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": dict(RELEASED.__dict__)}
    released_json["ddconfig"].pop("norm_eps")
    assert VaeConfig.from_json_dict(released_json) == RELEASED
    assert TINY.patch_volume == RELEASED.patch_volume and TINY.z_chans == 16
    vae = random_vae(TINY, jnp.float32)
    z = vae.encode(np.zeros((1, 3, 8, 16, 24), np.float32))
    assert z.shape == (1, 16, 2, 2, 3)
    assert vae.decode(z).shape == (1, 3, 8, 16, 24)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"_class_name": "AutoencoderKL"}, "_class_name"),
        ({"model_type": "vit_ncthw"}, "model_type"),
        ({"ddconfig": {"depth": 2, "unknown_knob": 1}}, "unknown_knob"),
        ({"ddconfig": {"depth": "2"}}, "ddconfig.depth"),
        ({"ddconfig": {"conv_last_layer": False}}, "conv_last_layer"),
        ({"ddconfig": {"use_rope": True, "conv_last_layer": True}}, "use_rope"),
    ],
)
def test_config_errors_name_the_field(change, message):
    base = {"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {"conv_last_layer": True}}
    base.update(change)
    with pytest.raises(VaeConfigError, match=message):
        VaeConfig.from_json_dict(base)


def _rewrite(src, dst, edit):
    ckpt = open_torch_weights(src)
    tensors = {k: np.array(ckpt.get(k)) for k in ckpt.keys()}
    ckpt.close()
    edit(tensors)
    save_file(tensors, dst)


def test_converter_names_missing_unexpected_and_misshaped_keys(tmp_path):
    fx = _direct_fixture()
    cfg = VaeConfig.from_json_dict(fx.meta["config"])
    assert {r.torch_key for r in vae_rules(cfg)} >= {"encoder.patch_embed.proj.weight", "decoder.last_layer.bias"}

    def edit(t):
        del t["decoder.blocks.1.mlp.fc2.bias"]
        t["encoder.blocks.0.attn.extra"] = np.zeros(3, np.float32)
        t["encoder.pos_embed"] = t["encoder.pos_embed"][:, :-1]

    bad = tmp_path / "bad.safetensors"
    _rewrite(fx.weights, bad, edit)
    with pytest.raises(ConversionError) as err:
        convert_vae(bad, cfg, jnp.float32)
    text = str(err.value)
    assert "missing key 'decoder.blocks.1.mlp.fc2.bias'" in text
    assert "unexpected key 'encoder.blocks.0.attn.extra'" in text
    assert "key 'encoder.pos_embed' has shape" in text and "expected [1, " in text


@pytest.mark.parametrize("changes", [{}, {"ln_in_attn": False, "qkv_bias": False}], ids=["released", "norm1"])
def test_converter_round_trip(tmp_path, changes):
    """Our parameters written under upstream's names (inverse layouts) convert back exactly."""
    cfg = TINY.replace(depth=2, **changes)
    model = VaeModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {}
    for rule in vae_rules(cfg):
        for key, slot in rule.keys():
            ours = flat[rule.path] if slot is None else flat[rule.path][slot]
            transposed = rule.transform.name in ("linear", "conv3d->linear")
            tensors[key] = (ours.T if transposed else ours).reshape(rule.transform.torch_shape(ours.shape))
    assert ("encoder.blocks.1.norm1.weight" in tensors) == (not cfg.ln_in_attn)
    assert ("decoder.blocks.0.attn.qkv.bias" in tensors) == cfg.qkv_bias
    save_file(tensors, tmp_path / "w.safetensors")
    back = convert_vae(tmp_path / "w.safetensors", cfg, jnp.float32)
    assert back.keys() == flat.keys()
    for path, arr in flat.items():
        np.testing.assert_array_equal(back[path], arr, err_msg=str(path))
    video = np.random.default_rng(0).uniform(-1, 1, (1, 3, 4, 16, 16)).astype(np.float32)
    got = Vae(build_vae(cfg, back, jnp.float32)).encode(video)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Vae(model).encode(video)))


def test_load_vae_reads_config_json(tmp_path):
    fx = _direct_fixture()
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fx.meta["config"]))
    shutil.copy(fx.weights, folder / "diffusion_pytorch_model.safetensors")
    vae = load_vae(folder, jnp.float32)
    assert vae.config == VaeConfig.from_json_dict(fx.meta["config"])
    case = fx.meta["cases"][0]["name"]
    video = fx.arrays[f"{case}/video"]
    np.testing.assert_array_equal(np.asarray(vae.encode(video)), np.asarray(_vae(fx).encode(video)))

    # a config that disagrees with the weights is a named conversion error, not a silent load
    deeper = json.loads(json.dumps(fx.meta["config"]))
    deeper["ddconfig"]["depth"] += 1
    (folder / "config.json").write_text(json.dumps(deeper))
    with pytest.raises(ConversionError, match=r"missing key 'encoder\.blocks\.\d+\.attn\.qkv\.weight'"):
        load_vae(folder, jnp.float32)


# --------------------------------------------------------------------------------------
# input checks, tiling mechanics
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    return random_vae(TINY, jnp.bfloat16)


class _NoDevice:
    """Stands in for the per-tile calls: the checks must fire before any of them."""

    def __call__(self, *a):
        raise AssertionError("device work started before the input was checked")


@pytest.mark.parametrize(
    "shape,message",
    [
        ((4, 60, 64, 3), r"height 60 is not a multiple of 8 \(nearest valid: 56 or 64\)"),
        ((4, 64, 70, 3), r"width 70 is not a multiple of 8 \(nearest valid: 72\)"),
        ((6, 64, 64, 3), r"6 frames: the VAE takes 1 frame or a multiple of 4 \(nearest valid: 4 or 8\)"),
        ((2, 64, 64, 3), r"2 frames: .* \(nearest valid: 1\)"),
        ((4, 64, 64, 4), r"expected a video \(T, H, W, 3\)"),
    ],
)
def test_bad_video_is_rejected_before_work(shape, message):
    vae = random_vae(TINY, jnp.bfloat16)
    vae._encode_tile = _NoDevice()
    with pytest.raises(ValueError, match=message):
        vae.encode_pixels(np.zeros(shape, np.uint8))


def test_bad_latents_and_frames(tiny_vae):
    with pytest.raises(ValueError, match="uint8"):
        tiny_vae.encode_pixels(np.zeros((4, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected latents \(16, t, h, w\)"):
        tiny_vae.decode_latents(np.zeros((4, 2, 8, 8), np.float32))
    # a tile length that leaves a 2-frame tile cannot be encoded: said before any tile runs
    vae = random_vae(TINY, jnp.bfloat16)
    vae._encode_tile = _NoDevice()
    with pytest.raises(ValueError, match="leaves a tile of 2"):
        vae.encode_pixels(np.zeros((8, 64, 64, 3), np.uint8), TileConfig(sample_length=6))


def test_image_path_and_frame_counts(tiny_vae):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 80, 3), np.uint8)
    z = tiny_vae.encode_image(image)
    assert z.shape == (16, 1, 8, 10) and z.dtype == np.dtype(ml_dtypes.bfloat16)
    # the image path is the first latent of the frame repeated to 4 frames, times the scale factor
    four = np.repeat(image[None], 4, axis=0)
    z4 = tiny_vae.encode_pixels(four)
    np.testing.assert_array_equal(z.astype(np.float32), z4[:, :1].astype(np.float32))
    assert tiny_vae.decode_latents(z).shape == (1, 64, 80, 3)  # one latent frame -> one frame
    # 4 latent frames with 12-frame tiles: a 3-latent tile (12 frames) and a 1-latent tile (1 frame)
    lat = rng.standard_normal((16, 4, 8, 10)).astype(np.float32)
    assert tiny_vae.decode_latents(lat).shape == (13, 64, 80, 3)
    assert tiny_vae.decode_latents(lat, TileConfig(sample_length=16)).shape == (16, 64, 80, 3)


def test_chunk_decodes_as_one_program_equal_to_tile_by_tile():
    """A chunk decodes in one jitted program (tiles looped and blended on the device), compiled
    once per latent shape, and gives the frames of the host path: one decoder call per tile,
    blended in numpy against the neighbours' raw outputs."""
    vae = random_vae(TINY, jnp.bfloat16)
    tiles = TileConfig(sample_height=64, sample_width=64, sample_length=12)
    lat = np.random.default_rng(1).standard_normal((16, 4, 20, 20)).astype(np.float32)
    # latent tiles of 8 every 6: spatial sizes {8, 2}, temporal {3, 1} -> 32 tiles, 8 shapes
    frames = vae.decode_latents(lat, tiles)
    assert frames.shape == (13, 160, 160, 3)  # kept 48 + 48 + 48 + 16 px per axis
    vae.decode_latents(lat * 0.5, tiles)
    assert vae._jit["decode_chunk"].programs == 1

    z = lat[None] / np.float32(vae.scale_factor)
    axes = plan(tiles, TINY.patch_length, TINY.patch_size, decode=True)
    tile_calls = []

    def one_tile(tile):
        tile_calls.append(tile.shape)
        return np.asarray(vae.decode(tile, flattens_to_view(z.shape[2:], tile.shape[2:])))

    host = run_tiles(z, one_tile, axes, raw_neighbours=True)[0]
    assert len(tile_calls) == 32
    np.testing.assert_array_equal(frames, model_to_uint8(host).transpose(1, 2, 3, 0))


def _widened_without_rounding(jaxpr) -> list[str]:
    """Every place, in a jaxpr and the jaxprs inside it, where a bf16/f16 value is converted
    to float32 and then used by anything but `reduce_precision`."""
    found = []
    used_by: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, Var):  # not a literal
                used_by.setdefault(v, []).append(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _widened_without_rounding(inner)
    outputs = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "convert_element_type":
            continue
        (x,), (y,) = eqn.invars, eqn.outvars
        if x.aval.dtype in (jnp.bfloat16, jnp.float16) and y.aval.dtype == jnp.float32:
            users = used_by.get(y, []) + (["the output"] if y in outputs else [])
            if set(users) != {"reduce_precision"}:
                found.append(f"{x.aval.str_short()} widened, then used by {users}")
    return found


def test_chunk_decode_rounds_where_xla_cannot_skip_it():
    """XLA:GPU treats `x.astype(bf16).astype(f32)` as a rounding it may skip (excess precision,
    on by default). On an H200 (2026-12-04) the chunk decode then blended unrounded tiles and
    differed from the host path in 16% of its uint8 values; the test above caught it there,
    and CPU never skips it. So in the blend and the uint8 mapping every bf16 value is widened
    to float32 through `reduce_precision`, which XLA keeps. Checked on the traced program, with
    a stand-in decoder: the real one's internal conversions are the model's, not the tiling's."""

    def decode_tile(tile, strided):  # (B, 16, t, h, w) -> (B, 3, 4t or 1, 8h, 8w), computed then rounded
        x = jnp.tanh(tile[:, :3] * 0.7)
        x = jnp.repeat(x, 1 if tile.shape[2] == 1 else TINY.patch_length, axis=2)
        x = jnp.repeat(jnp.repeat(x, TINY.patch_size, axis=3), TINY.patch_size, axis=4)
        return x.astype(jnp.bfloat16)

    tiles = TileConfig(sample_height=64, sample_width=64, sample_length=12)

    def chunk(z):
        frames = decode_tiles_traced(z, decode_tile, tiles, TINY.patch_length, TINY.patch_size)[0]
        return to_uint8_traced(frames)

    z = np.random.default_rng(2).standard_normal((1, 16, 4, 20, 20)).astype(np.float32)
    jaxpr = jax.make_jaxpr(chunk)(z).jaxpr
    assert _widened_without_rounding(jaxpr) == []
    # what it traced is the host path, bit for bit
    axes = plan(tiles, TINY.patch_length, TINY.patch_size, decode=True)
    host = run_tiles(z, lambda t: np.asarray(decode_tile(jnp.asarray(t), True)), axes, raw_neighbours=True)
    np.testing.assert_array_equal(np.asarray(jax.jit(chunk)(z)), model_to_uint8(host[0]))


def test_flattens_to_view_matches_numpy():
    rng = np.random.default_rng(0)
    parent = np.zeros((5, 6, 7), np.float32)
    for _ in range(200):
        lo = [int(rng.integers(0, n)) for n in parent.shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, parent.shape)]
        window = parent[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        flat = window.reshape(-1)
        assert flattens_to_view(parent.shape, window.shape) == np.shares_memory(flat, parent), window.shape


def test_model_state_is_stacked_and_named():
    model = VaeModel(TINY.replace(depth=3), rngs=nnx.Rngs(0))
    qkv = model.encoder.blocks.layers.qkv.kernel
    assert qkv.shape == (3, 256, 768)
    assert qkv.get_metadata()["out_sharding"] == ("layers", "vae_embed", "vae_qkv")
