"""train.py as two processes of one run (`jax.distributed` on localhost, 2 CPU devices each) against one
process with the same 4 devices: the same losses, the same checkpoint, a resume that works, and only
process 0 writing and speaking. With host-fed batches, each process reads only its own rows; a wrong
split would give different losses (or no global array at all)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt import checkpoint
from tests.test_train_cli import TINY
from tests.test_training import tiny_text

pytestmark = pytest.mark.slow  # every test here runs train.py in a subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shakespeare_char_cpu.py"),
            *TINY, *args]


def _env(tmp_path: pathlib.Path, n_devices: int, **extra: str) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}"
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAXGPT_CACHE=str(tmp_path / "cache"),
                XLA_FLAGS=flags, **extra)


def _one_process(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), env=_env(tmp_path, 4), capture_output=True, text=True, timeout=300, cwd=ROOT)


def _two_processes(tmp_path, *args: str) -> list[tuple[int, str, str]]:
    """Both processes of one run; returns (returncode, stdout, stderr) of process 0 and process 1."""
    port = str(_free_port())
    procs = [subprocess.Popen(_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(tmp_path, 2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def _losses(out_dir: pathlib.Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss"))
            for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("on_device", [False, True])
def test_two_processes_train_as_one(tmp_path, shakespeare_path, on_device):
    text = tiny_text(tmp_path, shakespeare_path)
    common = [f"--config.data.path={text}", "--config.eval_interval=3", "--config.steps_per_call=3",
              "--config.sample_tokens=20", "--config.mesh.fsdp=2", f"--config.data.on_device={on_device}"]
    one = _one_process(tmp_path, *common, f"--config.out_dir={tmp_path / 'one'}", "--config.max_iters=6")
    assert one.returncode == 0, one.stderr[-2000:]
    (rc0, out0, err0), (rc1, out1, err1) = _two_processes(
        tmp_path, *common, f"--config.out_dir={tmp_path / 'two'}", "--config.max_iters=6")
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "mesh: data 2 x fsdp 2 over 4 cpu devices" in out0 and "done: step 6" in out0
    assert "step " not in out1 and "done" not in out1  # process 0 alone reports
    # The sample is the same text (printed once, by process 0).
    assert out0.split("-" * 40)[1] == one.stdout.split("-" * 40)[1]

    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")  # written once: no doubled records
    assert [r[0] for r in a] == [r[0] for r in b] and len(b) == 9
    for ra, rb in zip(a, b):
        for x, y in zip(ra[1:], rb[1:]):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-5), (ra, rb)

    model_a, _, info_a = checkpoint.load_model(tmp_path / "one", "latest")
    model_b, _, info_b = checkpoint.load_model(tmp_path / "two", "latest")
    assert info_a["step"] == info_b["step"] == 6
    diff = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                        nnx.state(model_a, nnx.Param), nnx.state(model_b, nnx.Param))
    assert max(jax.tree.leaves(diff)) < 1e-5

    if on_device:  # resuming a two-process run once is enough
        return
    (rc0, out0, err0), (rc1, _, err1) = _two_processes(
        tmp_path, *common, f"--config.out_dir={tmp_path / 'two'}", "--config.max_iters=9", "--config.resume=True")
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "resumed from" in out0 and "done: step 9" in out0
    assert checkpoint.load_model(tmp_path / "two", "latest")[2]["step"] == 9


def test_a_check_failing_on_process_0_stops_both(tmp_path, shakespeare_path):
    """Process 0 alone takes the run lock: when it cannot, process 1 must not wait for it forever."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "jaxgpt.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive
    (rc0, _, err0), (rc1, _, err1) = _two_processes(
        tmp_path, f"--config.data.path={tiny_text(tmp_path, shakespeare_path)}", f"--config.out_dir={out}")
    assert rc0 == 2 and "is in use by pid" in err0.splitlines()[-1], err0[-2000:]
    assert rc1 == 2 and "process 0 of this run stopped before training" in err1.splitlines()[-1], err1[-2000:]
    assert json.loads((out / "jaxgpt.lock").read_text())["pid"] == os.getpid()  # the other run's lock is kept
