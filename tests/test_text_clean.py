"""Caption cleaning reproduces upstream's strings exactly (kind `t5_clean_text`)."""

import json

import parity
import pytest

from magi_jax.text_clean import PASS, clean_caption, clean_once, steps_changed


def _cases(fx):
    for case in json.loads((fx.folder / fx.meta["files"]["cases"]).read_text()):
        yield case["id"], case


@pytest.mark.parametrize("fx,case", parity.cases("t5_clean_text", _cases))
def test_clean_caption(fx, case):
    assert clean_once(case["input"]) == case["after_first_pass"]
    assert clean_caption(case["input"]) == case["output"]
    if "steps_changed_pass1" in case:  # our step names are the fixture's labels
        assert steps_changed(case["input"]) == case["steps_changed_pass1"]


@pytest.mark.parametrize("fx", parity.fixtures("t5_clean_text"), ids=lambda fx: fx.id)
def test_steps_cover_the_fixture_labels(fx):
    covered = fx.meta.get("coverage", {}).get("steps", [])
    assert set(covered) <= {name for name, _ in PASS}
