"""`jaxgpt.run_dir`: `RunLock` takes over only a lock that is safe to take, and `Interrupt` leaves nothing running
behind it (its signal handling is tested with real signals in test_train_cli and test_interruptions)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import warnings

import pytest

from jaxgpt.run_dir import LOCK_NAME, Interrupt, RunLock, TrainingError


class _Owner:
    """Stands for the training run whose method Interrupt holds: records the thread that frees it."""

    freed_in: list[str] = []

    def call_seconds(self) -> float | None:
        return None

    def __del__(self) -> None:
        _Owner.freed_in.append(threading.current_thread().name)


def test_interrupt_ends_its_watcher_thread_on_exit_and_the_run_is_freed_in_the_main_thread():
    """The watcher thread holds the Interrupt, hence the run's arrays. Were it still alive after `with` and drop
    the last reference, the arrays would be freed in that thread, possibly while the interpreter shuts down,
    which aborts the process ("FATAL: exception not rethrown")."""
    for _ in range(20):  # the watcher, left to itself, ends at a moment of the scheduler's choosing
        _Owner.freed_in.clear()
        owner = _Owner()
        with Interrupt(log=lambda _: None, call_seconds=owner.call_seconds):
            assert any(t.name == "jaxgpt-interrupt" for t in threading.enumerate())
        assert not any(t.name == "jaxgpt-interrupt" for t in threading.enumerate())
        del owner  # no cycle holds it: it goes now, in this thread
        assert _Owner.freed_in == [threading.main_thread().name]


def test_interrupt_ends_its_watcher_even_while_a_copy_of_its_pipe_lives_on():
    """A child forked during training inherits the pipe's write end, so the watcher would never read end-of-file;
    leaving the `with` block must end it all the same (SIGALRM fails the test instead of hanging it)."""

    def too_long(*_):
        raise TimeoutError("Interrupt.__exit__ kept waiting for its watcher thread")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    child = None
    try:
        with Interrupt(log=lambda _: None):
            with warnings.catch_warnings():  # fork() in a process with threads (JAX's, too): the child only sleeps
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                child = os.fork()
            if child == 0:  # holds a copy of every descriptor, the pipe's write end among them
                time.sleep(60)
                os._exit(0)
        assert not any(t.name == "jaxgpt-interrupt" for t in threading.enumerate())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)


def _write_lock(out: pathlib.Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host}))


def test_lock_of_another_host_needs_take_over(tmp_path):
    _write_lock(tmp_path, 1, "some-other-host")  # its pid cannot be checked from here
    with pytest.raises(TrainingError, match="pid 1 on some-other-host.*--config.take_over_lock=True"):
        RunLock(tmp_path).__enter__()
    logs = []
    with RunLock(tmp_path, take_over=True, log=logs.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(TrainingError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()  # the same process, a second run: refused too
    assert "taking over" in logs[0] and "some-other-host (take_over_lock=True)" in logs[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path, dead.pid, socket.gethostname())
    logs = []
    with RunLock(tmp_path, log=logs.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert logs == [f"warning: taking over {tmp_path / LOCK_NAME} from pid {dead.pid} on "
                    f"{socket.gethostname()} (that process is gone)"]
    assert not (tmp_path / LOCK_NAME).exists()
