"""Runs interrupted for real never lose work: SIGKILL at any moment, SIGTERM, two runs on one out_dir, and a
download cut mid-stream.

Runs that must die for real (SIGKILL, SIGTERM) are children of a `forkserver` that has imported jaxgpt once: each
child skips the imports, and the XLA cache they share skips compilation.
"""

from __future__ import annotations

import errno
import http.server
import inspect
import io
import json
import multiprocessing
import os
import pathlib
import random
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
import pytest

from jaxgpt import checkpoint as ckpt_lib
from jaxgpt import config as config_lib
from jaxgpt import data, run_dir, training
from jaxgpt.run_dir import CHECKPOINT_KINDS
from tests.test_faults import assert_same_state, metrics_records, restored_state, run_config, text, xla_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["jaxgpt.training", "tests.test_interruptions"])
__all__ = ["text", "xla_cache"]  # fixtures of test_faults, used here too


# ------------------------------------------------------------------------ children that die for real


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, n: int, delay: float) -> None:
    """Makes this process SIGKILL itself at the n-th time it reaches a point of the checkpoint write.

    'orbax': inside Orbax's save, items half written in its temp dir; 'manifest': Orbax has committed the
    step, its manifest is not written; 'prune': the new step is whole, the old ones not yet deleted;
    'timer': `delay` seconds after the n-th save starts (inside or after it: any moment).
    """
    targets = {"orbax": (ocp.JsonCheckpointHandler, "async_save"),
               "manifest": (ckpt_lib, "write_manifest"), "prune": (ocp.CheckpointManager, "delete"),
               "timer": (ckpt_lib.Checkpointer, "save")}
    owner, name = targets[kind]
    real, calls = getattr(owner, name), [0]

    def reached() -> None:
        calls[0] += 1
        if calls[0] == n:
            if kind != "timer":
                _die()
            threading.Timer(delay, _die).start()

    def hooked(*args, **kwargs):
        reached()
        return real(*args, **kwargs)

    async def hooked_async(*args, **kwargs):  # Orbax's: dies when the item's write runs, not when it is scheduled
        reached()
        return await real(*args, **kwargs)

    setattr(owner, name, hooked_async if inspect.iscoroutinefunction(real) else hooked)


