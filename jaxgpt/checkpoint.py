"""Checkpoints with Orbax: the 'latest' and the 'best' (lowest val loss) states of a training run.

A run's `out_dir/checkpoints/{latest,best}/<step>/` (the layout `jaxgpt.run_dir` defines) each hold four items:
`params` (the model's NNX state), `opt_state` (Optax), `train` (step and the base PRNG key) and `meta` (JSON: the
training config, the tokenizer, best_val_loss, step). `load_model` rebuilds the model from `meta` and restores only its
parameters, which is all that sampling needs.

A step counts only once it is whole: after Orbax has committed it, `jaxgpt_manifest.json` (the size and
sha256 of every file of the step) is written beside its items, atomically. A step without a manifest (a
process killed mid-save, a full disk) or whose files no longer match it (flipped bytes, truncated or missing
files) is unusable: restoring it raises `CheckpointError`, and `Checkpointer.find_usable` falls back to an
older step. 'latest' keeps two steps so that there is one to fall back to; old steps are removed only after
the new one's manifest is on disk. A step that is both the best and the latest is written once, as 'best';
'latest' gets copies of its files (`Checkpointer.link`: copy-on-write clones where the file system can), so that
damage to one is not damage to the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt import config as config_lib
from jaxgpt import sharding as sharding_lib
from jaxgpt.data import sha256_file
from jaxgpt.run_dir import CHECKPOINT_KINDS, CHECKPOINTS, checkpoint_dir
from jaxgpt.tokenizer import Tokenizer, tokenizer_from_dict

KEEP = {"latest": 2, "best": 1}  # steps kept per manager: 'latest' keeps one to fall back to
MANIFEST = "jaxgpt_manifest.json"
_LINKING = ".jaxgpt-linking"  # a step being linked from the other manager: ".<step>.jaxgpt-linking"


# What Orbax says each time a manager opens read-only (as load_model's do, on purpose): nothing to act on, and
# "read only" reads as if the directory were not writable. Nor is a step still being written (by a run training
# while load_model reads, or one interrupted mid-save) that has no metadata file yet.
_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                    "Metadata file does not exist")


class _DropReadOnlyNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_READ_ONLY_NOTES)


if not any(isinstance(f, _DropReadOnlyNotes) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_DropReadOnlyNotes())


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or one on disk that is incomplete or corrupt (one line)."""


