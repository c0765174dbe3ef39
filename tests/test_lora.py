"""LoRA adapters: a fresh one changes nothing, training moves only adapters, saved adapters
load and merge to the trained model, generate takes them, and a fine-tune on one motion pulls
samples toward it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_clips import blob_latents, clips, mechanics_config, sampling_captions

from magi_jax import checkpoint
from magi_jax.config import load_config
from magi_jax.dit import DiT
from magi_jax.forward_call import Captions
from magi_jax.lora import (
    ALL_TARGETS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    LoRAParam,
    apply_lora,
    check_compatible,
    load_lora,
    merge_lora,
    parse_lora_arg,
    save_lora,
)
from magi_jax.objective import ObjectiveConfig, clip_call
from magi_jax.train import TrainConfig, Trainer

CFG = mechanics_config()


def _inputs():
    batch = clips(CFG, [blob_latents(CFG, 0.3)], [1])
    t = np.array([0.9, 0.7, 0.4, 0.1], np.float32)
    r = 4
    captions = Captions(batch.caption[:1, :r], batch.caption_mask[:1, :r])
    return batch.latents[0], captions, clip_call(jnp.asarray(t), 2, 32)  # 4 chunks of 2 frames, 32 tokens


def _forward(model):
    x, captions, call = _inputs()
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s: nnx.merge(graphdef, s)(x, captions, call)[0])
    return np.asarray(f(state))


def test_fresh_adapter_changes_nothing():
    ref = _forward(DiT(CFG.model, rngs=nnx.Rngs(0)))
    model = apply_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), LoRAConfig(rank=4))
    layers = model.segments[0].layers
    assert all(isinstance(getattr(layers, n), LoRALinear) for n in ALL_TARGETS)
    assert all(not np.asarray(getattr(layers, n).lora_b[...]).any() for n in ALL_TARGETS)  # B starts at zero
    # equal up to float rounding: the adapted model is another program, which XLA may round
    # differently (it does when compiled without optimisations, as the tests are: conftest.py)
    got = _forward(model)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_a_swiglu_adapter_merges_into_gate_and_up(tmp_path):
    """24B's fc1 kernel is held as (2, F, O / 2), gate and up side by side (layers.kernel_shape):
    its adapter's B is (r, 2, O / 2), and a merge folds it into the same columns the unmerged
    adapter adds to."""
    cfg = mechanics_config(model=dict(gated_linear_unit=True))
    lcfg = LoRAConfig(rank=4, targets=("fc1",))
    model = apply_lora(DiT(cfg.model, rngs=nnx.Rngs(0)), lcfg)
    b = model.segments[0].layers.fc1.lora_b
    assert b.shape[-2:] == (2, cfg.model.ffn_hidden_size)
    b[...] = 0.1 * jax.random.normal(jax.random.key(1), b.shape)
    adapted = _forward(model)
    save_lora(model, lcfg, cfg, tmp_path / "glu.lora")
    merged = _forward(merge_lora(DiT(cfg.model, rngs=nnx.Rngs(0)), tmp_path / "glu.lora", cfg))
    base = _forward(DiT(cfg.model, rngs=nnx.Rngs(0)))
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-4 * np.abs(adapted).max())


def test_targets_and_options():
    assert LoRAConfig.parse_targets("attn,mlp") == ("q", "k", "v", "proj", "fc1", "fc2")
    assert LoRAConfig.parse_targets("q, v, cross") == ("q", "v", "qx", "kv_xattn")
    with pytest.raises(LoRAError, match="unknown LoRA target 'ffn'"):
        LoRAConfig.parse_targets("attn,ffn")
    model = apply_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), LoRAConfig(rank=2, targets=("q", "fc2")))
    layers = model.segments[0].layers
    assert isinstance(layers.q, LoRALinear) and not isinstance(layers.k, LoRALinear)
    # A (layers, in, rank), B (layers, rank, out), only on the chosen linears
    shapes = {p[-2:]: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    n, d, f = CFG.model.num_layers, CFG.model.hidden_size, CFG.model.ffn_hidden_size
    assert shapes == {("q", "lora_a"): (n, d, 2), ("q", "lora_b"): (n, 2, d), ("fc2", "lora_a"): (n, f, 2),
                      ("fc2", "lora_b"): (n, 2, d)}  # fmt: skip
    quant = load_config("4.5B_distill_quant")
    with pytest.raises(LoRAError, match="fp8"):
        apply_lora(nnx.eval_shape(lambda: DiT(quant.model, fp8_quant=True, distill=True)), LoRAConfig())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Three LoRA steps on the TINY model, the adapter saved on its own."""
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "proj", "qx", "kv_xattn", "fc1", "fc2"))
    tcfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, batch_size=2, lora=lcfg)
    base = DiT(CFG.model, rngs=nnx.Rngs(0))
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(base))}
    trainer = Trainer(base, CFG, tcfg)
    state = trainer.init_state()
    batch = clips(CFG, [blob_latents(CFG, 0.0), blob_latents(CFG, 1.0)], [1, 2])
    for _ in range(3):
        state, _ = trainer.step(state, batch)
    path = tmp_path_factory.mktemp("adapters") / "motion.lora"
    summary = save_lora(trainer.model(state), lcfg, CFG, path)
    return dict(trainer=trainer, state=state, before=before, path=path, summary=summary, lcfg=lcfg)


