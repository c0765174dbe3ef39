"""The generate command: every mode end to end on TINY, and every bad input refused early."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import jax
import numpy as np
import pytest

from magi_jax import memory_plan
from magi_jax.config import CONFIG_DIR
from magi_jax.generate import main

ROOT = Path(__file__).resolve().parent.parent
# small and quick: 16 frames = 4 latent frames = 2 chunks, 4 steps, 32x32 pixels
FAST = ["--num_frames", "16", "--num_steps", "4", "--size", "32x32"]


def _probe(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    reader.close()
    return meta["fps"], tuple(meta["size"]), frames


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    iio.imwrite(d / "cat.png", rng.integers(0, 255, (45, 60, 3), dtype=np.uint8))
    writer = imageio_ffmpeg.write_frames(
        str(d / "clip.mp4"), (48, 40), fps=24, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)
    for _ in range(30):
        writer.send(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    writer.close()
    (d / "broken.png").write_bytes(b"not an image")
    return d


@pytest.mark.slow
def test_t2v_command_line(tmp_path):
    """The README's command, as a user runs it: the bundled model, no note about noise."""
    out = tmp_path / "ball.mp4"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi_jax.generate",
            "--prompt",
            "a yellow ball moves down",
            "--output_path",
            str(out),
            *FAST,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "random weights" not in run.stderr and "magi_jax/assets/tiny/t5" in run.stderr
    assert _probe(out) == (24.0, (32, 32), 16)
    assert [p.name for p in tmp_path.iterdir()] == ["ball.mp4"], "no temporary file left behind"


