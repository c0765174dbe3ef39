"""The VAE trained as an autoencoder on the procedural world: the loss falls, and what is
saved is what `load_vae` (the generate command's --vae_ckpt) reads back."""

import jax
import numpy as np
import pytest

from magi_jax import vae_train
from magi_jax.vae import WORLD
from magi_jax.vae_weights import load_vae


@pytest.fixture(scope="module")
def trained():
    trainer = vae_train.VaeTrainer(WORLD, vae_train.VaeTraining(steps=40, batch=2, lr=2e-3, warmup=5))
    data = vae_train.world_batches(8, 2, (32, 32), 8)
    losses = [trainer.step(next(data))["reconstruction"] for _ in range(40)]
    return trainer, losses


def test_reconstruction_improves_with_training(trained):
    _, losses = trained
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_the_saved_vae_loads_as_the_generate_command_reads_it(trained, tmp_path):
    trainer, _ = trained
    trainer.save(tmp_path / "vae.magi_jax")
    vae = load_vae(tmp_path / "vae.magi_jax", dtype=jax.numpy.float32, attention_dtype=jax.numpy.float32)
    x = next(vae_train.world_batches(2, 1, (32, 32), 8, seed=5))
    np.testing.assert_array_equal(np.asarray(vae.model.moments(x)), np.asarray(trainer.model.moments(x)))


def test_the_command_refuses_bad_sizes_before_training(tmp_path, capsys):
    assert vae_train.main(["--out", str(tmp_path / "v"), "--size", "62x64", "--frames", "6"]) == 2
    err = capsys.readouterr().err
    assert f"multiples of {WORLD.patch_size}" in err and f"multiple of {WORLD.patch_length}" in err
    assert not (tmp_path / "v").exists()


def test_the_training_decoder_is_the_inference_decoder():
    """Training decodes with the shifted-sum convolution (fast on CPU); it must compute the
    same frames as the lax.conv the generate command decodes with."""
    import jax.numpy as jnp
    from flax import nnx

    from magi_jax.vae import VaeModel

    model = VaeModel(WORLD, dtype=jnp.float32, attention_dtype=jnp.float32, rngs=nnx.Rngs(3))
    z = jax.random.normal(jax.random.key(0), (2, WORLD.z_chans, 2, 4, 4), jnp.float32)
    inference = np.asarray(model.decode(z, strided=False))
    training = np.asarray(model.decode(z, strided=False, shifted_conv=True))
    side = 4 * WORLD.patch_size
    assert inference.shape == (2, 3, 2 * WORLD.patch_length, side, side)
    np.testing.assert_allclose(training, inference, rtol=0, atol=1e-5 * np.abs(inference).max())


def test_calibration_moves_only_the_latents_scale(trained):
    """After calibrate, the posterior means have the asked standard deviation and the frames
    decoded from them are the frames decoded before."""
    trainer, _ = trained
    batches = [next(vae_train.world_batches(4, 2, (32, 32), 8, seed=9))]
    x = jax.numpy.asarray(batches[0])

    def means_and_frames(model):
        from magi_jax.vae import posterior

        mean = posterior(model.moments(x))[0]
        return np.asarray(mean), np.asarray(model.decode(mean, strided=False))

    before_mean, before_frames = means_and_frames(trainer.model)
    c = trainer.calibrate(batches, 0.75)
    after_mean, after_frames = means_and_frames(trainer.model)
    assert abs(np.std(after_mean) - 0.75) < 1e-3 and abs(c - 0.75 / np.std(before_mean)) < 1e-4 * c
    np.testing.assert_allclose(after_mean, before_mean * c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after_frames, before_frames, rtol=0, atol=1e-4)
