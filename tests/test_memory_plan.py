"""The memory plan: within 10% of what XLA really allocates for the sampler's largest step, for
each attention implementation that runs here, divided by the mesh as the sharding table says,
and refusing runs that cannot fit."""

import math

import pytest

from magi_jax import sharding
from magi_jax.aot import compiled_step_memory
from magi_jax.attention import available_implementations
from magi_jax.config import load_config
from magi_jax.memory_plan import MemoryPlanError, check_fits, choose_mesh, plan_memory

MID = dict(num_layers=2, hidden_size=1024, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=4096)
CONFIGS = {
    "tiny": lambda: load_config("tiny"),
    "tiny_128px": lambda: load_config("tiny").replace(runtime=dict(video_size_h=128, video_size_w=128)),
    "mid_base": lambda: load_config("4.5B_base").replace(
        model=MID, runtime=dict(video_size_h=128, video_size_w=128, num_frames=48, num_steps=8)
    ),
    "mid_distill": lambda: load_config("4.5B_distill").replace(
        model=MID, runtime=dict(video_size_h=128, video_size_w=128, num_frames=48, num_steps=8)
    ),
}


@pytest.mark.parametrize("impl", available_implementations())
@pytest.mark.parametrize("name", CONFIGS)
def test_plan_within_10_percent_of_allocation(name, impl):
    cfg = CONFIGS[name]()
    measured = compiled_step_memory(cfg, impl=impl)
    planned = plan_memory(cfg, impl=impl).total
    assert 0.9 * measured <= planned <= 1.1 * measured, (planned, measured)


def test_the_mlp_hidden_layer_is_one_chunks_not_the_windows():
    """The plan counts one chunk's MLP hidden layer (dit._by_chunk): in the compiled largest
    step no array of the MLP's width spans more than one chunk's tokens of every guidance row."""
    import re

    from magi_jax.aot import compile_largest_step
    from magi_jax.sampler_plan import layout

    cfg = CONFIGS["mid_base"]()
    m, n = cfg.model, layout(cfg).chunk_tokens
    step, compiled = compile_largest_step(cfg, "xla")
    assert step.window.chunks > 1
    hlo = compiled.as_text()
    rows = 2 if cfg.runtime.cfg_number == 3 else 1  # a three-way guided step batches caption and null caption
    widths = {m.ffn_hidden_size, 2 * m.ffn_hidden_size}
    hidden = [
        dims
        for dims in (tuple(map(int, d.split(","))) for d in re.findall(r"\[(\d+(?:,\d+)+)\]", hlo))
        if dims[-1] in widths and any(d % n == 0 for d in dims[:-1])  # tokens x MLP width
    ]
    assert hidden, "no MLP hidden layer found in the program"
    assert all(math.prod(d) <= rows * n * d[-1] for d in hidden), max(hidden, key=math.prod)


def test_plan_divides_over_the_mesh():
    cfg = CONFIGS["mid_base"]()
    one, seq, model = plan_memory(cfg), plan_memory(cfg, {"seq": 4}), plan_memory(cfg, {"model": 4})
    assert seq.kv_cache == one.kv_cache // 4 and seq.params == one.params  # cache rows split, weights whole
    assert model.params < 0.6 * one.params and model.kv_cache == one.kv_cache // 4  # heads split, embedders whole
    assert seq.activations < one.activations


def test_check_fits_refuses_with_the_numbers():
    plan = plan_memory(load_config("24B_base"))
    assert plan.params > 40 * 2**30  # 24B parameters in bf16
    with pytest.raises(MemoryPlanError, match=r"needs about parameters .* GiB .* a device holds 80.00 GiB"):
        check_fits(plan, capacity=80 * 2**30)
    check_fits(plan_memory(load_config("tiny")), capacity=2**30)


def test_auto_mesh_adds_model_devices_only_as_memory_needs():
    """--mesh auto: all devices on `seq` while that fits; else the fewest on `model` that fit
    (a model split that does not divide the head counts is never offered); none: the numbers."""
    assert [m["model"] for m in sharding.mesh_candidates(8, (24, 8))] == [1, 2, 4, 8]
    assert [m["model"] for m in sharding.mesh_candidates(8, (6, 2))] == [1, 2]
    cfg = load_config("4.5B_base")  # at its released 720x720 on a slice of 8 chips
    plans = [plan_memory(cfg, m, 0, "pallas", platform="tpu").total for m in sharding.mesh_candidates(8, (24, 8))]
    assert plans[0] > plans[1] > plans[2] and plans[3] > plans[2]  # model=8 has no `seq` left to split activations

    def auto(capacity):
        sizes, plan = choose_mesh(cfg, 8, 0, capacity, 0.9, "pallas", "tpu")
        return sharding.describe_mesh(sizes), plan.total

    assert auto(plans[0] / 0.9 + 1) == ("seq=8", plans[0])
    assert auto(plans[0] / 0.9 - 1) == ("model=2,seq=4", plans[1])
    assert auto(plans[2] / 0.9) == ("model=4,seq=2", plans[2])
    assert auto(plans[3] / 0.9) == ("model=4,seq=2", plans[2]), "the fewest on `model` that fit, not the smallest"
    with pytest.raises(MemoryPlanError, match=r"no mesh of 8 devices fits 1.00 GiB .*seq=8 .*GiB; .*model=8 .*GiB"):
        auto(2**30)


# training: float32 models (CPU XLA upcasts bf16 matmuls and hoists float32 copies of the
# weights out of the layer loop, which an accelerator does not do and the plan does not count)
TRAIN_CASES = {
    "tiny_full": lambda: (load_config("tiny"), 4, None),
    "tiny_lora": lambda: (load_config("tiny"), 4, _lora(4)),
    "mid_full": lambda: (_mid_f32(), 2, None),
    "mid_lora": lambda: (_mid_f32(), 2, _lora(16)),
}
SLOW_TRAIN_CASES = {"mid_full", "mid_lora"}  # compiling a 1024-wide train step takes a while


def _lora(rank):
    from magi_jax.lora import LoRAConfig

    return LoRAConfig(rank=rank)


def _mid_f32():
    return load_config("4.5B_base").replace(
        model=MID | dict(params_dtype="float32"), runtime=dict(video_size_h=128, video_size_w=128)
    )


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TRAIN_CASES else n for n in TRAIN_CASES]
)
@pytest.mark.slow
def test_training_plan_within_20_percent_of_allocation(name):
    from magi_jax.memory_plan import compiled_train_memory, plan_training_memory

    cfg, chunks, lora = TRAIN_CASES[name]()
    measured = compiled_train_memory(cfg, chunks, lora)
    planned = plan_training_memory(cfg, chunks, lora=lora, flash_attention=False).total
    assert 0.8 * measured <= planned <= 1.2 * measured, (planned, measured)


def test_training_plan_parts():
    from magi_jax.memory_plan import plan_training_memory

    cfg = load_config("4.5B_base")
    full = plan_training_memory(cfg, 4, flash_attention=True)
    lora = plan_training_memory(cfg, 4, lora=_lora(16), flash_attention=True)
    assert full.trainable > 7 * lora.params  # 16 bytes (fp32 master, grads, AdamW moments) vs 2 (bf16)
    assert lora.trainable < 0.1 * lora.params  # rank-16 adapters are small next to the frozen base
    assert plan_training_memory(cfg, 4, {"model": 8}, lora=_lora(16)).params < 0.3 * lora.params
