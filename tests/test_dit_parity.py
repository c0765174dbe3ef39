"""Every recorded upstream forward_dispatcher call (kind `dit`, `calls[]`) replays here.

Weights go through the real converter; the KV cache is rebuilt from the rows the call read
(NaN elsewhere, as the harness ran it); the returned velocity and the cache rows the call
wrote are held to the fixture's per-array tolerance.
"""

import parity
import pytest
from dit_fixtures import call_inputs, check_call, model_of

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
    check_call(fx, call, out, cache, ref)