@pytest.mark.slow
def test_training_moves_only_adapters(finetuned):
    trainer, state = finetuned["trainer"], finetuned["state"]
    # a wrapped linear keeps its weights under `base`
    unwrap = lambda path: tuple(k for k in path if k != "base")  # noqa: E731
    frozen = {unwrap(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainer.frozen)}
    assert frozen.keys() == finetuned["before"].keys()  # every base weight is frozen ...
    for p, a in frozen.items():
        np.testing.assert_array_equal(a, finetuned["before"][p], err_msg=str(p))  # ... and unchanged
    trained = dict(nnx.to_flat_state(state.params))
    assert trained and all(p[-1] in ("lora_a", "lora_b") for p in trained)
    assert all(np.abs(np.asarray(v.get_value())).max() > 0 for p, v in trained.items() if p[-1] == "lora_b")


@pytest.mark.slow
def test_saved_adapter_is_small_and_loads_or_merges_to_the_trained_model(finetuned):
    path, lcfg = finetuned["path"], finetuned["lcfg"]
    meta = checkpoint.read_meta(path)
    assert meta["model"] == "lora" and meta["config"]["lora"] == lcfg.to_dict()
    n_adapter = sum(a.size for a in jax.tree.leaves(finetuned["state"].params))
    assert finetuned["summary"]["parameters"] == n_adapter
    trained = _forward(finetuned["trainer"].model(finetuned["state"]))
    loaded, got_cfg = load_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), path, CFG)
    assert got_cfg == lcfg
    np.testing.assert_array_equal(_forward(loaded), trained)
    merged = merge_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), path, CFG)
    assert not nnx.state(merged, LoRAParam)  # folded in: plain kernels again
    np.testing.assert_allclose(_forward(merged), trained, rtol=0, atol=1e-4 * np.abs(trained).max())
    base = _forward(DiT(CFG.model, rngs=nnx.Rngs(0)))
    assert np.abs(trained - base).max() > 1e-3  # the adapter does something
    half = _forward(merge_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), path, CFG, scale=0.0))
    np.testing.assert_array_equal(half, base)  # scale 0 leaves the weights as they were


@pytest.mark.slow
def test_adapter_for_another_model_is_refused(finetuned, tmp_path):
    other = CFG.replace(model=dict(hidden_size=128, ffn_hidden_size=256))
    with pytest.raises(LoRAError, match="hidden_size"):
        check_compatible(finetuned["path"], other)
    assert parse_lora_arg(f"{finetuned['path']}:0.5") == (finetuned["path"], 0.5)
    assert parse_lora_arg(str(finetuned["path"])) == (finetuned["path"], 1.0)
    with pytest.raises(LoRAError, match="does not exist"):
        parse_lora_arg(str(tmp_path / "nope.lora:0.5"))