def test_random_weights_say_so(tmp_path, capsys):
    assert main(["--random_weights", "--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), *FAST]) == 0
    assert "random weights" in capsys.readouterr().err
    released = ["--config_file", "4.5B_distill", "--prompt", "p", "--output_path", str(tmp_path / "y.mp4")]
    assert main(["--random_weights", *released]) == 2
    assert "--random_weights runs the tiny variant" in capsys.readouterr().err


def test_auto_mesh_is_the_one_the_memory_plan_fits(tmp_path, capsys):
    # the host's memory holds TINY on every mesh: all 8 devices stay on `seq`, as by default
    out = tmp_path / "x.mp4"
    assert main(["--random_weights", "--mesh", "auto", "--prompt", "p", "--output_path", str(out), *FAST]) == 0
    assert "--mesh auto: seq=8 (parameters " in capsys.readouterr().err and out.exists()


@pytest.mark.slow
def test_i2v(tmp_path, media):
    out = tmp_path / "cat.mp4"
    assert (
        main(
            [
                "--mode",
                "i2v",
                "--image_path",
                str(media / "cat.png"),
                "--prompt",
                "a cat",
                "--output_path",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    # the image adds one latent frame: 5 latent frames -> 3 chunks of 2, all handed out (upstream keeps the first)
    assert _probe(out) == (24.0, (32, 32), 24)


@pytest.mark.slow
def test_v2v(tmp_path, media):
    out = tmp_path / "more.mp4"
    assert (
        main(
            [
                "--mode",
                "v2v",
                "--prefix_video_path",
                str(media / "clip.mp4"),
                "--prefix_frames",
                "8",
                "--prompt",
                "it goes on",
                "--output_path",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    # 8 prefix frames = 2 latent frames = 1 clean chunk, then the 16 requested frames
    assert _probe(out) == (24.0, (32, 32), 16)


def _config_file(tmp_path, edit):
    d = json.loads((CONFIG_DIR / "tiny.json").read_text())
    edit(d)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    return str(path)


def _released_folder(tmp_path, name):
    """A folder laid out as upstream releases it (the weights' bytes are never read here)."""
    folder = tmp_path / "ckpt" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").touch()
    return folder


BAD = [
    (lambda t, m: ["--mode", "x2v"], "unknown --mode 'x2v'"),
    (lambda t, m: ["--mode", "i2v"], "--mode i2v needs --image_path"),
    (lambda t, m: ["--mode", "v2v"], "--mode v2v needs --prefix_video_path"),
    (lambda t, m: ["--mode", "i2v", "--image_path", str(t / "nope.png")], "does not exist"),
    (lambda t, m: ["--mode", "i2v", "--image_path", str(m / "broken.png")], "cannot read image"),
    (
        lambda t, m: ["--mode", "v2v", "--prefix_video_path", str(m / "cat.png"), "--prefix_frames", "6"],
        "--prefix_frames 6 must be 0, 1 or a multiple of 4",
    ),
    (lambda t, m: ["--config_file", str(t / "missing.json")], "no such file, and not a variant name"),
    (
        lambda t, m: ["--config_file", _config_file(t, lambda d: d["model_config"].pop("num_layers"))],
        "missing field(s) model_config.num_layers",
    ),
    (
        lambda t, m: ["--config_file", _config_file(t, lambda d: d["runtime_config"].update(cfg_number=1))],
        "base models use 3-way guidance",
    ),
    (lambda t, m: ["--size", "100x64"], "must be a multiple of 16"),
    (lambda t, m: ["--num_frames", "30"], "num_frames (30) must be a multiple of 4"),
    (lambda t, m: ["--num_steps", "10"], "num_steps (10) must be a multiple of window_size (4)"),
    (lambda t, m: ["--output_path", str(t / "no" / "dir" / "x.mp4")], "does not exist"),
    (lambda t, m: ["--output_path", str(t / "x.avi")], "must end in .mp4"),
    (lambda t, m: ["--config_file", "4.5B_distill", "--size", "256x256", "--num_frames", "24"], "no DiT weights"),
    (
        lambda t, m: (
            ["--config_file", "4.5B_distill", "--size", "256x256", "--num_frames", "24"]
            + ["--dit_ckpt", str(_released_folder(t, "inference_weight"))]
        ),
        "holds base weights, but the config is a distilled model",
    ),
    (lambda t, m: ["--mesh", "4x4"], "mesh '4x4' needs 16 devices, 8 are present"),  # the session has 8 (conftest)
    # 24B base at 1440x2560 on this session's 8 devices (seq=8): about 86 GiB each
    (lambda t, m: ["--config_file", "24B_base", "--size", "1440x2560", "--num_frames", "960"], "but a device holds"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_error(tmp_path, media, capsys, monkeypatch, args, message):
    # the memory check reads the device's capacity; an 80 GiB device makes the cases independent
    # of the host
    monkeypatch.setattr(memory_plan, "device_capacity", lambda device=None: 80 * 2**30)
    argv = ["--prompt", "p", "--output_path", str(tmp_path / "out.mp4")] + args(tmp_path, media)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not any(p.suffix == ".mp4" for p in tmp_path.rglob("*")), "nothing written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["--prompt", "p", "--output_path", str(locked / "x.mp4")]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    from magi_jax import vae_runtime

    calls = []

    def failing_decode(self, latents, tiles=None, **kw):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(vae_runtime.Vae, "decode_chunk", failing_decode)
    with pytest.raises(KeyboardInterrupt):
        main(["--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), *FAST])
    assert calls and list(tmp_path.iterdir()) == []


def test_a_broken_cached_program_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """XLA:CPU's "Function <kernel> not found" from a program read from the compilation cache
    names the folder and the way out, not a traceback."""
    from magi_jax import compile_cache, pipeline

    def incomplete_program(plan, options):
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Function broadcast_select_fusion not found (type id: 1)")

    monkeypatch.setattr(pipeline, "run", incomplete_program)
    cache, before = tmp_path / "cache", jax.config.jax_compilation_cache_dir
    args = ["--prompt", "p", "--output_path", str(tmp_path / "x.mp4"), "--compilation_cache", str(cache)]
    try:
        assert main(args) == 1
    finally:
        compile_cache.enable(before or "off")  # the session's cache (conftest)
    err = capsys.readouterr().err
    assert f"compilation cache {cache} is incomplete" in err and "--compilation_cache off" in err
    assert "Traceback" not in err and not (tmp_path / "x.mp4").exists()
