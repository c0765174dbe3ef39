"""T5 text path equals upstream: tokenizer ids, position buckets, encoder outputs (kinds
`t5_tokenize`, `t5_encode`, `t5_checkpoint_layout`), plus the weight loading rules."""

import functools
import json
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import parity
import pytest
from flax import nnx

from magi_jax.convert import ConversionError
from magi_jax.safetensors_io import save_file
from magi_jax.t5 import (
    T5Config,
    TextEncoder,
    Tokenizer,
    convert_t5,
    ignored_t5_key,
    load_config_json,
    load_text_encoder,
    relative_position_buckets,
    t5_rules,
)
from magi_jax.tensor_file import CheckpointError
from magi_jax.text_clean import clean_caption
from magi_jax.torch_weights import open_torch_weights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _arrays(fx):
    return np.load(fx.folder / fx.meta["files"]["arrays"])


def _cases_json(fx):
    return json.loads((fx.folder / fx.meta["files"]["cases"]).read_text())


# --------------------------------------------------------------------------- tokenizer


def _tokenize_cases(fx):
    for length in fx.meta["config"]["max_lengths"]:
        yield f"len{length}", length


@pytest.mark.parametrize("fx,length", parity.cases("t5_tokenize", _tokenize_cases))
def test_tokenizer_ids_and_masks(fx, length):
    tok = Tokenizer(fx.folder / fx.meta["files"]["spiece_model"])
    texts = [c["text"] for c in _cases_json(fx)]
    ids, mask = tok(texts, length)
    a = _arrays(fx)
    np.testing.assert_array_equal(ids, a[f"input_ids_len{length}"])
    np.testing.assert_array_equal(mask, a[f"attention_mask_len{length}"])


@pytest.mark.parametrize("fx", parity.fixtures("t5_tokenize"), ids=lambda fx: fx.id)
def test_sentinel_ids(fx):
    c = fx.meta["config"]
    tok = Tokenizer(fx.folder / fx.meta["files"]["spiece_model"])
    assert tok.ids("<extra_id_0>") == [c["extra_id_0"]] and tok.ids("<extra_id_99>") == [c["extra_id_99"]]
    assert tok.ids("a<pad>")[-1] == c["pad_id"]


# --------------------------------------------------------------------------- encoder


@functools.cache
def _encoder(fx) -> TextEncoder:
    dtype = DTYPES[fx.meta["config"]["weights_dtype"]]
    return load_text_encoder(fx.folder, dtype)


def _encode_cases(fx):
    yield "all", None


@pytest.mark.parametrize("fx,_", parity.cases("t5_encode", _encode_cases))
def test_encoder(fx, _):
    cfg = fx.meta["config"]
    a = _arrays(fx)
    cases = _cases_json(fx)
    enc = _encoder(fx)
    length = cfg["max_length"]
    # cleaning + tokenization reproduce the ids upstream fed the encoder
    ids, mask = enc.tokenizer([clean_caption(c["prompt"]) for c in cases], length)
    np.testing.assert_array_equal(ids, a["input_ids"])
    np.testing.assert_array_equal(mask, a["attention_mask"])
    np.testing.assert_array_equal(relative_position_buckets(length, enc.config), a["relative_position_bucket"])

    model = nnx.merge(enc._graphdef, enc._state)
    out, hidden = model(jnp.asarray(ids), jnp.asarray(mask), return_hidden=True)
    out = np.asarray(out, np.float32)
    ref = a["last_hidden_state"]
    tol = fx.meta["tolerance"]
    what = f"{fx.id}"
    parity.check_max_abs(out, ref, tol["last_hidden_state"]["max_abs"], f"{what} last_hidden_state")
    if "rel_l2" in tol["last_hidden_state"]:
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        limit = tol["last_hidden_state"]["rel_l2"]
        parity.record(f"{what} last_hidden_state rel_l2", rel_l2=(rel, limit))
        assert rel <= limit, f"{what}: rel_l2 {rel:.3e} > {limit:.3e}"
    if "hidden_states" in a.files:
        h = np.concatenate([np.asarray(hidden, np.float32), out[None]])
        parity.check_max_abs(h, a["hidden_states"], tol["hidden_states"]["max_abs"], f"{what} hidden_states")
    if "last_hidden_state_fp32_compute" in a.files:  # the same bf16 weights computed in float32
        upcast = jax.tree.map(lambda x: x.astype(jnp.float32), enc._state)
        o32 = np.asarray(nnx.merge(enc._graphdef, upcast)(jnp.asarray(ids), jnp.asarray(mask)))
        limit = tol["last_hidden_state_fp32_compute"]["max_abs"]
        parity.check_max_abs(o32, a["last_hidden_state_fp32_compute"], limit, f"{what} fp32 compute")


