"""Sharding: the TINY sampler on 8 devices over three meshes equals the single-device run,
and every parameter and the KV cache are laid out as sharding.RULES says."""

import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from train_clips import mechanics_config

from magi_jax import checkpoint, sharding
from magi_jax.config import load_config
from magi_jax.dit import DiT
from magi_jax.dit_weights import abstract_dit, build_dit, load_dit
from magi_jax.kv_cache import KVCache
from magi_jax.sampler import Sampler
from magi_jax.t5 import TINY as T5_TINY
from magi_jax.t5 import abstract_t5
from magi_jax.vae import TINY as VAE_TINY
from magi_jax.vae_weights import abstract_vae

MESHES = ["8x1", "2x4", "1x8"]  # model x seq over 8 devices (conftest gives the session 8 CPU devices)
TWO_DEVICES = "seq=2"  # and one mesh over the first 2 devices


def _not_as_table(params, want) -> list[str]:
    """The parameters whose sharding differs from the rules table's."""
    wrong = []
    for path, var in nnx.to_flat_state(params):
        if not var.get_value().sharding.is_equivalent_to(want[path], var.get_value().ndim):
            wrong.append(str(path))
    return wrong


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """The TINY sampler on one device, then on each mesh: latents, parameter and cache layouts.
    (tests/test_determinism.py runs the same sampler: in one worker its programs compile once.)

    The parameters are checked as load_dit restores them from a converted checkpoint and as
    build_dit places converted host arrays, before the sampler could move them.
    """
    cfg = mechanics_config(runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=32, video_size_w=32))
    m = cfg.model
    rng = np.random.default_rng(0)
    sampler = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg)
    lay = sampler.layout()
    cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
    mask[:, :, :12] = 1
    ref = list(sampler.chunks(cap, mask, seed=3))
    host = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(sampler.params)}
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "tiny.magi_jax")
    checkpoint.save(host, ckpt, "dit", cfg.to_dict())
    out = {"devices": jax.device_count(), "meshes": {}}
    for text in [*MESHES, TWO_DEVICES]:
        count = 2 if text == TWO_DEVICES else 8
        mesh = sharding.make_mesh(sharding.parse_mesh(text, count), jax.devices()[:count])
        want = sharding.shardings(abstract_dit(cfg), mesh)
        restored = load_dit(ckpt, cfg, mesh)
        restored_wrong = _not_as_table(nnx.state(restored), want)
        built_wrong = _not_as_table(nnx.state(build_dit(cfg, host, want)), want)
        s = Sampler(restored, cfg, mesh=mesh)
        got = list(s.chunks(cap, mask, seed=3))
        rows = lay.chunk_num * lay.chunk_tokens
        out["meshes"][text] = {
            "shape": dict(mesh.shape),
            "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(got, ref)),
            "scale": max(float(np.abs(b).max()) for b in ref),
            "params_wrong": _not_as_table(s.params, want),
            "restored_wrong": restored_wrong,
            "built_wrong": built_wrong,
            "params_sharded": sum(any(a is not None for a in sh.spec) for sh in want.values()),
            "cache_spec": list(s.cache_sharding.spec) + [None] * (4 - len(s.cache_sharding.spec)),  # after the run
            "cache_table": list(
                sharding.spec(KVCache.AXES, (m.num_layers, rows, m.num_query_groups, m.kv_channels), mesh)
            ),
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_sampler_equals_single_device(eight_devices, mesh):
    r = eight_devices["meshes"][mesh]
    assert eight_devices["devices"] == 8 and r["shape"]["model"] * r["shape"]["seq"] == 8
    assert r["max_abs_diff"] <= 1e-5 * r["scale"], r


@pytest.mark.slow
def test_two_devices_equal_one_device(eight_devices):
    """Determinism across device counts: 1, 2 (here) and 8 devices (above) give the same latents."""
    r = eight_devices["meshes"][TWO_DEVICES]
    assert r["shape"]["seq"] == 2 and r["shape"]["model"] == 1
    assert r["max_abs_diff"] <= 1e-5 * r["scale"], r


def test_a_layer_reads_its_own_cache_rows_not_a_gathered_cache():
    """On a `seq` mesh each device holds a slice of the KV cache rows. A layer's read gathers
    that layer's rows only: XLA once gathered the whole stacked cache (every layer) to every
    device ahead of the layer loop, 3.4 GB per device at 4.5B 720x720 on a v5e-8."""
    import re

    from magi_jax import aot
    from magi_jax.sampler_plan import cache_rows, layout

    cfg = mechanics_config(
        model=dict(num_layers=3),
        runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=64, video_size_w=64),
    )
    m = cfg.model
    mesh = sharding.make_mesh(sharding.parse_mesh("seq=8", 8))
    program = max(aot.sampler_programs(cfg, mesh, "xla", prefix_frames=0), key=lambda p: p.chunks)
    compiled, _ = aot.compile_program(program, mesh, "xla")
    gathered = re.findall(r"= \w+\[([0-9,]+)\]\S* all-gather\(", compiled.as_text())
    whole = f"{m.num_layers},{cache_rows(cfg, layout(cfg))},{m.num_query_groups},{m.kv_channels}"
    assert gathered, "the key rows are gathered (attention reads all of a chunk's visible keys)"
    assert whole not in gathered, gathered