def _file_digests(step_dir: pathlib.Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file of a step directory except the manifest."""
    digests = {}
    for path in sorted(step_dir.rglob("*")):
        rel = path.relative_to(step_dir).as_posix()
        if path.is_file() and rel not in (MANIFEST, f".{MANIFEST}.tmp"):
            digests[rel] = [path.stat().st_size, sha256_file(path)]
    return digests


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FICLONE = 0x40049409  # Linux's ioctl: the new file shares the old one's blocks, copy-on-write (btrfs, XFS, ...)


def _clone_or_copy(src: str, dst: str) -> None:
    """An independent copy of a saved file: a copy-on-write clone where the file system has them, else a copy.

    Never a hard link: a file damaged in place would then be damaged under both names, and 'best' could not
    stand in for a broken 'latest' (or the other way round).
    """
    try:
        import fcntl

        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        shutil.copystat(src, dst)
    except (OSError, ImportError):
        shutil.copy2(src, dst)


def write_manifest(step_dir: str | os.PathLike) -> None:
    """Records the size and sha256 of every file of a committed step, atomically (temp file + rename)."""
    step_dir = pathlib.Path(step_dir)
    digests = _file_digests(step_dir)
    tmp = step_dir / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": digests}, f)
        f.flush()
        os.fsync(f.fileno())  # the manifest must not reach the disk before its contents
    os.replace(tmp, step_dir / MANIFEST)
    _fsync_dir(step_dir)


def verify(step_dir: str | os.PathLike) -> None:
    """Raises `CheckpointError` naming the step and what is wrong unless its files match its manifest."""
    step_dir = pathlib.Path(step_dir)
    try:
        expected = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is incomplete (no {MANIFEST}: its save never finished)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{step_dir} has an unreadable {MANIFEST} ({e})") from None
    got = _file_digests(step_dir)
    for rel, (size, digest) in expected.items():
        if rel not in got:
            raise CheckpointError(f"{step_dir} is corrupt: {rel} is missing")
        if got[rel][0] != size:
            raise CheckpointError(f"{step_dir} is corrupt: {rel} has {got[rel][0]} bytes, expected {size}")
        if got[rel][1] != digest:
            raise CheckpointError(f"{step_dir} is corrupt: {rel} does not match its sha256")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"{step_dir} is corrupt: unexpected file {extra[0]}")


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Two Orbax `CheckpointManager`s (latest, best), keeping `KEEP` verified steps each. Saves are synchronous.

    Synchronous saving keeps a checkpoint complete on disk before the next (donating) train step
    reuses the buffers it came from, and before an interrupted run exits. Old steps are pruned here,
    not by Orbax, so that they go only once the new step's manifest is written.
    """

    def __init__(self, out_dir: str | os.PathLike, *, read_only: bool = False):
        self.out_dir = pathlib.Path(out_dir).absolute()
        self._verified: set[tuple[str, int]] = set()
        options = dict(max_to_keep=None, enable_async_checkpointing=False, read_only=read_only, create=not read_only,
                       cleanup_tmp_directories=not read_only)  # drop the temp dirs of saves killed midway
        self.managers = {
            which: ocp.CheckpointManager(checkpoint_dir(out_dir, which), options=ocp.CheckpointManagerOptions(
                **options))
            for which in CHECKPOINT_KINDS
            if not read_only or checkpoint_dir(out_dir, which).is_dir()
        }
        if not read_only and jax.process_index() == 0:  # the temp dirs of links killed midway, as Orbax's
            for which in CHECKPOINT_KINDS:
                for tmp in checkpoint_dir(out_dir, which).glob(f".*{_LINKING}"):
                    shutil.rmtree(tmp, ignore_errors=True)

    def steps(self, which: str) -> list[int]:
        """Every step on disk in the `which` manager, newest first (usable or not)."""
        manager = self.managers.get(which)
        return [] if manager is None else sorted(manager.all_steps(), reverse=True)

    def latest_step(self, which: str = "latest") -> int | None:
        """The newest step of the `which` checkpoints, or None when there is none."""
        steps = self.steps(which)
        return steps[0] if steps else None

    def step_dir(self, which: str, step: int) -> pathlib.Path:
        """The directory of one step."""
        return checkpoint_dir(self.out_dir, which) / str(step)

    def verify(self, which: str, step: int) -> None:
        """Raises `CheckpointError` unless the step is whole (checked once per step and Checkpointer)."""
        if (which, step) not in self._verified:
            verify(self.step_dir(which, step))
            self._verified.add((which, step))

    def save(self, which: str, step: int, *, params, opt_state, key: jax.Array, meta: dict[str, Any]) -> None:
        """Writes one checkpoint at `step`, then its manifest, then prunes older steps.

        A whole step already saved is left as it is; an unusable one at the same step is replaced. Raises
        `CheckpointError` (one line) when the write fails, e.g. on a full disk; the older steps stay.
        """
        manager = self.managers[which]
        if self._holds_whole(which, step):
            return
        params, opt_state, key = sharding_lib.first_replica((params, opt_state, key))  # one copy of what is replicated
        try:
            manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    train=ocp.args.StandardSave({"step": step, "key": key}),
                    meta=ocp.args.JsonSave(dict(meta, step=step)),
                ),
                force=True,  # also below a newer, abandoned step (pruned next)
            )
            manager.wait_until_finished()
            if jax.process_index() == 0:  # with several processes, once every one has written its shards
                write_manifest(self.step_dir(which, step))
            sharding_lib.sync_processes(f"jaxgpt: manifest {which} {step}")
        except Exception as e:  # noqa: BLE001 - any failed write (OSError, tensorstore's errors) is the same fault
            _join_orbax_threads()
            self._remove_partial(which, step)
            raise self._save_failed(which, step, e) from e
        self._verified.add((which, step))
        self._prune(which, step)

    def link(self, which: str, step: int, *, source: str) -> None:
        """Makes the whole step `step` of `source` a step of `which` too: its files copied (cloned, copy-on-write,
        where the file system can), not serialized a second time.

        A step that improves the validation loss is both the best and the latest one: copying its files spares
        Orbax serializing the same arrays a second time. The step appears whole or not at all
        (built in a temporary directory, then renamed), and older steps are pruned as after `save`. The copies
        share nothing a change in place could reach: a file damaged under one name leaves the other whole.
        """
        if self._holds_whole(which, step):
            return
        self.verify(source, step)
        src, dst = self.step_dir(source, step), self.step_dir(which, step)
        tmp = dst.with_name(f".{step}{_LINKING}")
        try:
            if jax.process_index() == 0:  # one writer on a shared file system
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp, copy_function=_clone_or_copy)
                _fsync_dir(tmp)
                os.replace(tmp, dst)
                _fsync_dir(dst.parent)
            sharding_lib.sync_processes(f"jaxgpt: link {which} {step}")
            self.managers[which].reload()
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._save_failed(which, step, e) from e
        self._verified.add((which, step))
        self._prune(which, step)

    def _save_failed(self, which: str, step: int, error: Exception) -> CheckpointError:
        """The one-line error of a failed save or link: what failed, why, and which older step is kept."""
        older = [s for s in self.steps(which) if s < step]
        kept = f"the previous checkpoint (step {older[0]}) is kept" if older else "there is no previous checkpoint"
        reason = " ".join(str(error).split()) or type(error).__name__
        return CheckpointError(f"could not save the {which} checkpoint at step {step} in "
                               f"{checkpoint_dir(self.out_dir, which)} ({reason}); {kept}")

    def _holds_whole(self, which: str, step: int) -> bool:
        """Whether `which` already holds `step` whole; an unusable step there is deleted (to be written anew)."""
        manager = self.managers[which]
        if step not in manager.all_steps():
            return False
        try:
            self.verify(which, step)
            return True
        except CheckpointError:
            manager.delete(step)
            return False

    def _prune(self, which: str, step: int) -> None:
        """Deletes the steps `which` no longer keeps once `step` is whole."""
        others = [s for s in self.steps(which) if s != step]
        # Steps above `step` belong to an abandoned run (resumed from an older step); below, keep KEEP - 1.
        doomed = [s for s in others if s > step] + [s for s in others if s < step][KEEP[which] - 1:]
        for s in doomed:
            self.managers[which].delete(s)

    def _remove_partial(self, which: str, step: int) -> None:
        """Best effort after a failed save, once Orbax's writer threads are done: a committed step without its
        manifest goes, and so does Orbax's temp dir (never read; else the next Checkpointer removes it)."""
        manager = self.managers[which]
        if jax.process_index() != 0:
            return
        with contextlib.suppress(Exception):  # the save's own error is the one to report
            manager.reload()
            if step in manager.all_steps():
                manager.delete(step)
        for tmp in checkpoint_dir(self.out_dir, which).glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, which: str, *, params, opt_state, key: jax.Array, step: int | None = None) -> dict[str, Any]:
        """Restores a verified step (default: the newest) into the structure of the given templates.

        Arrays come back with the templates' shardings, so a checkpoint saved on one mesh restores onto
        another (e.g. 8-device FSDP -> 1 device); give shape structs a `sharding`. Raises `CheckpointError`
        when the step is incomplete or corrupt.
        """
        return self._restore(which, step, params=ocp.args.StandardRestore(_abstract(params)),
                             opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                             train=ocp.args.StandardRestore(_abstract({"step": 0, "key": key})),
                             meta=ocp.args.JsonRestore())

    def restore_params(self, which: str, step: int | None = None, *, params) -> Any:
        """Only the `params` item of a verified step (default: the newest), into the structure and shardings of
        `params` (arrays or shape structs): what inference needs, without reading the optimizer state."""
        return self._restore(which, step, params=ocp.args.StandardRestore(_abstract(params)))["params"]

    def restore_meta(self, which: str, step: int | None = None) -> dict[str, Any]:
        """The `meta` item (config, tokenizer, best_val_loss, step) of a verified step (default: the newest)."""
        return self._restore(which, step, meta=ocp.args.JsonRestore())["meta"]

    def _restore(self, which: str, step: int | None, **items: Any) -> dict[str, Any]:
        """The named items of a verified step (None: the newest); one-line `CheckpointError`s."""
        step = self.latest_step(which) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {checkpoint_dir(self.out_dir, which)}")
        self.verify(which, step)
        try:
            return self.managers[which].restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - whatever Orbax raises for a bad step, say which step
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"cannot restore {self.step_dir(which, step)} ({reason})") from e

    def find_usable(self, *, warn: Callable[[str], None], quarantine: bool = False,
                    kinds: tuple[str, ...] = CHECKPOINT_KINDS) -> tuple[str, int]:
        """The newest whole checkpoint of `kinds`, 'latest' first at equal steps: returns (which, step).

        Each unusable step passed over is reported through `warn`, naming it and the one used instead;
        with `quarantine`, it is moved to checkpoints/unusable/ so that new saves do not collide with it.
        Raises `CheckpointError` listing every step when none is usable.
        """
        candidates = sorted(((s, w) for w in kinds for s in self.steps(w)),
                            key=lambda c: (-c[0], CHECKPOINT_KINDS.index(c[1])))
        bad: list[tuple[str, int, str]] = []
        for step, which in candidates:
            try:
                self.verify(which, step)
            except CheckpointError as e:
                bad.append((which, step, str(e)))
                continue
            for b_which, b_step, reason in bad:
                moved = f"; moved to {self._quarantine(b_which, b_step)}" if quarantine else ""
                warn(f"checkpoint {b_which}/{b_step} is unusable: {reason}; using {which}/{step} instead{moved}")
            return which, step
        listed = "; ".join(reason for *_, reason in bad) or "no checkpoints"
        raise CheckpointError(f"no usable checkpoint in {self.out_dir / CHECKPOINTS}: {listed}")

    def _quarantine(self, which: str, step: int) -> pathlib.Path:
        dest_dir = self.out_dir / CHECKPOINTS / "unusable"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest, n = dest_dir / f"{which}-{step}", 1
        while dest.exists():
            dest, n = dest_dir / f"{which}-{step}.{n}", n + 1
        os.replace(self.step_dir(which, step), dest)
        self.managers[which].reload()
        return dest

    def reload(self) -> None:
        """Re-reads the steps on disk (after another process changed them)."""
        for manager in self.managers.values():
            manager.reload()

    def close(self) -> None:
        """Closes the managers and waits for Orbax's clean-up of killed saves' temporary folders: a background
        thread that lists the checkpoint folders, which a run interrupted before its first checkpoint removes."""
        for manager in self.managers.values():
            manager.close()
        _join_orbax_threads()


