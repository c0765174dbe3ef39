"""Configs: the released variants load as upstream wrote them, and bad files fail clearly."""

import json

import pytest

from magi_jax.config import CONFIG_DIR, VARIANTS, ConfigError, MagiConfig, from_dict, load_config

RELEASED = [v for v in VARIANTS if v != "tiny"]


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_load_and_round_trip(name, tmp_path):
    cfg = load_config(name)
    assert cfg.runtime.cfg_number == (1 if cfg.engine.distill or cfg.engine.fp8_quant else 3)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert load_config(path) == cfg
    hash(cfg)  # frozen and hashable: usable as a jit static argument


def test_released_values():
    base, big = load_config("4.5B_base"), load_config("24B_distill_quant")
    assert (base.model.num_layers, base.model.hidden_size, base.model.num_attention_heads) == (34, 3072, 24)
    assert not base.model.gated_linear_unit and base.model.params_dtype == "bfloat16"
    assert (big.model.num_layers, big.model.hidden_size, big.model.ffn_hidden_size) == (48, 6144, 16384)
    assert big.model.half_channel_vae and big.model.x_rescale_factor == 0.1 and big.engine.fp8_quant
    assert base.runtime.noise2clean_kvrange == (5, 4, 3, 2) and base.runtime.cfg_t_range[-1] == 0.999


def test_upstream_json_loads_as_is():
    # the fixtures carry upstream's own config dicts (torch dtype strings, null paths)
    import parity

    for fx in parity.fixtures("dit"):
        cfg = from_dict(fx.meta["config"], fx.name)
        assert cfg.model.num_layers == fx.meta["config"]["model_config"]["num_layers"]


def _base():
    return json.loads((CONFIG_DIR / "4.5B_base.json").read_text())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["runtime_config"].update(cfg_number=1), r'runtime_config.cfg_number is 1.*"cfg_number": 3'),
        (lambda d: d["engine_config"].update(distill=True), r'cfg_number is 3.*"cfg_number": 1'),
        (lambda d: d["engine_config"].update(fp8_quant=True), r'"cfg_number": 1'),
        (lambda d: d["model_config"].pop("hidden_size"), r"missing field\(s\) model_config.hidden_size"),
        (lambda d: d["model_config"].update(hiden_size=3), r"unknown field\(s\) model_config.hiden_size"),
        (lambda d: d.pop("engine_config"), r"missing section 'engine_config'"),
        (lambda d: d["model_config"].update(params_dtype="torch.int8"), r"params_dtype.*torch.bfloat16"),
        (lambda d: d["runtime_config"].update(num_steps="64"), r"runtime_config.num_steps must be an integer"),
        (lambda d: d["model_config"].update(num_query_groups=5), r"multiple of num_query_groups"),
    ],
)
def test_bad_configs_name_field_and_fix(edit, message):
    d = _base()
    edit(d)
    with pytest.raises(ConfigError, match=message):
        from_dict(d, "my.json")


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="not a variant name"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_environment_flags_override_runtime():
    cfg = load_config("4.5B_distill")
    assert cfg.runtime.pad_hq and cfg.runtime.pad_duration  # upstream's run.sh exports both
    env = cfg.apply_env({"PAD_HQ": "0", "PAD_THREE_D_MODEL": "yes", "prev_chunks_scale": "0.5"})
    assert not env.runtime.pad_hq and env.runtime.pad_three_d_model and env.runtime.prev_chunks_scale == 0.5
    assert cfg.apply_env({}) is cfg


def test_replace_validates():
    cfg = load_config("tiny")
    assert isinstance(cfg.replace(runtime=dict(num_steps=16)), MagiConfig)
    with pytest.raises(ConfigError):
        cfg.replace(runtime=dict(cfg_number=1))