@pytest.mark.slow
def test_tokens_the_mesh_does_not_divide_are_padded_split_and_equal_one_device():
    """80x80: 50 tokens a chunk, which `seq=8` does not divide. Each chunk's tokens are padded to
    56, so every device holds 7 of each chunk (the padding is never a key, never cached, and
    its outputs are dropped): the latents equal the single-device run's, and in the compiled
    window program no token activation holds a whole chunk (nor runs whole on every device)."""
    import re

    from magi_jax import aot

    cfg = mechanics_config(
        model=dict(hidden_size=96, kv_channels=24),  # a width unlike the patch output (64)
        runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=80, video_size_w=80),
    )
    m = cfg.model
    one = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg)
    lay = one.layout()
    assert lay.chunk_tokens == 50
    rng = np.random.default_rng(1)
    cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
    mask[:, :, :12] = 1
    ref = [np.asarray(c) for c in one.chunks(cap, mask, seed=5)]
    mesh = sharding.make_mesh(sharding.parse_mesh("seq=8", 8))
    split = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg, mesh=mesh)
    got = [np.asarray(c) for c in split.chunks(cap, mask, seed=5)]
    scale = max(float(np.abs(b).max()) for b in ref)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) <= 1e-5 * scale
    # the KV ring (two chunks, 100 rows) is allocated in a multiple of its split, and split:
    # unpadded, every device held it whole (16.8 GiB at 4.5B with a V2V prefix on a v5e-8)
    assert (one.cache_shape[1], split.cache_shape[1]) == (100, 104)
    assert tuple(split.cache_sharding.spec)[:2] == (None, "seq"), split.cache_sharding

    program = max(aot.sampler_programs(cfg, mesh, "xla", prefix_frames=0), key=lambda p: p.chunks)
    compiled, _ = aot.compile_program(program, mesh, "xla")
    shapes = {tuple(map(int, s.split(","))) for s in re.findall(r"\w+\[([0-9,]+)\]", compiled.as_text())}
    tokens = [s[:-1] for s in shapes if len(s) >= 3 and s[-1] == m.hidden_size]
    assert [t for t in tokens if t[-1] == 7], tokens  # 56 / 8 tokens of each chunk on each device
    assert not [t for t in tokens if {50, 56} & set(t) or any(d % 50 == 0 for d in t)], tokens


@pytest.mark.slow
def test_a_cache_ring_the_mesh_does_not_divide_is_padded_and_split():
    """A V2V run at 48x48: a clean prefix chunk of 18 tokens makes a ring of 54 cache rows,
    which `seq=4` does not divide. The cache is allocated with 56 rows, split over `seq` as
    the rules table says (unpadded, every device held it whole: 16.8 GiB of temporaries at
    4.5B, 720x720 on a v5e-8); the rows past the ring are never read, and the latents equal
    the single-device run's."""
    cfg = mechanics_config(runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=48, video_size_w=48))
    m = cfg.model
    one = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg)
    cw = cfg.runtime.chunk_width
    lay = one.layout(cw)
    assert (lay.clean_chunks, lay.chunk_tokens) == (1, 18)
    rng = np.random.default_rng(2)
    c, _, h, w = lay.latent_shape
    prefix = rng.standard_normal((c, cw, h, w)).astype(np.float32)
    cap = rng.standard_normal((2, lay.chunk_num, m.caption_max_length, m.caption_channels)).astype(np.float32)
    mask = np.zeros((2, lay.chunk_num, m.caption_max_length), np.float32)
    mask[:, :, :12] = 1
    ref = [np.asarray(x) for x in one.chunks(cap, mask, seed=4, prefix=prefix)]
    assert one.cache_shape[1] == 54
    mesh = sharding.make_mesh(sharding.parse_mesh("seq=4", 4), jax.devices()[:4])
    split = Sampler(DiT(m, rngs=nnx.Rngs(0)), cfg, mesh=mesh)
    got = [np.asarray(x) for x in split.chunks(cap, mask, seed=4, prefix=prefix)]
    assert split.cache_shape[1] == 56
    assert tuple(split.cache_sharding.spec)[:2] == (None, "seq"), split.cache_sharding
    scale = max(float(np.abs(b).max()) for b in ref)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) <= 1e-5 * scale


