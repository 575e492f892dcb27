"""The run directory: one run at a time per out_dir, its checks, its metrics record, and stopping cleanly.

    out_dir/jaxgpt.lock      `RunLock`: the pid and host of the run using out_dir
    out_dir/metrics.jsonl    one JSON record per logged step and per evaluation (`read_metrics`)
    out_dir/checkpoints/     `checkpoint_dir`: one folder per kind of `CHECKPOINT_KINDS`, written by
                             `jaxgpt.checkpoint`
    out_dir/loss.png         the loss curves, redrawn at each evaluation

`check_out_dir` looks before a run touches anything; `prepare_out_dir` creates out_dir and empties the record
of a fresh run once every check has passed. `Interrupt` turns Ctrl-C / SIGTERM into a request to stop after the current
compiled call, and a second Ctrl-C into an immediate exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

CHECKPOINTS = "checkpoints"  # out_dir's folder of checkpoints
CHECKPOINT_KINDS = ("latest", "best")  # its subfolders: the newest state, and the one of lowest validation loss


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad out_dir, no checkpoint to resume, non-finite loss)."""


class Interrupted(TrainingError):
    """Ctrl-C / SIGTERM before the run trained a step: nothing new was saved (train.py exits 130)."""


def checkpoint_dir(out_dir: str | os.PathLike, which: str) -> pathlib.Path:
    """Where the `which` ('latest' | 'best') checkpoints of a run live: out_dir/checkpoints/<which>, absolute."""
    if which not in CHECKPOINT_KINDS:
        raise ValueError(f"which must be one of {CHECKPOINT_KINDS}, got {which!r}")
    return pathlib.Path(out_dir).absolute() / CHECKPOINTS / which


def has_checkpoint(out_dir: str | os.PathLike, which: str) -> bool:
    """Whether out_dir holds a step folder of `which` checkpoints (whole or not: this only looks at names)."""
    d = checkpoint_dir(out_dir, which)
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check_out_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> pathlib.Path:
    """Checks, creating and changing nothing, that out_dir can be written and fits `resume` / `overwrite`."""
    out_dir = pathlib.Path(out_dir).absolute()
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingError(f"out_dir {out_dir} is not writable ({existing} is a file): choose another "
                            "--config.out_dir")
    for folder in out_dir.parents:  # another run's checkpoints are moved aside and pruned by that run
        run = folder.parent
        if folder.name == CHECKPOINTS and (any(has_checkpoint(run, w) for w in CHECKPOINT_KINDS)
                                             or (run / LOCK_NAME).exists()):
            raise TrainingError(f"out_dir {out_dir} is inside the checkpoints of the run in {run}, which would "
                                f"prune it or move it aside: choose a --config.out_dir outside {folder}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"out_dir {out_dir} is not writable (permission denied on {existing}): choose another "
                            "--config.out_dir")
    if resume and not any(has_checkpoint(out_dir, w) for w in CHECKPOINT_KINDS):
        raise TrainingError(f"resume=True but there is no checkpoint in {checkpoint_dir(out_dir, 'latest')}: "
                            "train without --config.resume first, or point --config.out_dir at a run")
    if not resume and not overwrite and any(has_checkpoint(out_dir, w) for w in CHECKPOINT_KINDS):
        raise TrainingError(f"out_dir {out_dir} already holds a run: pass --config.resume=True to continue it, "
                            "--config.overwrite=True to start afresh, or another --config.out_dir")
    return out_dir


def prepare_out_dir(out_dir: pathlib.Path, *, fresh: bool) -> None:
    """Creates out_dir; a fresh run starts from an empty record: old checkpoints (overwrite=True), metrics and
    plot go. Called once every check has passed, so a run that fails validation leaves nothing behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create out_dir {out_dir} ({e.strerror}): "
                            "choose another --config.out_dir") from None
    if not fresh:
        return
    if (out_dir / CHECKPOINTS).exists():
        shutil.rmtree(out_dir / CHECKPOINTS)
    for name in ("metrics.jsonl", "loss.png"):
        (out_dir / name).unlink(missing_ok=True)


def remove_empty_checkpoint_dirs(out_dir: pathlib.Path) -> bool:
    """Removes out_dir's checkpoint folders when they hold no checkpoint (only what a save left unfinished);
    returns whether there was none. Folders of checkpoints, `unusable/` among them, are left alone."""
    if any(has_checkpoint(out_dir, w) for w in CHECKPOINT_KINDS):
        return False
    for which in CHECKPOINT_KINDS:
        shutil.rmtree(checkpoint_dir(out_dir, which), ignore_errors=True)
    with contextlib.suppress(OSError):
        (out_dir / CHECKPOINTS).rmdir()  # only when empty
    return True


LOCK_NAME = "jaxgpt.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a zombie has exited: it only waits for its parent to collect it
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """`out_dir/jaxgpt.lock`: one run at a time per out_dir.

    The lock file, created exclusively, holds the pid and host of the run that owns out_dir and is removed
    when the run ends (by any exception or signal Python sees). A run killed outright (SIGKILL, a crash of
    the machine) leaves it behind: the next run takes it over by itself when the recorded process is gone
    from this host; a lock of another host (a shared file system) needs `take_over=True`
    (`--config.take_over_lock=True`), since its process cannot be checked from here.
    """

    def __init__(self, out_dir: pathlib.Path, *, take_over: bool = False, log: Callable[[str], None] = print):
        self.path = pathlib.Path(out_dir) / LOCK_NAME
        self.take_over = take_over
        self.log = log
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLock:
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if not holder:  # a writer killed between create and write, unless that writer is still writing
                    dead = time.time() - self.path.stat().st_mtime > 10 if self.path.exists() else True
                else:
                    dead = host == self.owner["host"] and isinstance(pid, int) and not _pid_alive(pid)
                who = f"pid {pid} on {host}" if holder else "an unreadable lock"
                if attempt == 0 and (dead or self.take_over):
                    why = "that process is gone" if dead else "take_over_lock=True"
                    self.log(f"warning: taking over {self.path} from {who} ({why})")
                    self.path.unlink(missing_ok=True)
                    continue  # O_EXCL again: of two runs taking over at once, one wins
                raise TrainingError(
                    f"out_dir {self.path.parent} is in use by {who} (lock file {self.path}): wait for that run or "
                    "use another --config.out_dir; if that run is dead, pass --config.take_over_lock=True"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise TrainingError(f"could not take the lock {self.path}")  # not reached

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Removes the lock file, if it is still this run's."""
        holder = self._holder()
        if (holder.get("pid"), holder.get("host")) == (self.owner["pid"], self.owner["host"]):  # else: taken over
            self.path.unlink(missing_ok=True)