def _join_orbax_threads(timeout: float = 60.0) -> None:
    """Waits for Orbax's background threads: those a failed save left running (each waits for the other items of
    the step to be written) and a manager's clean-up of temporary folders. Left alone, they outlive the run or the
    folders they list, and each prints a traceback around the one error line."""
    from orbax.checkpoint._src.futures import future  # private: Orbax has no public way to wait for them

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if isinstance(thread, getattr(future, "_SignalingThread", ())) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


READ_ATTEMPTS = 5  # load_model's reads of a checkpoint folder that a training run keeps changing


def _step_names(ckpt_dir: pathlib.Path) -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(p.name for p in ckpt_dir.iterdir())
    return []


def _all_step_names(out_dir: str | os.PathLike) -> list[list[str]]:
    """The step folders of every checkpoint kind: what a training run changes as it saves and prunes."""
    return [_step_names(checkpoint_dir(out_dir, which)) for which in CHECKPOINT_KINDS]


def _read_newest(ckptr: Checkpointer, which: str) -> tuple[nnx.GraphDef, Any, dict, int]:
    """(graphdef, params on one device, meta, step) of the newest whole `which` step."""
    if not ckptr.steps(which):
        raise FileNotFoundError(f"no {which} checkpoint in {checkpoint_dir(ckptr.out_dir, which)}")
    warn = lambda m: warnings.warn(m, RuntimeWarning, stacklevel=4)  # noqa: E731
    _, step = ckptr.find_usable(warn=warn, kinds=(which,))
    meta = ckptr.restore_meta(which, step)
    config = config_lib.from_dict(meta["config"])
    graphdef, abstract_params = nnx.split(config_lib.model_shape(config, meta["vocab_size"]))
    # Onto one device, whatever mesh the run was trained on (Orbax would otherwise use the saved shardings).
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                                   abstract_params)
    return graphdef, ckptr.restore_params(which, step, params=abstract_params), meta, step