def test_generate_refuses_a_bad_adapter_before_loading(finetuned, tmp_path, capsys):
    from magi_jax.generate import main

    out = tmp_path / "x.mp4"
    fast = ["--num_frames", "16", "--num_steps", "4", "--size", "32x32"]
    assert main(["--prompt", "a fox", "--output_path", str(out), "--lora", str(tmp_path / "missing"), *fast]) == 2
    assert "missing" in capsys.readouterr().err and not out.exists()
    (tmp_path / "plain").mkdir()
    assert main(["--prompt", "a fox", "--output_path", str(out), "--lora", str(tmp_path / "plain"), *fast]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_merge_command_writes_a_checkpoint_generate_can_load(finetuned, tmp_path):
    from magi_jax.dit_weights import load_dit
    from magi_jax.lora import main

    base = tmp_path / "base.magi_jax"
    flat = {p: np.asarray(v) for p, v in finetuned["before"].items()}
    checkpoint.save(flat, base, "dit", CFG.to_dict())
    cfg_file = tmp_path / "tiny.json"
    CFG.to_json(cfg_file)
    out = tmp_path / "merged.magi_jax"
    args = ["merge", "--config_file", str(cfg_file), "--dit_ckpt", str(base), "--out", str(out)]
    assert main([*args, "--lora", f"{finetuned['path']}:1.0"]) == 0
    merged = load_dit(out, CFG)
    want = _forward(merge_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), finetuned["path"], CFG))
    np.testing.assert_array_equal(_forward(merged), want)
    assert main([*args, "--lora", str(finetuned["path"])]) == 2  # exists: refused without --overwrite


@pytest.mark.slow
def test_finetune_on_one_motion_pulls_samples_toward_it(tmp_path):
    """A LoRA fine-tune on clips of a blob moving right: the sampler's output (same seeds,
    same caption) gets closer to those clips - the mean squared distance to the nearest
    training clip falls by more than a third."""
    from magi_jax.sampler import Sampler

    motion = [blob_latents(CFG, 0.0, offset=(dy, -2.0)) for dy in (-1.5, -0.5, 0.5, 1.5)]

    def distance(model):
        cap, mask = sampling_captions(CFG, model, 42)
        sampler = Sampler(model, CFG)
        out = []
        for seed in (0, 1):
            x = np.concatenate(list(sampler.chunks(cap, mask, seed=seed)), axis=2)[0]
            out.append(min(float(np.mean((x - c) ** 2)) for c in motion))
        return float(np.mean(out))

    before = distance(DiT(CFG.model, rngs=nnx.Rngs(0)))
    lcfg = LoRAConfig(rank=8, alpha=8.0)
    tcfg = TrainConfig(
        learning_rate=1e-2, warmup_steps=10, total_steps=120, batch_size=4, weight_decay=0.0, lora=lcfg,
        objective=ObjectiveConfig(caption_dropout=0.1),
    )  # fmt: skip
    trainer = Trainer(DiT(CFG.model, rngs=nnx.Rngs(0)), CFG, tcfg)
    state = trainer.init_state()
    batch = clips(CFG, motion, [42] * 4)
    for _ in range(120):
        state, _ = trainer.step(state, batch)
    save_lora(trainer.model(state), lcfg, CFG, tmp_path / "motion.lora")
    after = distance(merge_lora(DiT(CFG.model, rngs=nnx.Rngs(0)), tmp_path / "motion.lora", CFG))
    assert after < 0.67 * before, (before, after)


@pytest.mark.slow
def test_generate_runs_with_adapters(tmp_path, capsys):
    """`--lora PATH[:SCALE]`, twice: both adapters are merged into the DiT and the video is written."""
    from magi_jax.generate import main

    # an adapter for the command's model (the tiny variant at its own width), not trained:
    # what is checked here is the command's plumbing
    tiny, lcfg = load_config("tiny"), LoRAConfig(rank=2)
    path = tmp_path / "fresh.lora"
    save_lora(apply_lora(DiT(tiny.model, rngs=nnx.Rngs(0)), lcfg), lcfg, tiny, path)
    out = tmp_path / "fox.mp4"
    fast = ["--num_frames", "16", "--num_steps", "4", "--size", "32x32"]
    lora = ["--lora", f"{path}:0.5", "--lora", str(path)]
    assert main(["--prompt", "a fox", "--output_path", str(out), *lora, *fast]) == 0
    err = capsys.readouterr().err
    assert err.count("merging LoRA adapter") == 2 and "scale 0.5" in err
    assert out.stat().st_size > 0
