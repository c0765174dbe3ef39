"""The converter: every released layout reads, every mismatch is a named error, writes are atomic."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import parity
import pytest
import zstandard

from magi_jax import checkpoint
from magi_jax.config import from_dict
from magi_jax.convert import ConversionError
from magi_jax.dit_weights import abstract_dit, convert_dit, expected_leaves, load_dit
from magi_jax.safetensors_io import save_file
from magi_jax.tensor_file import CheckpointError
from magi_jax.torch_weights import open_torch_weights

ROOT = Path(__file__).resolve().parent.parent


def _pick(fp8: bool):
    for fx in parity.fixtures("dit"):
        if fx.meta["config"]["engine_config"]["fp8_quant"] == fp8:
            return fx
    pytest.skip(f"no dit fixture with fp8_quant={fp8}")


@pytest.fixture(scope="module")
def plain():
    fx = _pick(False)
    cfg = from_dict(fx.meta["config"], fx.name)
    return fx, cfg, convert_dit(fx.weights, cfg)


def _tensors(path):
    ck = open_torch_weights(path)
    return {k: np.array(ck.get(k)) for k in ck.keys()}


def _write_sharded(tensors: dict, folder: Path, shards: int, compress=()):
    folder.mkdir()
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, folder / name)
        if i in compress:
            raw = (folder / name).read_bytes()
            (folder / (name + ".zst")).write_bytes(zstandard.ZstdCompressor().compress(raw))
            (folder / name).unlink()
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_and_zst_equal_single_file(plain, tmp_path):
    fx, cfg, ref = plain
    _write_sharded(_tensors(fx.weights), tmp_path / "sharded", 3, compress=(1,))
    got = convert_dit(tmp_path / "sharded", cfg)
    assert got.keys() == ref.keys()
    for p in ref:
        np.testing.assert_array_equal(got[p], ref[p])


def test_single_zst_file(plain, tmp_path):
    fx, cfg, ref = plain
    zst = tmp_path / "model.safetensors.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(Path(fx.weights).read_bytes()))
    got = convert_dit(zst, cfg)
    for p in ref:
        np.testing.assert_array_equal(got[p], ref[p])


def _mutated(fx, tmp_path, fn):
    tensors = _tensors(fx.weights)
    fn(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    return path


KEY = "videodit_blocks.layers.1.mlp.linear_fc2.weight"


def test_missing_key_is_named(plain, tmp_path):
    fx, cfg, _ = plain
    path = _mutated(fx, tmp_path, lambda t: t.pop(KEY))
    with pytest.raises(ConversionError, match=rf"missing key '{KEY}' \(expected shape \[\d+, \d+\]\)"):
        convert_dit(path, cfg)


def test_unexpected_key_is_named(plain, tmp_path):
    fx, cfg, _ = plain
    path = _mutated(fx, tmp_path, lambda t: t.update({"videodit_blocks.layers.0.extra.weight": np.zeros((2, 3))}))
    with pytest.raises(
        ConversionError, match=r"unexpected key 'videodit_blocks.layers.0.extra.weight' with shape \[2, 3\]"
    ):
        convert_dit(path, cfg)


def test_misshaped_key_is_named(plain, tmp_path):
    fx, cfg, _ = plain

    def shrink(t):
        t[KEY] = t[KEY][:, :-1]

    path = _mutated(fx, tmp_path, shrink)
    with pytest.raises(ConversionError, match=rf"key '{KEY}' has shape \[\d+, \d+\], expected \[\d+, \d+\]"):
        convert_dit(path, cfg)


def test_layer_count_mismatch_lists_every_problem(plain, tmp_path):
    fx, cfg, _ = plain
    n = cfg.model.num_layers
    bigger = cfg.replace(model=dict(num_layers=n + 1))
    with pytest.raises(
        ConversionError, match=rf"(?s)missing key 'videodit_blocks.layers.{n}\..*--config names the variant"
    ):
        convert_dit(fx.weights, bigger)


def test_duplicate_key_across_shards(plain, tmp_path):
    fx, cfg, _ = plain
    tensors = _tensors(fx.weights)
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file(tensors, folder / "a.safetensors")
    save_file({KEY: tensors[KEY]}, folder / "b.safetensors")
    wm = {k: "a.safetensors" for k in tensors}
    wm[KEY] = "b.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ConversionError, match=rf"duplicate key '{KEY}' in a.safetensors and b.safetensors"):
        convert_dit(folder, cfg)


def test_missing_shard_is_named(plain, tmp_path):
    fx, cfg, _ = plain
    _write_sharded(_tensors(fx.weights), tmp_path / "s", 2)
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        convert_dit(tmp_path / "s", cfg)


def test_fp8_weights_must_be_fp8(tmp_path):
    fx = _pick(True)
    cfg = from_dict(fx.meta["config"], fx.name)
    key = "videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"
    path = _mutated(fx, tmp_path, lambda t: t.update({key: t[key].astype(np.float32)}))
    with pytest.raises(ConversionError, match=rf"key '{key}' has dtype float32, expected float8_e4m3fn"):
        convert_dit(path, cfg)
    # and a plain config cannot read an fp8 checkpoint
    plain_cfg = cfg.replace(engine=dict(fp8_quant=False))
    with pytest.raises(ConversionError, match="unexpected key .*input_scale"):
        convert_dit(fx.weights, plain_cfg)


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_torch_weights.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_cli_writes_checkpoint_that_loads_back_identical(plain, tmp_path):
    fx, cfg, ref = plain
    cfg_path = tmp_path / "config.json"
    cfg.to_json(cfg_path)
    out = tmp_path / "ckpt"
    run = _cli("--src", fx.weights, "--config", cfg_path, "--out", out)
    assert run.returncode == 0, run.stderr
    assert "shard 1/1" in run.stderr
    n = sum(int(np.prod(a.shape)) for a in ref.values())
    assert f"{n:,} parameters" in run.stdout
    back = checkpoint.restore(out, expected_leaves(abstract_dit(cfg)), "dit")
    for p in ref:
        np.testing.assert_array_equal(np.asarray(back[p]), ref[p])
    model = load_dit(out, cfg)  # and through the loader the generate command uses
    np.testing.assert_array_equal(model.final_linear.kernel[...], ref[("final_linear", "kernel")])
    again = _cli("--src", fx.weights, "--config", cfg_path, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_checkpoints_are_stored_uncompressed_and_compressed_ones_still_read(plain, tmp_path):
    # a start reads the weights every time: raw arrays, not one zstd chunk per array
    import orbax.checkpoint as ocp
    import tensorstore as ts

    _, cfg, ref = plain
    flat = {p: np.asarray(a) for p, a in ref.items()}
    out = tmp_path / "raw"
    checkpoint.save(flat, out, "dit", cfg.to_dict())
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{out / checkpoint.PARAMS}/"}).result()
    headers = [json.loads(store.read(k).result().value) for k in store.list().result() if k.endswith(b".zarray")]
    assert len(headers) == len(flat) and all(h["compressor"] is None for h in headers)

    older = tmp_path / "zstd"  # written as earlier versions did
    older.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(older / checkpoint.PARAMS, checkpoint.nest(flat))
    (out / checkpoint.META).replace(older / checkpoint.META)
    back = checkpoint.restore(older, expected_leaves(abstract_dit(cfg)), "dit")
    for p in ref:
        np.testing.assert_array_equal(np.asarray(back[p]), ref[p])


def test_cli_failure_leaves_nothing(plain, tmp_path):
    fx, cfg, _ = plain
    bad = _mutated(fx, tmp_path, lambda t: t.pop(KEY))
    cfg_path = tmp_path / "config.json"
    cfg.to_json(cfg_path)
    run = _cli("--src", bad, "--config", cfg_path, "--out", tmp_path / "out")
    assert run.returncode == 2 and f"missing key '{KEY}'" in run.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_loading_checkpoint_with_other_config_fails(plain, tmp_path):
    fx, cfg, ref = plain
    checkpoint.save(ref, tmp_path / "ck", "dit", cfg.to_dict())
    other = cfg.replace(model=dict(layernorm_epsilon=1e-5))
    with pytest.raises(CheckpointError, match="differs in layernorm_epsilon"):
        load_dit(tmp_path / "ck", other)


def test_a_checkpoint_in_an_earlier_layout_is_refused(plain, tmp_path):
    """Projections into heads were held (in, out) before layout 2: a square one (q) would load
    with no shape error and compute garbage, so the layout is recorded and checked."""
    import json

    _, cfg, ref = plain
    out = tmp_path / "ck"
    checkpoint.save(ref, out, "dit", cfg.to_dict())
    meta = json.loads((out / checkpoint.META).read_text())
    assert meta["layout"] == checkpoint.LAYOUT["dit"] == 2
    del meta["layout"]  # as earlier versions wrote it
    (out / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layout 1 .* convert the released weights again"):
        load_dit(out, cfg)


def _other_variant(cfg):
    """The same model as the other kind: base <-> distilled (whose weights share every key)."""
    distill = not cfg.engine.distill
    return cfg.replace(engine=dict(distill=distill), runtime=dict(cfg_number=1 if distill else 3))


def test_base_and_distilled_weights_are_not_mixed(plain, tmp_path):
    fx, cfg, ref = plain
    other = _other_variant(cfg)
    theirs = "distilled" if cfg.engine.distill else "base"
    checkpoint.save(ref, tmp_path / "ck", "dit", cfg.to_dict())
    with pytest.raises(CheckpointError, match=f"was converted for {theirs} weights"):
        load_dit(tmp_path / "ck", other)
    # a released folder says which it is by its name
    released = tmp_path / ("inference_weight.distill" if cfg.engine.distill else "inference_weight")
    released.mkdir()
    shutil.copy(fx.weights, released / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"holds {theirs} weights"):
        load_dit(released, other)
    assert load_dit(released, cfg) is not None  # the right pairing loads


def test_cli_vae_and_t5_checkpoints_load_back(tmp_path):
    """--model vae / t5: the generate command's loaders read the written checkpoints."""
    import jax.numpy as jnp

    from magi_jax.t5 import load_text_encoder
    from magi_jax.vae_weights import load_vae

    vae_fx = next(fx for fx in parity.fixtures("vae") if fx.meta["weights"]["stored_dtypes"] == ["float32"])
    src = tmp_path / "vae"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(vae_fx.meta["config"]))
    (src / "diffusion_pytorch_model.safetensors").write_bytes(Path(vae_fx.weights).read_bytes())
    run = _cli("--model", "vae", "--src", src, "--out", tmp_path / "vae.magi_jax")
    assert run.returncode == 0, run.stderr
    a, b = load_vae(src, jnp.bfloat16), load_vae(tmp_path / "vae.magi_jax", jnp.bfloat16)
    for (p, x), (_, y) in zip(nnx_leaves(a.state), nnx_leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))

    t5_fx = next(fx for fx in parity.fixtures("t5_encode") if fx.meta["config"]["weights_dtype"] == "float32")
    run = _cli("--model", "t5", "--src", t5_fx.folder, "--out", tmp_path / "t5.magi_jax")
    assert run.returncode == 0, run.stderr
    prompts = ["a red fox", "<pad> odd text"]
    e1, m1 = load_text_encoder(t5_fx.folder).encode(prompts, 32)
    e2, m2 = load_text_encoder(tmp_path / "t5.magi_jax").encode(prompts, 32)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(m1, m2)


def nnx_leaves(state):
    from flax import nnx

    return [(p, v.get_value()) for p, v in nnx.to_flat_state(state)]
