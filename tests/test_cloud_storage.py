"""Checkpoints in a gs:// bucket: what a TPU pod reads, against a local Cloud Storage.

gcp-storage-emulator serves Cloud Storage's JSON API on localhost; gcsfs (epath's gs://
backend) and tensorstore (orbax's arrays) are pointed at it by their emulator variables,
so the code under test is the code a pod runs, URLs and all.
"""

import os
import socket
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from magi_jax import checkpoint
from magi_jax.generate import main
from magi_jax.pipeline import BUNDLE, BUNDLE_PARTS
from magi_jax.storage import is_url, location
from magi_jax.tensor_file import CheckpointError

BUCKET = "magi-weights"
FAST = ["--num_frames", "16", "--num_steps", "4", "--size", "32x32", "--prompt", "a red ball moves left"]


@pytest.fixture(scope="module")
def bucket():
    """gs://magi-weights holding the bundled checkpoints (tiny/dit, tiny/vae, tiny/t5) and a
    folder of each laid out like released weights (released/dit, released/vae, released/t5)."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
        env.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore
        env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore asks no one for a token
        # read when gcsfs is imported: no gRPC bucket-type probe, which the emulator lacks (60 s per call)
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        gcsfs = pytest.importorskip("gcsfs")
        fs = gcsfs.GCSFileSystem(token="anon")
        for part in BUNDLE_PARTS:
            fs.put(str(BUNDLE / part), f"{BUCKET}/tiny/{part}", recursive=True)
        for name in ("dit/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "t5/config.json"):
            fs.pipe(f"{BUCKET}/released/{name}", b"{}")  # found by name; refused before it is read
        try:
            yield f"gs://{BUCKET}"
        finally:
            server.stop()


def test_a_url_is_not_folded_into_a_local_path(bucket):
    """pathlib would read gs://b/x as gs:/b/x, a folder under the working directory."""
    assert is_url(f"{bucket}/tiny/dit") and not is_url("gs:/b/x") and not is_url("tiny/dit")
    assert os.fspath(location(f"{bucket}/tiny/dit")) == f"{bucket}/tiny/dit"
    assert checkpoint.read_meta(f"{bucket}/tiny/dit")["model"] == "dit"
    assert not checkpoint.is_checkpoint(f"{bucket}/released/dit")


@pytest.mark.slow
def test_generate_from_checkpoints_in_a_bucket_equals_the_local_run(bucket, tmp_path, capsys):
    """Every part read from gs:// (metadata, tokenizer, arrays): the same video, frame for frame."""
    remote, here = tmp_path / "remote.mp4", tmp_path / "local.mp4"
    flags = lambda root: [f"--{p}_ckpt={root}/{p}" for p in BUNDLE_PARTS]  # noqa: E731
    assert main([*FAST, "--config_file", "tiny", *flags(f"{bucket}/tiny"), "--output_path", str(remote)]) == 0, (
        capsys.readouterr().err
    )
    assert f"{bucket}/tiny/t5" in capsys.readouterr().err
    assert main([*FAST, "--config_file", "tiny", *flags(BUNDLE), "--output_path", str(here)]) == 0
    np.testing.assert_array_equal(iio.imread(remote), iio.imread(here))


@pytest.mark.parametrize("part", ["dit", "vae", "t5"])
def test_released_weights_in_a_bucket_are_refused_before_loading(bucket, tmp_path, capsys, part):
    """Released weights are memory-mapped: a bucket must hold the converted checkpoint."""
    given = {p: f"{bucket}/tiny/{p}" for p in BUNDLE_PARTS}
    given[part] = f"{bucket}/released/{part}"
    flags = [f"--{p}_ckpt={v}" for p, v in given.items()]
    out = tmp_path / "x.mp4"
    assert main([*FAST, "--config_file", "tiny", *flags, "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert given[part] in err and "convert_torch_weights.py" in err and "copy that folder" in err
    assert "sampling" not in err and not out.exists()


def test_checkpoints_are_written_locally_then_copied(tmp_path):
    with pytest.raises(CheckpointError, match="write checkpoints to a local folder"):
        checkpoint.save({("w",): np.zeros(2)}, f"gs://{BUCKET}/new", "dit", {})


def test_a_url_without_gcsfs_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs now raises ImportError
    with pytest.raises(CheckpointError, match=r"needs gcsfs; pip install gcsfs"):
        location(f"gs://{BUCKET}/tiny/dit")