@pytest.mark.parametrize("fx", parity.fixtures("t5_encode"), ids=lambda fx: fx.id)
def test_text_encoder_end_to_end_with_cache(fx):
    """Prompts in, the fixture's embeddings out (one call per new prompt, cached after)."""
    a = _arrays(fx)
    cases = _cases_json(fx)
    enc = _encoder(fx)
    enc.cache.clear()
    calls = enc.calls
    embs, mask = enc.encode([c["prompt"] for c in cases], fx.meta["config"]["max_length"])
    np.testing.assert_array_equal(mask, a["attention_mask"])
    limit = fx.meta["tolerance"]["last_hidden_state"]["max_abs"]
    parity.check_max_abs(embs, a["last_hidden_state"], limit, f"{fx.id} encode()")
    again, _ = enc.encode([cases[0]["prompt"]], fx.meta["config"]["max_length"])
    assert enc.calls == calls + 1, "a prompt already encoded in this run is served from the cache"
    np.testing.assert_array_equal(again[0], embs[0])


@pytest.mark.parametrize("placement", ["mesh", "host"])
@pytest.mark.parametrize("fx", parity.fixtures("t5_encode"), ids=lambda fx: fx.id)
def test_weights_go_straight_to_where_the_encoder_runs(fx, placement):
    """t5_device: the weights go from the file to where the encoder runs - split over all the
    run's devices (heads and MLP width), or whole on the host CPU - and encode as upstream."""
    from magi_jax import sharding
    from magi_jax.t5 import encoder_mesh, t5_shardings

    host = jax.devices("cpu")  # the session's 8 host devices, also beside a single GPU
    where = sharding.make_mesh({"seq": 2}, host[:2]) if placement == "mesh" else host[0]
    enc = load_text_encoder(fx.folder, DTYPES[fx.meta["config"]["weights_dtype"]], where)
    want = t5_shardings(enc._state, where)
    flat = nnx.to_flat_state(enc._state)
    for path, var in flat:
        assert var.get_value().sharding.is_equivalent_to(want[path], var.get_value().ndim), path
    if placement == "mesh":
        assert encoder_mesh(where).shape["model"] == 2
        split = [p for p, v in flat if not v.get_value().sharding.is_fully_replicated]
        assert split, "some weight is split over the devices"
    a, cases = _arrays(fx), _cases_json(fx)
    embs, mask = enc.encode([c["prompt"] for c in cases], fx.meta["config"]["max_length"])
    np.testing.assert_array_equal(mask, a["attention_mask"])
    limit = fx.meta["tolerance"]["last_hidden_state"]["max_abs"]
    parity.check_max_abs(embs, a["last_hidden_state"], limit, f"{fx.id} encode() on {placement}")


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("fx", parity.fixtures("t5_checkpoint_layout"), ids=lambda fx: fx.id)
def test_xxl_key_layout(fx):
    layout = json.loads((fx.folder / fx.meta["files"]["layout"]).read_text())
    cfg = T5Config.from_hf(fx.meta["config"])
    rules = t5_rules(cfg)
    ours = {}
    for r in rules:
        for key, _ in r.keys():
            ours[key] = r
    enc = dict(layout["encoder_model_state_dict"])
    tied = set(layout["encoder_model_tied_keys"])
    assert set(ours) == set(enc) - tied, "every encoder key has exactly one rule"
    full_only = layout["full_model_only_keys"]
    assert all(ignored_t5_key(k) for k in full_only) and all(ignored_t5_key(k) for k in tied)
    assert not any(ignored_t5_key(k) for k in ours)
    from magi_jax.t5 import abstract_t5

    expected = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract_t5(cfg)))}
    for key, r in ours.items():
        leaf = expected[r.path][1:] if r.layers is not None else expected[r.path]
        assert list(r.transform.torch_shape(tuple(leaf))) == list(enc[key]), key