def test_a_swiglu_mlp_pairs_gate_and_up_on_each_device():
    """24B's MLP is SwiGLU: fc1's kernel holds [gate | up] columns, which a `model` split in
    contiguous blocks would put on different devices, so every token's hidden layer would move
    between them (13 GiB of float32 copies on the 24B v5p-8 step). The kernel is viewed as
    (F, 2, O) with O over `model` instead: the only collectives on MLP-wide arrays move kernel
    columns (they hold the hidden size), never tokens' hidden layers."""
    import re

    from magi_jax import aot

    ffn = 160
    cfg = mechanics_config(
        model=dict(gated_linear_unit=True, ffn_hidden_size=ffn),
        runtime=dict(num_frames=16, num_steps=4, window_size=2, video_size_h=64, video_size_w=64),
    )
    mesh = sharding.make_mesh(sharding.parse_mesh("model=4,seq=2", 8))
    program = max(aot.sampler_programs(cfg, mesh, "xla", prefix_frames=0), key=lambda p: p.chunks)
    compiled, _ = aot.compile_program(program, mesh, "xla")
    widths = {ffn // 4, ffn // 2, ffn, 2 * ffn}
    moved = []
    for line in compiled.as_text().splitlines():
        op = re.search(r" (all-gather|all-to-all|collective-permute|all-reduce)\(", line)
        for dims in re.findall(r"\w+\[([0-9,]+)\]", line[: op.start()] if op else ""):  # its result shapes
            shape = tuple(map(int, dims.split(",")))
            if widths & set(shape) and cfg.model.hidden_size not in shape:
                moved.append(shape)
    assert not moved, moved


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [*MESHES, TWO_DEVICES])
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


def test_launch_tpu_dry_run_prints_an_idempotent_deployment():
    """--dry-run prints what would run: the code (without .git, .venv or outputs) replaces
    ~/magi-jax whole on every worker, the environment lives outside it, and the same
    generate command runs everywhere with jax.distributed on."""
    script = Path(__file__).resolve().parent.parent / "launch_tpu.sh"
    cmd = ["bash", str(script), "--dry-run", "magi-v5p", "us-east5-a", "24B_distill", "--prompt", "a red fox"]
    runs = [subprocess.run([*cmd, "--output_path", "fox.mp4"], capture_output=True, text=True) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    lines = [line.strip() for line in runs[0].stdout.splitlines()]
    assert [line.split()[0] for line in lines] == ["tar", "gcloud", "gcloud", "gcloud", "gcloud"]
    tar, scp, unpack, env, generate = lines
    for local in (".git", ".venv", r"\*.mp4", "outputs"):
        assert f"--exclude={local}" in tar
    assert "--recurse" not in scp and scp.endswith("magi-v5p:magi-jax.tgz")
    assert (
        "--worker=all" in unpack and r"rm\ -rf\ ~/magi-jax\ " in unpack and r"mv\ ~/magi-jax.new\ ~/magi-jax" in unpack
    )
    assert r"python3\ -m\ virtualenv" in env and "magi-jax-venv" in env  # no python3-venv needed
    assert r"\"\$HOME/magi-jax\[gcs\]\"" in env and "requirements.txt" not in env  # gs:// paths, no test tools
    assert r"MAGI_DISTRIBUTED=1" in generate and r"--config_file\ 24B_distill" in generate
    assert r"--prompt\ a\\\ red\\\ fox" in generate
    again = [line.strip() for line in runs[1].stdout.splitlines()]
    assert again[2:] == [unpack, env, generate]  # a second run does the same
