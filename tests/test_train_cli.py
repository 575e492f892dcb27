"""train.py end to end in a subprocess: a tiny run, resume, Ctrl-C, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxgpt import checkpoint
from tests.test_training import tiny_text

pytestmark = pytest.mark.slow  # every test here runs train.py in a subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.n_embd=16", "--config.model.block_size=8",
    "--config.batch_size=4", "--config.eval_iters=2", "--config.warmup_iters=2", "--config.lr_decay_iters=8",
    "--config.progress=False",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")  # shared XLA cache: later runs skip compilation
    return dict(os.environ, JAXGPT_CACHE=str(cache), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def _train(env, *args, timeout=300):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shakespeare_char_cpu.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_tiny_run_then_resume(env, tmp_path, shakespeare_path):
    text = tiny_text(tmp_path, shakespeare_path)
    out = tmp_path / "out"
    common = [*TINY, f"--config.data.path={text}", f"--config.out_dir={out}", "--config.eval_interval=4",
              "--config.steps_per_call=2", "--config.sample_tokens=30"]
    r = _train(env, *common, "--config.max_iters=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "best val loss" in r.stdout and "tokens/s" in r.stdout.splitlines()[-1]
    assert "compiling the training step" in r.stdout  # the wait for the first step says what it is
    assert (out / "loss.png").exists() and checkpoint.load_model(out, "latest")[2]["step"] == 4
    r = _train(env, *common, "--config.max_iters=8", "--config.resume=True")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stdout and checkpoint.load_model(out, "latest")[2]["step"] == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s < 8] == sorted(s for s in steps if s < 8)  # one continuous record


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(env, tmp_path, shakespeare_path):
    text = tiny_text(tmp_path, shakespeare_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shakespeare_char_cpu.py"),
           *TINY, f"--config.data.path={text}", f"--config.out_dir={out}", "--config.max_iters=100000",
           "--config.eval_interval=100000", "--config.steps_per_call=5", "--config.lr_decay_iters=100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "interrupted (SIGINT)" in stdout and "--config.resume=True" in stdout
    step = checkpoint.load_model(out, "latest")[2]["step"]
    assert step > 0 and step % 5 == 0  # saved between compiled calls


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.nlayer=3"], "unknown config key 'model.nlayer' (did you mean 'model.n_layer'?)"),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
        (["--config.model.n_head=3"], "model.n_embd=128 is not divisible by model.n_head=3"),
        (["--config.data.path=/no/such/file.txt"], "/no/such/file.txt does not exist"),
    ],
)
def test_bad_input_is_one_error_line(env, tmp_path, args, message):
    r = _train(env, *args, f"--config.out_dir={tmp_path / 'out'}", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing is created before the config, data and out_dir pass


def test_ctrl_c_answers_at_once_and_a_second_quits_within_a_second_keeping_the_checkpoint(env, tmp_path,
                                                                                          shakespeare_path):
    """During a long compiled call: the first Ctrl-C is answered at once, the second ends the process in about a
    second with status 130, one line and no traceback or crash, and the checkpoint of step 8 stays loadable."""
    text = tiny_text(tmp_path, shakespeare_path)
    out = tmp_path / "out"
    log = tmp_path / "stdout.txt"
    common = [*TINY, f"--config.data.path={text}", f"--config.out_dir={out}", "--config.lr_decay_iters=1000000",
              "--config.sample_tokens=0"]
    assert _train(env, *common, "--config.max_iters=8", "--config.eval_interval=8").returncode == 0
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shakespeare_char_cpu.py"),
           *common, "--config.resume=True", "--config.max_iters=1000000", "--config.eval_interval=1000000",
           "--config.steps_per_call=1000000"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and "compiling the training step" not in log.read_text():
            time.sleep(0.2)
        time.sleep(4)  # past the first short call, inside one compiled call of many steps
        proc.send_signal(signal.SIGINT)
        t_first = time.time()
        while time.time() - t_first < 5 and "stopping after the current compiled call" not in log.read_text():
            time.sleep(0.05)
        answered = time.time() - t_first
        proc.send_signal(signal.SIGINT)
        t_second = time.time()
        _, stderr = proc.communicate(timeout=30)
        quit_after = time.time() - t_second
    finally:
        proc.kill()
    assert answered < 2.0, log.read_text()[-2000:]
    assert proc.returncode == 130, stderr[-2000:]
    assert quit_after < 2.0
    assert "quitting now without saving" in stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr and "Segmentation" not in stderr
    assert checkpoint.load_model(out, "latest")[2]["step"] == 8


def _start(env, tmp_path, text, *extra):
    """train.py on `text` with stdout in a file (read while it runs); returns (process, stdout path, out_dir)."""
    out, log = tmp_path / "out", tmp_path / "stdout.txt"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shakespeare_char_cpu.py"),
           *TINY, f"--config.data.path={text}", f"--config.out_dir={out}", "--config.max_iters=1000000",
           "--config.lr_decay_iters=1000000", "--config.eval_interval=1000000", *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return proc, log, out


def _wait_for(log, marker: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and marker not in log.read_text():
        time.sleep(0.05)
    assert marker in log.read_text(), log.read_text()[-2000:]


@pytest.mark.parametrize("moment", ["importing", "after the data", "compiling"])
def test_ctrl_c_before_the_first_step_stops_in_one_line_leaving_nothing(env, tmp_path, shakespeare_path, moment):
    """At any moment before the first step: never swallowed, no traceback, exit 130 with one line, no `done:`, no
    lock and no empty checkpoint folders."""
    proc, log, out = _start(env, tmp_path, tiny_text(tmp_path, shakespeare_path))
    try:
        if moment == "importing":
            time.sleep(1.0)
        else:
            _wait_for(log, "data:" if moment == "after the data" else "step 0: evaluating")  # it compiles first
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT) before "), stderr[-2000:]
    assert "nothing" in lines[0] and "done:" not in log.read_text()
    assert not (out / "jaxgpt.lock").exists() and not (out / "checkpoints").exists()


def test_a_second_ctrl_c_before_any_checkpoint_says_there_is_none_and_leaves_no_lock(env, tmp_path, shakespeare_path):
    proc, log, out = _start(env, tmp_path, tiny_text(tmp_path, shakespeare_path))
    try:
        _wait_for(log, "step 0: evaluating")
        proc.send_signal(signal.SIGINT)
        _wait_for(log, "SIGINT: stopping before", timeout=5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "quitting now without saving; there is no checkpoint yet" in stderr and "Traceback" not in stderr
    assert "the last checkpoint is kept" not in stderr
    assert not (out / "jaxgpt.lock").exists() and not (out / "checkpoints").exists()


FULL_DISK_CONFIG = '''"""The CPU config, with a disk that fills up while the step-{step} checkpoint is written."""
import errno
import os
import runpy

from orbax.checkpoint._src.handlers import json_checkpoint_handler

_real = json_checkpoint_handler.JsonCheckpointHandler._save_fn


def _save_fn(self, x, directory):
    if isinstance(x, dict) and x.get("step", 0) >= {step}:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real(self, x, directory)


json_checkpoint_handler.JsonCheckpointHandler._save_fn = _save_fn


def get_config():
    return runpy.run_path({cpu!r})["get_config"]()
'''


def test_a_full_disk_is_one_error_line_and_keeps_the_previous_checkpoint(env, tmp_path, shakespeare_path):
    """The disk fills while step 4 is saved: one `error:` line (no Orbax thread tracebacks), exit 2, step 2's
    checkpoint whole, no temp dir or lock left; with space again the run resumes from step 2."""
    text = tiny_text(tmp_path, shakespeare_path)
    config = tmp_path / "full_disk.py"
    config.write_text(FULL_DISK_CONFIG.format(step=4, cpu=str(ROOT / "configs" / "shakespeare_char_cpu.py")))
    out = tmp_path / "out"
    common = [*TINY, f"--config.data.path={text}", f"--config.out_dir={out}", "--config.max_iters=4",
              "--config.eval_interval=2", "--config.steps_per_call=2", "--config.sample_tokens=0"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config), *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not save"), r.stderr[-3000:]
    assert "No space left on device" in lines[0] and "(step 2) is kept" in lines[0]
    assert checkpoint.load_model(out, "latest")[2]["step"] == 2
    assert not list((out / "checkpoints").glob("*/*tmp*")) and not (out / "jaxgpt.lock").exists()
    r = _train(env, *common, "--config.resume=True")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    assert checkpoint.load_model(out, "latest")[2]["step"] == 4


NAN_GRADIENTS_CONFIG = '''"""The CPU config with skip_nonfinite, and a NaN gradient at every training step."""
import runpy

import jax
import jax.numpy as jnp

from jaxgpt import train_step

_real = train_step.model_loss


def _loss(graphdef, params, x, y, key, use_dropout):
    value = _real(graphdef, params, x, y, key, use_dropout)
    if key is None:  # evaluation: left alone
        return value
    return value + 0.0 * jnp.sqrt(0.0 * jax.tree.leaves(params)[0].sum())  # d/ds sqrt(s) at 0: NaN


train_step.model_loss = _loss


def get_config():
    c = runpy.run_path({cpu!r})["get_config"]()
    c.skip_nonfinite = True
    return c
'''


def test_every_step_skipped_as_non_finite_is_an_error_not_done(env, tmp_path, shakespeare_path):
    config = tmp_path / "nan_gradients.py"
    config.write_text(NAN_GRADIENTS_CONFIG.format(cpu=str(ROOT / "configs" / "shakespeare_char_cpu.py")))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config), *TINY,
           f"--config.data.path={tiny_text(tmp_path, shakespeare_path)}", f"--config.out_dir={out}",
           "--config.max_iters=4", "--config.eval_interval=4", "--config.model.name=bigram", "--config.sample_tokens=0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: all 4 steps of this run were skipped as non-finite")
    assert "done:" not in r.stdout and checkpoint.load_model(out, "latest")[2]["step"] == 4  # the state is kept
