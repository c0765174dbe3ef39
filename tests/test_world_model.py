"""The bundled default model draws what its prompts ask for, measured from its frames.

The generate command with no weights runs the model world_model.py trained on the procedural
ball world. Each clip is decoded from the written mp4 and read back with
synthetic_world.describe (the dominant ball's colour, and the way its centroid moves, fitted
over the clip). Issue 16's bar: colour and direction right on at least 5 of 6 prompts that
differ in both, at seed 1 and the 16 frames generated below. The held-out (colour, direction)
pairs, which no training clip shows, are scored and printed; only their colour is held.
I2V from a still frame and V2V from a generated clip continue the motion.
bench/world_model_eval.py scores more seeds.
"""

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from magi_jax import synthetic_world, t5, world_model
from magi_jax.config import load_config
from magi_jax.dit_weights import load_dit
from magi_jax.generate import main
from magi_jax.pipeline import bundled_weights, with_bundled_weights
from magi_jax.vae_weights import load_vae
from magi_jax.video_io import read_frames

PROMPTS = synthetic_world.SCORED
_prompt = synthetic_world.roll_prompt


def _frames(path) -> np.ndarray:
    return read_frames(path, 24, 64, 64)


def _generate(tmp, name: str, *args) -> np.ndarray:
    """16 frames (two chunks: the second continues the first through the KV cache), the
    variant's size, steps and guidance."""
    out = tmp / f"{name}.mp4"
    assert main(["--output_path", str(out), "--num_frames", "16", *args]) == 0
    return _frames(out)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    assert bundled_weights() is not None, "the bundled weights are missing from magi_jax/assets/tiny"
    tmp = tmp_path_factory.mktemp("world")
    seen = {p: _generate(tmp, "_".join(p), "--prompt", _prompt(*p), "--seed", "1") for p in PROMPTS}
    held = {p: _generate(tmp, "_".join(p), "--prompt", _prompt(*p), "--seed", "1") for p in synthetic_world.HELD_OUT}
    return tmp, seen, held


@pytest.mark.slow
def test_the_prompts_colour_is_what_the_video_shows(clips):
    _, seen, held = clips
    read = {p: synthetic_world.describe(f) for p, f in {**seen, **held}.items()}
    colours = [p for p in read if read[p][0] == p[0]]
    both = [p for p in read if read[p] == p]
    print(f"\ncolour: {len(colours)}/{len(read)}; colour and direction: {len(both)}/{len(read)}")
    for p, got in read.items():
        print(f"  {_prompt(*p)!r}: the video shows {got}{'  (held out)' if p in held else ''}")
    assert sum(read[p] == p for p in PROMPTS) >= 5, read
    assert sum(read[p][0] == p[0] for p in held) >= 2, read  # colours of pairs it never saw


@pytest.mark.slow
def test_i2v_and_v2v_continue_the_motion(clips):
    """A still frame of a rolling ball, animated with its caption, rolls that ball the way the
    caption says; a generated clip, continued, keeps its ball moving the way it was."""
    tmp, _, _ = clips
    rolling = synthetic_world.clip(7, 0, scene="roll")
    image = tmp / "still.png"
    iio.imwrite(image, rolling.frames[0])
    want = (rolling.colours[0], rolling.direction)
    i2v = _generate(tmp, "i2v", "--mode", "i2v", "--image_path", str(image), "--prompt", _prompt(*want))
    assert synthetic_world.describe(i2v) == want

    source = tmp / "blue_left.mp4"
    shown = synthetic_world.describe(_frames(source))
    assert shown[0] == "blue" and shown[1] is not None
    v2v = _generate(
        tmp, "v2v", "--mode", "v2v", "--prefix_video_path", str(source), "--prefix_frames", "8",
        "--prompt", _prompt(*shown),
    )  # fmt: skip
    assert synthetic_world.describe(v2v[-16:]) == shown


@pytest.mark.slow
def test_the_recipe_writes_a_bundle_the_generate_command_runs(tmp_path):
    """The whole recipe at toy counts: every part is written, and generate reads them as the
    weights of the tiny variant."""
    recipe = world_model.Recipe(vae_clips=2, vae_steps=2, vae_batch=2, dit_clips=2, dit_steps=2, dit_batch=2)
    report = world_model.build(tmp_path / "bundle", recipe, work=tmp_path / "work", log=lambda m: None)
    bundle = tmp_path / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["dit", "recipe.json", "t5", "vae"]
    assert report["dit"]["loss_last_100"] > 0 and len(list((tmp_path / "work" / "data" / "clips").iterdir())) == 2
    # what the generate command reads for the tiny variant, read from this bundle
    config = with_bundled_weights(load_config("tiny"), bundle)
    dit = load_dit(Path(config.runtime.load), config)
    vae = load_vae(Path(config.runtime.vae_pretrained))
    text = t5.load_text_encoder(Path(config.runtime.t5_pretrained))
    emb, _ = text.encode(["a red ball"], config.model.caption_max_length)
    assert emb.shape[-1] == config.model.caption_channels == dit.y_embedder.xattn.kernel.shape[0]
    assert vae.model.cfg.z_chans == config.model.latent_channels
