"""Every recorded upstream forward_dispatcher call (kind `dit`, `calls[]`) replays here.

Weights go through the real converter; the KV cache is rebuilt from the rows the call read
(NaN elsewhere, as the harness ran it); the returned velocity and the cache rows the call
wrote are held to the fixture's per-array tolerance.
"""

import numpy as np
import parity
import pytest
from dit_fixtures import call_inputs, model_of

from magi_jax.guidance import jit_guided

_jitted = {}


def _runner(fx, cfg):
    key = (fx, cfg)
    if key not in _jitted:
        _jitted[key] = jit_guided(model_of(fx), cfg)
    return _jitted[key]


def _calls(fx):
    for call in fx.meta["calls"]:
        yield call["name"], call


@pytest.mark.parametrize("fx,call", parity.cases("dit", _calls))
def test_forward_call(fx, call):
    cfg, args, cache, ref = call_inputs(fx, call)
    out, cache = _runner(fx, cfg)(*args, cache)
    tol = fx.meta["tolerance"]
    key = f"calls/{call['name']}"
    parity.check_array(out, ref["out"][0], tol[f"{key}/out"], f"{fx.id}/{call['name']} out")

    lo, hi = call["kv_read_rows"], call["kv_write_end"]
    k, v = np.asarray(cache.k.astype(np.float32)), np.asarray(cache.v.astype(np.float32))
    if hi > lo:
        written = np.concatenate([k[:, lo:hi], v[:, lo:hi]], axis=-1)
        parity.check_array(
            written, ref["kv_cache_written"], tol[f"{key}/kv_cache_written"], f"{fx.id}/{call['name']} kv_cache_written"
        )
    # upstream writes nothing past kv_write_end: those rows keep the NaN they were built with
    assert np.isnan(k[:, hi:]).all() and np.isnan(v[:, hi:]).all(), "cache rows written past kv_write_end"
