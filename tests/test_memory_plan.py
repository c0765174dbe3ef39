"""The memory plan: within 20% of what XLA really allocates for the sampler's largest step,
divided by the mesh as the sharding table says, and refusing runs that cannot fit."""

import pytest

from magi_jax.config import load_config
from magi_jax.memory_plan import MemoryPlanError, check_fits, compiled_step_memory, plan_memory

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


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_within_20_percent_of_allocation(name):
    cfg = CONFIGS[name]()
    measured = compiled_step_memory(cfg)
    planned = plan_memory(cfg).total
    assert 0.8 * measured <= planned <= 1.2 * measured, (planned, measured)


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