def _child(cache: str, log: str, config: dict | None = None, kill: tuple | None = None,
           argv: list[str] | None = None) -> None:
    """A run in a forkserver child: `training.train(config)`, or train.py's command line with `argv`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py: the same compiled programs
    training.enable_compilation_cache(cache, min_compile_time_secs=0)
    if kill is not None:
        _arm(*kill)
    if argv is not None:
        sys.argv = argv
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # exits through absl's app.run
    training.train(config_lib.from_dict(config))


def _run_child(cache, log, **kwargs) -> multiprocessing.Process:
    p = FORKSERVER.Process(target=_child, args=(str(cache), str(log)), kwargs=kwargs)
    p.start()
    return p


def _leftovers(out: pathlib.Path) -> int:
    """Half-written steps on disk: Orbax temp dirs and committed steps without a manifest."""
    n = 0
    for which in CHECKPOINT_KINDS:
        d = out / "checkpoints" / which
        for p in d.iterdir() if d.is_dir() else []:
            n += "tmp" in p.name or (p.name.isdigit() and not (p / ckpt_lib.MANIFEST).exists())
    return n


@pytest.mark.slow  # a Python subprocess
def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, text, xla_cache):
    """10 SIGKILLs, 3 at fixed points of the checkpoint write and 7 at seeded random times: after each a
    checkpoint restores; resuming each time ends with the parameters of a run never killed, bit for bit."""
    cfg = dict(max_iters=32)
    ref = tmp_path / "ref"
    ref_run = _run_child(xla_cache, tmp_path / "ref.log", config=config_lib.to_dict(run_config(text, ref, **cfg)))
    rng = random.Random(8)
    plan = [("orbax", 2, 0.0), ("manifest", 2, 0.0), ("prune", 1, 0.0)]
    plan += [("timer", rng.randint(1, 2), rng.uniform(0.0, 0.2)) for _ in range(7)]
    deadline = time.time() + 120  # the killed runs start once the reference has compiled (the cache is warm)
    while time.time() < deadline and ref_run.is_alive() and not (ref / "metrics.jsonl").exists():
        time.sleep(0.05)

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    half_written, restored_steps = 0, []
    for i, kill in enumerate(plan):
        config = run_config(text, out, resume=i > 0, **cfg)
        p = _run_child(xla_cache, log, config=config_lib.to_dict(config), kill=kill)
        p.join(120)
        assert p.exitcode == -signal.SIGKILL, (kill, log.read_text()[-3000:])
        half_written += _leftovers(out) > 0
        # Whatever the moment, a whole checkpoint is there, and it restores.
        reader = ckpt_lib.Checkpointer(out, read_only=True)
        which, step = reader.find_usable(warn=lambda m: None)
        reader.close()
        state = restored_state(out, text, which, step)
        assert int(state["train"]["step"]) == step > 0
        restored_steps.append(step)
    p = _run_child(xla_cache, log, config=config_lib.to_dict(run_config(text, out, resume=True, **cfg)))
    p.join(120)
    assert p.exitcode == 0, log.read_text()[-3000:]
    ref_run.join(120)
    assert ref_run.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert half_written >= 2  # the fixed points did hit the middle of a save
    assert restored_steps == sorted(restored_steps) and restored_steps[-1] < 32  # progress, killed before the end
    assert "warning: checkpoint" in log.read_text()  # a half-written step was passed over, and said so
    assert log.read_text().count("(that process is gone)") == len(plan)  # each dead run's lock was taken over
    assert_same_state(restored_state(out, text), restored_state(ref, text))
    losses = [[r["loss"] for r in metrics_records(o) if "loss" in r] for o in (ref, out)]
    assert losses[0] == losses[1] and len(losses[0]) == 32


@pytest.mark.slow  # a Python subprocess
def test_sigterm_checkpoints_and_exits_0_and_a_second_run_is_refused(tmp_path, text, xla_cache):
    """train.py under SIGTERM (a preempted VM; Ctrl-C is tests/test_train_cli.py's): a checkpoint, exit status
    0, lock released. While it runs, a second run on its out_dir is refused, naming the first's pid and host."""
    sig = signal.SIGTERM
    out, log = tmp_path / "out", tmp_path / "train.log"
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text("import pathlib\nfrom tests.test_faults import run_config\n\n\ndef get_config():\n"
                           f"    return run_config(pathlib.Path({str(text)!r}), pathlib.Path('unused'))\n")
    argv = ["train.py", "--config", str(config_file), f"--config.out_dir={out}", "--config.max_iters=100000",
            "--config.eval_interval=100000"]
    p = _run_child(xla_cache, log, argv=argv)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and '"loss"' in
                                          (out / "metrics.jsonl").read_text()):
        time.sleep(0.1)
    lock = json.loads((out / run_dir.LOCK_NAME).read_text())
    assert lock["pid"] == p.pid and lock["host"] == socket.gethostname()
    with pytest.raises(run_dir.TrainingError, match=rf"in use by pid {p.pid} on {socket.gethostname()}.*"
                                                     "take_over_lock"):
        training.train(run_config(text, out, overwrite=True))
    t0 = time.time()
    os.kill(p.pid, sig)
    p.join(60)
    assert p.exitcode == 0, log.read_text()[-3000:]
    assert time.time() - t0 < 30
    assert f"interrupted ({signal.Signals(sig).name})" in log.read_text()
    assert ckpt_lib.load_model(out, "latest")[2]["step"] > 0
    assert not (out / run_dir.LOCK_NAME).exists()


# ------------------------------------------------------------------------ two runs, one out_dir


def _write_lock(out: pathlib.Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / run_dir.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host}))


def test_a_live_lock_refuses_a_second_run(tmp_path, text):
    out = tmp_path / "out"
    with subprocess.Popen(["sleep", "60"]) as alive:  # another run, alive on this host
        try:
            _write_lock(out, alive.pid, socket.gethostname())
            with pytest.raises(run_dir.TrainingError, match=rf"in use by pid {alive.pid} on .*take_over_lock"):
                training.train(run_config(text, out, max_iters=2))
        finally:
            alive.kill()
    assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] == alive.pid  # left alone
    assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------------ interrupted downloads


class _HalfHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 400 and hangs up: a connection lost mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 400)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args):
        pass


def test_download_cut_mid_stream_leaves_nothing(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HalfHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dest = tmp_path / "cache" / "input.txt"
    try:
        with pytest.raises(data.DataError, match="stopped after 400 of 1000 bytes; not saved") as e:
            # no size or checksum to check against: the announced length alone catches the cut
            data.download(f"http://127.0.0.1:{server.server_port}/input.txt", dest, size=None, sha256=None)
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in str(e.value)
    assert list(dest.parent.iterdir()) == []  # no dest, no .part


def test_download_dying_mid_copy_leaves_nothing(tmp_path, monkeypatch):
    class Dying(io.BytesIO):
        headers = {"Content-Length": "1000"}

        def read(self, n=-1):
            if self.tell() >= 300:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            return super().read(min(n, 100) if n and n > 0 else 100)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Dying(b"y" * 1000))
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(data.DataError, match="Connection reset"):
        data.download("https://example.invalid/input.txt", dest, size=1000, sha256=None)
    assert list(dest.parent.iterdir()) == []
