"""The VAE trained as an autoencoder on the procedural world: the loss falls, and what is
saved is what `load_vae` (the generate command's --vae_ckpt) reads back."""

import jax
import numpy as np
import pytest

from magi_jax import vae_train
from magi_jax.vae import TINY
from magi_jax.vae_weights import load_vae


@pytest.fixture(scope="module")
def trained():
    trainer = vae_train.VaeTrainer(TINY, vae_train.VaeTraining(steps=40, batch=2, lr=2e-3, warmup=5))
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
    assert vae_train.main(["--out", str(tmp_path / "v"), "--size", "60x64", "--frames", "6"]) == 2
    err = capsys.readouterr().err
    assert "multiples of 8" in err and "multiple of 4" in err
    assert not (tmp_path / "v").exists()
