"""Faults never lose a run: SIGKILL at any moment, corrupt checkpoints, signals, two runs on one out_dir,
interrupted downloads, NaN / inf, a full disk.

Runs that must die for real (SIGKILL, SIGTERM, Ctrl-C) are children of a `forkserver` that has imported
jaxgpt once: each child skips the imports, and the XLA cache they share skips compilation.
"""

from __future__ import annotations

import errno
import http.server
import io
import json
import multiprocessing
import os
import pathlib
import pickle
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from jaxgpt import checkpoint as ckpt_lib
from jaxgpt import config as config_lib
from jaxgpt import data, optim, run_dir, train_step, training
from tests.test_training import tiny_config, tiny_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["jaxgpt.training", "tests.test_faults"])


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """One compilation cache for this module's runs, in-process and in the children."""
    path = tmp_path_factory.mktemp("xla")
    training.enable_compilation_cache(path, min_compile_time_secs=0)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory, shakespeare_path):
    return tiny_text(tmp_path_factory.mktemp("text"), shakespeare_path)


def _config(text, out, **overrides):
    """tiny_config with a checkpoint at every evaluation, one step per call and no plot."""
    return tiny_config(text, out, **{"always_save_checkpoint": True, "plot": False, "steps_per_call": 1,
                                     "eval_interval": 2, **overrides})


def _state(out: pathlib.Path, text, which: str = "latest", step: int | None = None, **overrides) -> dict:
    """The restored params, opt_state and train items of one checkpoint of a tiny run."""
    cfg = _config(text, out, **overrides)
    graphdef, params = nnx.split(config_lib.build_model(cfg, data.load_dataset(text).vocab_size, 0))
    opt_state = optim.make_optimizer(cfg).init(params)
    c = ckpt_lib.Checkpointer(out, read_only=True)
    try:
        return c.restore(which, step=step, params=params, opt_state=opt_state, key=jax.random.PRNGKey(0))
    finally:
        c.close()