def load_model(out_dir: str | os.PathLike, which: str = "best") -> tuple[nnx.Module, Tokenizer | None, dict]:
    """The trained model of a run, its tokenizer and a summary.

    Returns (model, tokenizer, info): the NNX `GPT` or `BigramLanguageModel` with the `which` checkpoint's
    parameters, the run's tokenizer (None for a nanoGPT dataset without meta.pkl), and a dict with
    'step', 'best_val_loss', 'config' (the training config as a plain dict), 'which' and 'path'.
    Raises FileNotFoundError naming the directory when there is no such checkpoint, and `CheckpointError`
    when none of its steps is whole; an unusable newest step is passed over with a warning naming both.
    """
    ckpt_dir = checkpoint_dir(out_dir, which)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no {which} checkpoint in {ckpt_dir}")
    for attempt in range(READ_ATTEMPTS):
        on_disk, ckptr = _all_step_names(out_dir), None
        try:
            ckptr = Checkpointer(out_dir, read_only=True)  # lists the steps: one may go while it looks
            graphdef, params, meta, step = _read_newest(ckptr, which)
            break
        except (CheckpointError, OSError):
            # A run training in out_dir pruned or replaced a step while it was read (the Checkpointer lists both
            # kinds, and 'latest' may be a link of a 'best' step): read the newest again.
            if attempt + 1 == READ_ATTEMPTS or _all_step_names(out_dir) == on_disk:
                raise
        finally:
            if ckptr is not None:
                ckptr.close()
    model = nnx.merge(graphdef, params)
    tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    info = {
        "step": int(meta["step"]),
        "best_val_loss": meta.get("best_val_loss"),
        "config": meta["config"],
        "which": which,
        "path": str(ckpt_dir / str(step)),
    }
    return model, tokenizer, info
