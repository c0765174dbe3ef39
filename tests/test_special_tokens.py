"""Special tokens and per-chunk captions equal upstream's (kinds `special_tokens_pad`, `dit` runs)."""

import numpy as np
import parity
import pytest
from dit_fixtures import model_of

from magi_jax.config import RuntimeConfig
from magi_jax.special_tokens import caption_side, null_side, sampler_captions, token_table


def _cases(fx):
    for case in fx.meta["cases"]:
        yield case["name"], case


def _runtime(env: dict) -> RuntimeConfig:
    from magi_jax.config import load_config

    off = {f: "0" for f in ("PAD_HQ", "PAD_DURATION")}  # the fixture lists every flag it sets
    return load_config("tiny").apply_env({**off, **env}).runtime


@pytest.mark.parametrize("fx,case", parity.cases("special_tokens_pad", _cases))
def test_special_token_padding(fx, case):
    a, name = fx.arrays, case["name"]
    table = token_table(parity.data_file("special_tokens.npz"))
    rt = _runtime(case["env"])
    if case["function"].endswith("_process_txt_embeddings"):
        embs, masks = caption_side(
            a["input/caption_embs"],
            a["input/emb_masks"],
            a["input/null_caption_embedding"],
            case["infer_chunk_num"],
            case["clean_chunk_num"],
            rt,
            table,
        )
        want_e, want_m = a[f"{name}/caption_embs"], a[f"{name}/emb_masks"]
    else:
        n = case["infer_chunk_num"]
        null_mask = np.zeros((1, n, a["input/null_caption_embedding"].shape[1]), np.float32)
        embs, masks = null_side(a["input/null_caption_embedding"], null_mask, n, rt, table)
        want_e, want_m = a[f"{name}/null_embs"], a[f"{name}/null_emb_masks"]
    assert masks.dtype == want_m.dtype, "mask dtype follows upstream (int64 until a token is prepended)"
    np.testing.assert_array_equal(embs, want_e.astype(np.float32))
    np.testing.assert_array_equal(masks, want_m)


def _runs(fx):
    for run in fx.meta["runs"]:
        yield run["name"], run


@pytest.mark.parametrize("fx,run", parity.cases("dit", _runs))
def test_run_captions(fx, run):
    """The sampler's (caption, null) rows per chunk for a whole upstream run."""
    from test_sampler_parity import run_arrays, run_config

    from magi_jax.sampler_plan import layout

    cfg = run_config(fx, run)
    a = run_arrays(fx, run)
    # the tiny runs read the released tokens truncated to caption_channels, stored in the fixture
    table = token_table({k: fx.arrays[f"special_tokens/{k}"] for k in ("caption_token", "logo_token", "other_tokens")})
    lay = layout(cfg, run["prefix_latent_frames"])
    null = np.asarray(model_of(fx).y_embedder.null_caption[...])[None]
    y, masks = sampler_captions(
        a["caption_embs"],
        a["emb_masks"],
        null,
        lay.chunk_num,
        lay.clean_chunks,
        cfg.runtime,
        table,
        max_len=cfg.model.caption_max_length,
    )
    parity.check_array(y, a["y"], fx.meta["tolerance"][f"runs/{run['name']}/y"], "y")
    np.testing.assert_array_equal(masks, a["emb_masks_processed"])