def _fx32():
    for fx in parity.fixtures("t5_encode"):
        if fx.meta["config"]["weights_dtype"] == "float32":
            return fx
    pytest.skip("no float32 t5_encode fixture")


def _tensors(path):
    ck = open_torch_weights(path)
    return {k: np.array(ck.get(k)) for k in ck.keys()}


def test_strict_loading(tmp_path):
    fx = _fx32()
    cfg = load_config_json(fx.folder)
    weights = fx.folder / fx.meta["files"]["weights"]
    tensors = _tensors(weights)
    # a full T5 (decoder, lm_head, tied embed_tokens) loads: those keys are ignored on purpose
    full = dict(
        tensors,
        **{
            "decoder.final_layer_norm.weight": np.ones(cfg.d_model, np.float32),
            "lm_head.weight": np.zeros((4, 4), np.float32),
            "encoder.embed_tokens.weight": tensors["shared.weight"],
        },
    )
    save_file(full, tmp_path / "full.safetensors")
    ref = convert_t5(weights, cfg)
    got = convert_t5(tmp_path / "full.safetensors", cfg)
    for p in ref:
        np.testing.assert_array_equal(got[p], ref[p])
    bad = dict(tensors)
    bad.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    bad["encoder.block.0.layer.0.SelfAttention.q.weight"] = tensors["encoder.block.0.layer.0.SelfAttention.q.weight"][
        :-1
    ]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_t5(tmp_path / "bad.safetensors", cfg)
    msg = str(e.value)
    assert "missing key 'encoder.block.1.layer.1.DenseReluDense.wo.weight'" in msg
    assert "key 'encoder.block.0.layer.0.SelfAttention.q.weight' has shape" in msg
    assert "unexpected key 'encoder.extra.weight'" in msg


# torch's zip format, written without torch: stub classes pickled under torch's names
def _write_torch_bin(tensors: dict, path):
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storages = {np.dtype(np.float32): "FloatStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage"}
    for name in storages.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    class Storage:
        def __init__(self, key, dtype):
            self.key, self.dtype = key, dtype

    class Tensor:
        def __init__(self, storage, shape):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
            return (_rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, {}))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", getattr(torch, storages[obj.dtype]), obj.key, "cpu", 0)
            return None

    import collections
    import io

    state = collections.OrderedDict()
    blobs = {}
    for i, (k, v) in enumerate(tensors.items()):
        blobs[str(i)] = np.ascontiguousarray(v).tobytes()
        state[k] = Tensor(Storage(str(i), v.dtype), tuple(v.shape))
    saved = dict(sys.modules)
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(state)
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, blob in blobs.items():
            z.writestr(f"archive/data/{key}", blob)
        z.writestr("archive/version", "3\n")


def test_sharded_torch_bin_without_torch(tmp_path):
    """DeepFloyd's layout: pytorch_model.bin.index.json + .bin shards (tied key stored too)."""
    fx = _fx32()
    cfg = load_config_json(fx.folder)
    tensors = _tensors(fx.folder / fx.meta["files"]["weights"])
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    keys = sorted(tensors)
    half = len(keys) // 2
    folder = tmp_path / "t5"
    folder.mkdir()
    wm = {}
    for n, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{n + 1}-of-00002.bin"
        _write_torch_bin({k: tensors[k] for k in part}, folder / name)
        wm.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    got = convert_t5(folder, cfg)
    ref = convert_t5(fx.folder / fx.meta["files"]["weights"], cfg)
    for p in ref:
        np.testing.assert_array_equal(got[p], ref[p])


def test_torch_bin_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to load (__builtin__|builtins)\.print"):
        open_torch_weights(path).keys()


def test_close_frees_weights_but_keeps_cache():
    fx = _fx32()
    enc = load_text_encoder(fx.folder, jnp.float32)
    e1, _ = enc.encode(["a red fox"], 16)
    enc.close()
    e2, _ = enc.encode(["a red fox"], 16)
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(RuntimeError, match="closed"):
        enc.encode(["something new"], 16)
