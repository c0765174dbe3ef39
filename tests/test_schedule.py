"""The schedule tables equal upstream's exactly (kind `schedules`)."""

import numpy as np
import parity
import pytest

from magi_jax import schedule
from magi_jax.config import RuntimeConfig


def _cases(fx):
    c = fx.meta["cases"]
    for case in c["init_t"]:
        yield case["key"], ("init_t", case)
    for case in c["init_intervel"]:
        yield case["key"], ("init_interval", case)
    for case in c["generate_sequences"]:
        yield case["key"], ("stage_table", case)
    for i, case in enumerate(c["get_cfg_scale"]):
        yield f"get_cfg_scale/{i}", ("cfg_scales", case)


@pytest.mark.parametrize("fx,case", parity.cases("schedules", _cases))
def test_schedule_table(fx, case):
    what, c = case
    ref = fx.arrays
    if what == "init_t":
        got = schedule.init_t(c["num_steps"], c["shortcut_mode"], c["t_schedule_config"])
        want = ref[c["key"]]
    elif what == "init_interval":
        got = schedule.init_interval(c["num_steps"], c["shortcut_mode"])
        want = ref[c["key"]]
        assert got.dtype == want.dtype, "the interval dtype decides the distill embedding"
    elif what == "stage_table":
        got = schedule.stage_table(c["chunk_num"], c["window_size"], c["chunk_offset"])
        want = ref[c["key"]]
    else:
        rt = RuntimeConfig(**{k: tuple(v) for k, v in c["runtime_config"].items()})
        p, s = schedule.cfg_scales(ref["get_cfg_scale/t"], rt)
        np.testing.assert_array_equal(p, ref["get_cfg_scale/prev_chunk_scale"])
        got, want = s, ref["get_cfg_scale/text_scale"]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_float32_threshold_quirk():
    # t[6] of the 8-step schedule is float32(0.3) > 0.3: the distill near-clean branch is taken.
    t = schedule.init_t(8)
    assert float(t[6]) > 0.3 and float(t[-1]) > 1.0


def test_cfg_lookup_rejects_time_outside_range():
    with pytest.raises(ValueError, match="cfg_t_range"):
        schedule.cfg_scales([-0.5], RuntimeConfig())