def _assert_same_state(a: dict, b: dict) -> None:
    assert int(a["train"]["step"]) == int(b["train"]["step"])
    for x, y in zip(jax.tree.leaves((a["params"], a["opt_state"], a["train"]["key"])),
                    jax.tree.leaves((b["params"], b["opt_state"], b["train"]["key"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ children that die for real


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, n: int, delay: float) -> None:
    """Makes this process SIGKILL itself at the n-th time it reaches a point of the checkpoint write.

    'orbax': inside Orbax's save, items half written in its temp dir; 'manifest': Orbax has committed the
    step, its manifest is not written; 'prune': the new step is whole, the old ones not yet deleted;
    'timer': `delay` seconds after the n-th save starts (inside or after it: any moment).
    """
    targets = {"orbax": (json_checkpoint_handler.JsonCheckpointHandler, "_save_fn"),
               "manifest": (ckpt_lib, "write_manifest"), "prune": (ocp.CheckpointManager, "delete"),
               "timer": (ckpt_lib.Checkpointer, "save")}
    owner, name = targets[kind]
    real, calls = getattr(owner, name), [0]

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if kind != "timer":
                _die()
            threading.Timer(delay, _die).start()
        return real(*args, **kwargs)

    setattr(owner, name, hooked)


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
    for which in ckpt_lib.WHICH:
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
    ref_run = _run_child(xla_cache, tmp_path / "ref.log", config=config_lib.to_dict(_config(text, ref, **cfg)))
    rng = random.Random(8)
    plan = [("orbax", 2, 0.0), ("manifest", 2, 0.0), ("prune", 1, 0.0)]
    plan += [("timer", rng.randint(1, 2), rng.uniform(0.0, 0.2)) for _ in range(7)]
    deadline = time.time() + 120  # the killed runs start once the reference has compiled (the cache is warm)
    while time.time() < deadline and ref_run.is_alive() and not (ref / "metrics.jsonl").exists():
        time.sleep(0.05)

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    half_written, restored_steps = 0, []
    for i, kill in enumerate(plan):
        config = _config(text, out, resume=i > 0, **cfg)
        p = _run_child(xla_cache, log, config=config_lib.to_dict(config), kill=kill)
        p.join(120)
        assert p.exitcode == -signal.SIGKILL, (kill, log.read_text()[-3000:])
        half_written += _leftovers(out) > 0
        # Whatever the moment, a whole checkpoint is there, and it restores.
        reader = ckpt_lib.Checkpointer(out, read_only=True)
        which, step = reader.find_usable(warn=lambda m: None)
        reader.close()
        state = _state(out, text, which, step)
        assert int(state["train"]["step"]) == step > 0
        restored_steps.append(step)
    p = _run_child(xla_cache, log, config=config_lib.to_dict(_config(text, out, resume=True, **cfg)))
    p.join(120)
    assert p.exitcode == 0, log.read_text()[-3000:]
    ref_run.join(120)
    assert ref_run.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert half_written >= 2  # the fixed points did hit the middle of a save
    assert restored_steps == sorted(restored_steps) and restored_steps[-1] < 32  # progress, killed before the end
    assert "warning: checkpoint" in log.read_text()  # a half-written step was passed over, and said so
    assert log.read_text().count("(that process is gone)") == len(plan)  # each dead run's lock was taken over
    _assert_same_state(_state(out, text), _state(ref, text))
    losses = [[r["loss"] for r in _records(o) if "loss" in r] for o in (ref, out)]
    assert losses[0] == losses[1] and len(losses[0]) == 32


@pytest.mark.slow  # a Python subprocess
def test_sigterm_checkpoints_and_exits_0_and_a_second_run_is_refused(tmp_path, text, xla_cache):
    """train.py under SIGTERM (a preempted VM; Ctrl-C is tests/test_train_cli.py's): a checkpoint, exit status
    0, lock released. While it runs, a second run on its out_dir is refused, naming the first's pid and host."""
    sig = signal.SIGTERM
    out, log = tmp_path / "out", tmp_path / "train.log"
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text("import pathlib\nfrom tests.test_faults import _config\n\n\ndef get_config():\n"
                           f"    return _config(pathlib.Path({str(text)!r}), pathlib.Path('unused'))\n")
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
        training.train(_config(text, out, overwrite=True))
    t0 = time.time()
    os.kill(p.pid, sig)
    p.join(60)
    assert p.exitcode == 0, log.read_text()[-3000:]
    assert time.time() - t0 < 30
    assert f"interrupted ({signal.Signals(sig).name})" in log.read_text()
    assert ckpt_lib.load_model(out, "latest")[2]["step"] > 0
    assert not (out / run_dir.LOCK_NAME).exists()


# ------------------------------------------------------------------------ corrupt checkpoints


@pytest.fixture(scope="module")
def run6(tmp_path_factory, text):
    """A finished 6-step run: 'latest' holds steps 4 and 6."""
    out = tmp_path_factory.mktemp("run6") / "run"
    training.train(_config(text, out, max_iters=6))
    assert ckpt_lib.Checkpointer(out, read_only=True).steps("latest") == [6, 4]
    return out


def _copy(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _biggest_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "flipped byte": (_flip, "does not match its sha256"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "bytes, expected"),
    "missing file": (lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("kind", [*CORRUPTIONS, "no manifest"])
def test_corrupt_checkpoint_is_detected_at_restore(run6, tmp_path, text, kind):
    out = _copy(run6, tmp_path)
    step_dir = out / "checkpoints" / "latest" / "6"
    if kind == "no manifest":
        (step_dir / ckpt_lib.MANIFEST).unlink()
        match = "incomplete"
    else:
        damage, match = CORRUPTIONS[kind]
        damage(_biggest_file(step_dir))
    with pytest.raises(ckpt_lib.CheckpointError, match=rf"latest/6 .*{match}") as e:
        _state(out, text)
    assert "\n" not in str(e.value)
    assert int(_state(out, text, step=4)["train"]["step"]) == 4  # the one before is untouched


def test_resume_falls_back_to_the_previous_good_checkpoint(run6, tmp_path, text):
    """latest/6 has a flipped byte: resume warns naming latest/6 and latest/4, redoes steps 4-5 and ends with
    the very state the corrupted checkpoint held."""
    out = _copy(run6, tmp_path)
    _flip(_biggest_file(out / "checkpoints" / "latest" / "6"))
    if (out / "checkpoints" / "best" / "6").exists():  # the same state, saved as 'best': spoil it too
        _flip(_biggest_file(out / "checkpoints" / "best" / "6"))
    logs = []
    training.train(_config(text, out, max_iters=6, resume=True), log=logs.append)
    warning = next(line for line in logs if line.startswith("warning:"))
    assert "latest/6 is unusable" in warning and "sha256" in warning and "using latest/4 instead" in warning
    assert any("resumed from" in line and line.split(" at step ")[1].startswith("4") for line in logs)
    assert (out / "checkpoints" / "unusable" / "latest-6").is_dir()  # kept aside, not deleted
    _assert_same_state(_state(out, text), _state(run6, text))


def test_sampling_passes_over_a_corrupt_checkpoint_or_says_what_is_wrong(run6, tmp_path):
    import sample

    out = _copy(run6, tmp_path)
    _flip(_biggest_file(out / "checkpoints" / "latest" / "6"))
    with pytest.warns(RuntimeWarning, match=r"latest/6 is corrupt.*using .*latest/4 instead"):
        assert ckpt_lib.load_model(out, "latest")[2]["step"] == 4
    reader = ckpt_lib.Checkpointer(out, read_only=True)
    best = reader.latest_step("best")
    reader.close()
    (out / "checkpoints" / "best" / str(best) / ckpt_lib.MANIFEST).unlink()  # 'best' keeps one: nothing to use
    err = io.StringIO()
    assert sample.main(["--out_dir", str(out), "--which", "best"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and "incomplete" in err.getvalue()


# ------------------------------------------------------------------------ a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_is_one_error_and_keeps_the_previous_checkpoint(run6, tmp_path, text, monkeypatch):
    """ENOSPC inside Orbax's write (its arrays are written, its JSON item fails): one TrainingError line, the
    half-written step gone, step 6 intact; with space again the run resumes from step 6 and finishes."""
    out = _copy(run6, tmp_path)

    def half_then_full(self, x, directory):
        (directory / self._filename).write_text(json.dumps(x)[:10])
        _enospc()

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", half_then_full)
    with pytest.raises(run_dir.TrainingError) as e:
        training.train(_config(text, out, max_iters=8, resume=True))
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and "at step 8" in message
    assert re.search(r"the previous checkpoint \(step [46]\) is kept$", message)
    reader = ckpt_lib.Checkpointer(out, read_only=True)
    assert reader.steps("latest") == [6, 4] and 8 not in reader.steps("best")  # the partial step is gone
    reader.close()
    _assert_same_state(_state(out, text), _state(run6, text))
    monkeypatch.undo()  # space again
    assert training.train(_config(text, out, max_iters=8, resume=True))["step"] == 8
    assert not list((out / "checkpoints").glob("*/*tmp*"))  # Orbax's half-written temp dir is gone too


def test_full_disk_while_writing_the_manifest_removes_the_step(run6, tmp_path, text, monkeypatch):
    """Orbax has committed step 7, the manifest's fsync fails: CheckpointError, step 7 removed, 4 and 6 whole."""
    out = _copy(run6, tmp_path)
    state = _state(out, text)
    ckptr = ckpt_lib.Checkpointer(out)
    monkeypatch.setattr(ckpt_lib.os, "fsync", _enospc)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"latest checkpoint at step 7 .*No space left on device.*"
                                                       r"previous checkpoint \(step 6\) is kept$"):
        ckptr.save("latest", 7, params=state["params"], opt_state=state["opt_state"], key=state["train"]["key"],
                   meta=state["meta"])
    monkeypatch.undo()
    assert ckptr.steps("latest") == [6, 4] and not (out / "checkpoints" / "latest" / "7").exists()
    ckptr.close()
    _assert_same_state(_state(out, text), state)
    assert int(_state(out, text, step=4)["train"]["step"]) == 4


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
                training.train(_config(text, out, max_iters=2))
        finally:
            alive.kill()
    assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] == alive.pid  # left alone
    assert not (out / "checkpoints").exists()


def test_lock_of_another_host_needs_take_over(tmp_path):
    _write_lock(tmp_path, 1, "some-other-host")  # its pid cannot be checked from here
    with pytest.raises(run_dir.TrainingError, match="pid 1 on some-other-host.*--config.take_over_lock=True"):
        run_dir.RunLock(tmp_path).__enter__()
    logs = []
    with run_dir.RunLock(tmp_path, take_over=True, log=logs.append):
        assert json.loads((tmp_path / run_dir.LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(run_dir.TrainingError, match=f"in use by pid {os.getpid()}"):
            run_dir.RunLock(tmp_path).__enter__()  # the same process, a second run: refused too
    assert "taking over" in logs[0] and "some-other-host (take_over_lock=True)" in logs[0]
    assert not (tmp_path / run_dir.LOCK_NAME).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path, dead.pid, socket.gethostname())
    logs = []
    with run_dir.RunLock(tmp_path, log=logs.append):
        assert json.loads((tmp_path / run_dir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert logs == [f"warning: taking over {tmp_path / run_dir.LOCK_NAME} from pid {dead.pid} on "
                    f"{socket.gethostname()} (that process is gone)"]
    assert not (tmp_path / run_dir.LOCK_NAME).exists()


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


# ------------------------------------------------------------------------ NaN / inf


def _poison(monkeypatch, bad_step: int | None, kind: str) -> None:
    """Makes training step `bad_step` (None: every step) non-finite: its loss ('loss') or only its gradients
    ('grad')."""
    current = {}
    real_keys, real_loss = train_step.step_keys, train_step.model_loss

    def step_keys(base_key, step, n):
        current["step"] = step  # the traced step number, used below in the same trace
        return real_keys(base_key, step, n)

    def loss(graphdef, params, x, y, key, use_dropout):
        value = real_loss(graphdef, params, x, y, key, use_dropout)
        if key is None:  # evaluation: leave it alone
            return value
        hit = True if bad_step is None else current["step"] == bad_step
        if kind == "loss":
            return value * jnp.where(hit, jnp.nan, 1.0)
        # 0 * sqrt(s) is 0, but its gradient at s = 0 is 0 * inf = NaN
        s = jnp.where(hit, 0.0 * jax.tree.leaves(params)[0].sum(), 1.0)
        return value + 0.0 * jnp.sqrt(s)

    monkeypatch.setattr(train_step, "step_keys", step_keys)
    monkeypatch.setattr(train_step, "model_loss", loss)


def test_a_bad_token_in_the_data_is_refused_before_training(tmp_path, text):
    """A nanoGPT train.bin with one id outside the vocabulary is refused at load, naming the id and where it is,
    before anything is written."""
    ds = data.load_dataset(text)
    train = ds.train.astype(np.uint16)
    train[123] = ds.vocab_size  # one past the last id: a corrupt file
    d = tmp_path / "data"
    d.mkdir()
    train.tofile(d / "train.bin")
    ds.val.astype(np.uint16).tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": ds.vocab_size, "itos": ds.tokenizer.itos, "stoi": ds.tokenizer.stoi}, f)
    cfg = _config(text, tmp_path / "out", max_iters=8)
    cfg.data.path = str(d)
    with pytest.raises(data.DataError, match=rf"train.bin holds 1 token id\(s\) outside the vocabulary "
                                             rf"\[0, {ds.vocab_size}\), the first {ds.vocab_size} at position 123"):
        training.train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, text, monkeypatch):
    """Step 5's loss is NaN: the run stops naming step 5 and keeps step 4's checkpoint."""
    _poison(monkeypatch, 5, "loss")
    cfg = _config(text, tmp_path / "out", max_iters=8, **{"model.name": "bigram"})
    with pytest.raises(run_dir.TrainingError, match=r"loss is nan at step 5: .*\(step 4\) is kept.*"
                                                     r"skip_nonfinite=True skips such steps"):
        training.train(cfg)
    assert ckpt_lib.Checkpointer(cfg.out_dir, read_only=True).latest_step() == 4


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, text, monkeypatch):
    """Step 4's gradient is NaN, its loss finite: with skip_nonfinite the state after step 4 is the state before
    it, bit for bit, metrics.jsonl counts the skip, and the checkpoint keeps the count for a resume. (The bigram
    model: the least to compile for a program of its own.)"""
    _poison(monkeypatch, 4, "grad")
    out = tmp_path / "out"
    summary = training.train(_config(text, out, max_iters=5, eval_interval=1, skip_nonfinite=True,
                                     **{"model.name": "bigram"}))
    assert summary["skipped_nonfinite"] == 1
    bigram = {"model.name": "bigram"}
    before, after = _state(out, text, step=4, **bigram), _state(out, text, step=5, **bigram)
    assert int(after["train"]["step"]) == 5
    for x, y in zip(jax.tree.leaves((before["params"], before["opt_state"])),
                    jax.tree.leaves((after["params"], after["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = {r["step"]: r for r in _records(out) if "lr" in r}
    assert [steps[s]["skipped_nonfinite"] for s in range(5)] == [0, 0, 0, 0, 1]
    assert "loss" not in steps[4] and all(np.isfinite(steps[s]["loss"]) for s in range(4))
    assert after["meta"]["skipped_nonfinite"] == 1 and before["meta"]["skipped_nonfinite"] == 0


def test_skip_nonfinite_with_every_step_skipped_is_an_error(tmp_path, text, monkeypatch):
    """Every gradient NaN: the run does not end 'done' but says that nothing was learned, the checkpoint kept."""
    _poison(monkeypatch, None, "grad")
    out = tmp_path / "out"
    with pytest.raises(run_dir.TrainingError, match=r"all 4 steps of this run were skipped as non-finite"):
        training.train(_config(text, out, max_iters=4, skip_nonfinite=True, **{"model.name": "bigram"}))
    assert ckpt_lib.Checkpointer(out, read_only=True).latest_step() == 4


@pytest.mark.slow  # sample.py in a subprocess
def test_best_and_latest_share_no_file_and_sampling_falls_back_from_a_corrupt_best(tmp_path, text):
    """The state of step 4 is both 'best' and 'latest': a byte flipped in place in best/4 leaves latest/4 whole,
    and sample.py's default (best) falls back to latest/4 with a one-line note; --which=best is one error line."""
    import sample

    out = tmp_path / "run"
    training.train(_config(text, out, max_iters=4, eval_interval=4))
    best, latest = out / "checkpoints" / "best" / "4", out / "checkpoints" / "latest" / "4"
    for f in (p for p in best.rglob("*") if p.is_file()):
        other = latest / f.relative_to(best)
        assert f.read_bytes() == other.read_bytes() and not os.path.samefile(f, other)
    with open(_biggest_file(best), "r+b") as f:  # in place: the same inode
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    ckpt_lib.verify(latest)
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}", "--start=a", "--num_samples=1",
           "--max_new_tokens=3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("a"), r.stderr[-2000:]
    note = [line for line in r.stderr.splitlines() if "sample.py" in line]
    assert len(note) == 1 and "best/4" in note[0] and "sampled the latest checkpoint instead" in note[0], r.stderr
    err = io.StringIO()
    assert sample.main([f"--out_dir={out}", "--which=best", "--start=a"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and "best/4 is corrupt" in err.getvalue()


def test_load_model_rereads_when_the_trainer_prunes_the_step_it_is_reading(run6, tmp_path, monkeypatch, capfd):
    """Reading while a run trains: the step being read is pruned midway (here latest/6, as the trainer's clean-up
    would): load_model reads the newest whole step again instead of failing with Orbax's 'Item not found'."""
    out = _copy(run6, tmp_path)
    real, pruned = ckpt_lib.Checkpointer._restore, []

    def restore_while_pruned(self, which, step, args):
        if not pruned:
            pruned.append(step)
            shutil.rmtree(self.step_dir(which, step))
        return real(self, which, step, args)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "_restore", restore_while_pruned)
    _, _, info = ckpt_lib.load_model(out, "latest")
    assert pruned == [6] and info["step"] == 4
    assert "Traceback" not in capfd.readouterr().err
    monkeypatch.setattr(ckpt_lib.Checkpointer, "_restore", real)
    (out / "checkpoints" / "latest" / "4" / ckpt_lib.MANIFEST).unlink()  # damaged, nothing changing: no retry
    with pytest.raises(ckpt_lib.CheckpointError, match="no usable checkpoint"):
        ckpt_lib.load_model(out, "latest")


@pytest.mark.slow  # train.py in a subprocess
def test_load_model_while_train_py_saves_and_prunes_never_fails(tmp_path, text, capfd):
    """train.py checkpoints every 2 steps and prunes behind itself; meanwhile load_model reads the newest step over
    and over for 20 s: every read succeeds (each one a whole step), none fails on a step pruned mid-read, and the
    reader prints no traceback or Orbax note."""
    import warnings

    from jaxgpt.run_dir import has_checkpoint

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAXGPT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "shakespeare_char_cpu.py"), "--n_layer=1",
           "--n_embd=16", "--n_head=2", "--block_size=8", "--batch_size=4", "--eval_iters=1", f"--out_dir={out}",
           f"--config.data.path={text}", "--max_iters=1000000", "--lr_decay_iters=1000000", "--eval_interval=2",
           "--steps_per_call=2", "--progress=False", "--plot=False", "--sample_tokens=0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps, failures = [], []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not has_checkpoint(out, "latest"):
            time.sleep(0.2)
        start = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a newest step still being written is passed over with a warning
            while time.time() - start < 20 and proc.poll() is None:
                try:
                    steps.append(ckpt_lib.load_model(out, "latest")[2]["step"])
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    failures.append(f"{type(e).__name__}: {e}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not failures, failures[:3]
    assert len(steps) > 10 and steps[-1] > steps[0]  # the reads did race the trainer's saves and prunes
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err and "Metadata file" not in err, err[-2000:]
