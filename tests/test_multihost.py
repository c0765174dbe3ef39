"""A pod on one machine: two processes with 4 CPU devices each, joined by
jax.distributed on localhost, run the generate command end to end from terminals (ptys,
so process 0 shows its chunk and step bars), and process 0 writes the video a single
process with all 8 devices writes."""

import fcntl
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest

HELPER = Path(__file__).parent / "helpers" / "generate_frames.py"
# the bundled weights, as a user's first run reads them: each process reads the T5 onto its own
# host (it read it onto jax.devices("cpu")[0], process 0's, and failed there)
ARGS = ["--prompt", "a red ball moves up", "--num_frames", "16", "--num_steps", "4", "--compilation_cache", "off"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _Run:
    """The helper in a subprocess; on a pty (stdout and stderr) when `terminal`."""

    def __init__(self, frames: Path, output: Path, devices: int, terminal: bool, **env):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), **env}
        cmd = [sys.executable, str(HELPER), str(frames), *ARGS, "--output_path", str(output)]
        self.chunks = []
        if terminal:
            main, tty = pty.openpty()
            # a terminal has a size (a bare pty has none, and tqdm then draws empty bars)
            fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=tty, stderr=tty)
            os.close(tty)
            self._reader = threading.Thread(target=self._read, args=(main,), daemon=True)
        else:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self._reader = threading.Thread(target=self._read, args=(self.proc.stdout.fileno(),), daemon=True)
        self._reader.start()

    def _read(self, fd):
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the pty's other end closed
                data = b""
            if not data:
                return
            self.chunks.append(data)

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        self._reader.join(10)
        return code, b"".join(self.chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """The single-process run on 8 devices and the two-process run, started together."""
    d = tmp_path_factory.mktemp("pod")
    port = _free_port()
    runs = {"single": _Run(d / "single.npy", d / "single.mp4", 8, terminal=False)}
    for i in range(2):
        runs[i] = _Run(
            d / f"pod{i}.npy",
            d / "pod.mp4",
            4,
            terminal=True,
            MAGI_DISTRIBUTED="1",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            MAGI_NUM_PROCESSES="2",
            MAGI_PROCESS_ID=str(i),
        )
    results = {name: run.finish(timeout=900) for name, run in runs.items()}
    return d, results


@pytest.mark.slow
def test_two_processes_write_the_single_process_video(pod):
    d, results = pod
    for name, (code, out) in results.items():
        assert code == 0, f"{name}:\n{out[-3000:]}"
    single, first = np.load(d / "single.npy"), np.load(d / "pod0.npy")
    assert single.shape == first.shape == (16, 64, 64, 3)
    assert np.abs(single.astype(int) - first.astype(int)).max() <= 1  # one grey level
    assert (d / "pod.mp4").is_file() and (d / "single.mp4").is_file()
    assert not (d / "pod1.npy").exists()  # only process 0 writes


@pytest.mark.slow
def test_on_a_terminal_only_process_0_reports_with_bars(pod):
    _, results = pod
    first, second = results[0][1], results[1][1]
    assert "chunks:" in first and "steps :" in first, first[-3000:]  # the two tqdm bars
    assert "[4/4] wrote" in first and "timing (8 x cpu" in first
    assert "[1/4]" not in second and "chunks:" not in second and "timing" not in second, second[-3000:]
