"""Sharding: the TINY sampler on 8 devices over three meshes equals the single-device run,
and every parameter and the KV cache are laid out as sharding.RULES says."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from magi_jax import sharding
from magi_jax.config import load_config
from magi_jax.dit_weights import abstract_dit
from magi_jax.t5 import TINY as T5_TINY
from magi_jax.t5 import abstract_t5
from magi_jax.vae import TINY as VAE_TINY
from magi_jax.vae_weights import abstract_vae

MESHES = ["8x1", "2x4", "1x8"]  # model x seq over 8 devices
HELPER = Path(__file__).resolve().parent / "helpers" / "sharded_sampler.py"


@pytest.fixture(scope="module")
def eight_devices():
    """The helper runs in its own process: the device count is fixed before JAX starts."""
    run = subprocess.run([sys.executable, str(HELPER), *MESHES], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_sampler_equals_single_device(eight_devices, mesh):
    r = eight_devices["meshes"][mesh]
    assert eight_devices["devices"] == 8 and r["shape"]["model"] * r["shape"]["seq"] == 8
    assert r["max_abs_diff"] <= 1e-5 * r["scale"], r


@pytest.mark.parametrize("mesh", MESHES)
def test_params_and_cache_sharded_as_the_table_says(eight_devices, mesh):
    r = eight_devices["meshes"][mesh]
    assert r["params_wrong"] == []
    # read straight into their shards: from a converted checkpoint, and from converted host arrays
    assert r["restored_wrong"] == [] and r["built_wrong"] == []
    if r["shape"]["model"] > 1:
        assert r["params_sharded"] > 0, "heads / MLP weights split over the model axis"
    else:
        assert r["params_sharded"] == 0
    # cache (layers, rows, kv heads, head dim): rows over seq; the 2 kv heads of TINY only split 2-way
    want = [None, "seq" if r["shape"]["seq"] > 1 else None, "model" if r["shape"]["model"] == 2 else None, None]
    assert r["cache_table"] == want
    assert r["cache_spec"] == want, "the cache the sampler really carried"


def test_mesh_text():
    assert sharding.parse_mesh("2x4", 8) == {"data": 1, "model": 2, "seq": 4}
    assert sharding.parse_mesh("data=2,seq=4", 8) == {"data": 2, "model": 1, "seq": 4}
    assert sharding.parse_mesh(None, 8) == {"data": 1, "model": 1, "seq": 8}
    with pytest.raises(sharding.MeshError, match="needs 6 devices, 8 are present"):
        sharding.parse_mesh("2x3", 8)
    with pytest.raises(sharding.MeshError, match="unknown mesh axis 'tensor'"):
        sharding.parse_mesh("tensor=8", 8)


def test_spec_rules():
    mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    assert tuple(sharding.spec(("embed", "mlp"), (64, 128), mesh)) == (None, "model")
    assert tuple(sharding.spec(("embed", "kv_heads"), (64, 6), mesh)) == (None, None)  # 6 % 4: replicated
    assert tuple(sharding.spec(("mlp", "q_heads"), (8, 8), mesh)) == ("model", None)  # an axis is used once
    assert tuple(sharding.spec(("layers", "kv_seq", "kv_heads", "head_dim"), (2, 16, 4, 8), mesh)) == (
        None,
        "seq",
        "model",
        None,
    )
    with pytest.raises(KeyError, match="'heads'"):
        sharding.spec(("heads",), (4,), mesh)


@pytest.mark.parametrize("name", ["dit", "dit_fp8", "t5", "vae"])
def test_every_parameter_name_is_in_the_table(name):
    cfg = load_config("tiny")
    model = {
        "dit": lambda: abstract_dit(cfg),
        "dit_fp8": lambda: abstract_dit(
            cfg.replace(model=dict(num_layers=3), engine=dict(fp8_quant=True, distill=True), runtime=dict(cfg_number=1))
        ),
        "t5": lambda: abstract_t5(T5_TINY),
        "vae": lambda: abstract_vae(VAE_TINY),
    }[name]()
    mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        sharding.spec(tuple(names), var.get_value().shape, mesh)  # raises for a name missing from RULES


def test_single_process_writes():
    assert sharding.is_writer()
    assert not sharding.maybe_initialize_distributed()


@pytest.mark.parametrize(
    "args, missing", [([], "the TPU name"), (["v5p"], "the zone"), (["v5p", "us-east5-a"], "the config")]
)
def test_launch_tpu_names_the_missing_argument(args, missing):
    script = Path(__file__).resolve().parent.parent / "launch_tpu.sh"
    run = subprocess.run(["bash", str(script), *args], capture_output=True, text=True)
    assert run.returncode != 0 and f"missing {missing}" in run.stderr