def quit_at_once(out_dir: pathlib.Path, lock: RunLock | None) -> str:
    """What a second Ctrl-C does before the process ends without Python's teardown: releases out_dir's lock,
    removes checkpoint folders that hold no checkpoint, and says what is kept."""
    if lock is not None:
        lock.release()
    return "there is no checkpoint yet" if remove_empty_checkpoint_dirs(out_dir) else "the last checkpoint is kept"


def _record_or_none(line: str) -> dict | None:
    """A metrics.jsonl record, or None for a blank line or the torn last line of a killed run."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and "step" in r else None


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl (none if it does not exist), skipping a torn last line."""
    if not path.exists():
        return []
    return [r for r in map(_record_or_none, path.read_text().splitlines()) if r is not None]


_STOP = b"\0"  # not a signal number: Interrupt.__exit__ writes it to end the watcher thread


class Interrupt:
    """Ctrl-C / SIGTERM while training: the first asks the loop to stop after the current compiled call and
    save; a second Ctrl-C exits at once (status 130), without a traceback and without touching checkpoints.

    A compiled call can run for minutes, and Python runs signal handlers only when the main thread is back
    in Python. So a watcher thread reads the interpreter's signal wake-up fd, which is written the moment a
    signal arrives: it speaks at once and, on the second signal, ends the process with `os._exit`. Exiting
    there skips the interpreter's teardown, which could crash while XLA threads are mid-computation. A
    checkpoint being written at that moment is left unfinished, and the next run passes over it to the
    last whole one (`jaxgpt.checkpoint`).
    """

    def __init__(self, *, log: Callable[[str], None] = print, call_seconds: Callable[[], float | None] = lambda: None,
                 stopping: str | None = None, on_quit: Callable[[], str] | None = None):
        self.signum: int | None = None
        self.log = log
        self.call_seconds = call_seconds  # how long a compiled call has taken so far, for the first message
        # Set as the run goes: the first signal's message when not training yet (None: the training loop's), and
        # what the second does before the process ends (returns what is kept, for its message).
        self.stopping = stopping
        self.on_quit = on_quit
        self._old: dict[int, object] = {}
        self._old_fd: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._count = 0

    def _handler(self, signum, frame) -> None:  # the main thread's part: the watcher already spoke
        if self.signum is None:
            self.signum = signum

    def _on_signal(self, signum: int) -> None:
        self._count += 1
        if self._count == 1:
            if self.signum is None:
                self.signum = signum
            took = self.call_seconds()
            how_long = f" (a call has taken {took:.0f} s so far)" if took else ""
            stopping = self.stopping or f"stopping after the current compiled call, then saving a checkpoint{how_long}"
            self.log(f"{signal.Signals(signum).name}: {stopping}; press Ctrl-C again to quit at once without saving")
        else:
            kept = ""
            if self.on_quit is not None:
                with contextlib.suppress(Exception):  # the process ends next, whatever happens here
                    kept = f"; {self.on_quit()}"
            print(f"\n{signal.Signals(signum).name} again: quitting now without saving{kept}", file=sys.stderr,
                  flush=True)
            os._exit(128 + signal.SIGINT)

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                data = b""
            for signum in data.split(_STOP)[0]:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self._on_signal(signum)
            if not data or _STOP in data:
                os.close(read_fd)
                return

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals belong to the main thread: leave them alone
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="jaxgpt-interrupt")
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        # The watcher stops at this byte (or at end-of-file, which a child forked meanwhile, holding a copy of
        # the write end, would keep from coming).
        with contextlib.suppress(OSError):
            os.write(self._pipe[1], _STOP)
        os.close(self._pipe[1])
        self._pipe = None
        # Wait for it: a watcher still alive could drop the last reference to the run (held through
        # `call_seconds`) and free its arrays in that thread, even while the interpreter shuts down, which
        # aborts the process.
        self._watcher.join()
        self._watcher = None
