"""Faults never lose a run: corrupt checkpoints, a full disk, NaN / inf, and a checkpoint read while a run
prunes it. (Runs killed or interrupted for real, two runs on one out_dir and cut downloads: test_interruptions.)
"""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import pickle
import re
import shutil
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

from jaxgpt import checkpoint as ckpt_lib
from jaxgpt import config as config_lib
from jaxgpt import data, optim, run_dir, train_step, training
from tests.test_training import tiny_config, tiny_text

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """One compilation cache for this module's runs, in-process and in the children."""
    path = tmp_path_factory.mktemp("xla")
    training.enable_compilation_cache(path, min_compile_time_secs=0)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory, shakespeare_path):
    return tiny_text(tmp_path_factory.mktemp("text"), shakespeare_path)


def run_config(text, out, **overrides):
    """tiny_config with a checkpoint at every evaluation, one step per call and no plot."""
    return tiny_config(text, out, **{"always_save_checkpoint": True, "plot": False, "steps_per_call": 1,
                                     "eval_interval": 2, **overrides})


def restored_state(out: pathlib.Path, text, which: str = "latest", step: int | None = None, **overrides) -> dict:
    """The restored params, opt_state and train items of one checkpoint of a tiny run."""
    cfg = run_config(text, out, **overrides)
    graphdef, params = nnx.split(config_lib.build_model(cfg, data.load_dataset(text).vocab_size, 0))
    opt_state = optim.make_optimizer(cfg).init(params)
    c = ckpt_lib.Checkpointer(out, read_only=True)
    try:
        return c.restore(which, step=step, params=params, opt_state=opt_state, key=jax.random.PRNGKey(0))
    finally:
        c.close()


def assert_same_state(a: dict, b: dict) -> None:
    assert int(a["train"]["step"]) == int(b["train"]["step"])
    for x, y in zip(jax.tree.leaves((a["params"], a["opt_state"], a["train"]["key"])),
                    jax.tree.leaves((b["params"], b["opt_state"], b["train"]["key"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def metrics_records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ corrupt checkpoints


@pytest.fixture(scope="module")
def run6(tmp_path_factory, text):
    """A finished 6-step run: 'latest' holds steps 4 and 6."""
    out = tmp_path_factory.mktemp("run6") / "run"
    training.train(run_config(text, out, max_iters=6))
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
        restored_state(out, text)
    assert "\n" not in str(e.value)
    assert int(restored_state(out, text, step=4)["train"]["step"]) == 4  # the one before is untouched


def test_resume_falls_back_to_the_previous_good_checkpoint(run6, tmp_path, text):
    """latest/6 has a flipped byte: resume warns naming latest/6 and latest/4, redoes steps 4-5 and ends with
    the very state the corrupted checkpoint held."""
    out = _copy(run6, tmp_path)
    _flip(_biggest_file(out / "checkpoints" / "latest" / "6"))
    if (out / "checkpoints" / "best" / "6").exists():  # the same state, saved as 'best': spoil it too
        _flip(_biggest_file(out / "checkpoints" / "best" / "6"))
    logs = []
    training.train(run_config(text, out, max_iters=6, resume=True), log=logs.append)
    warning = next(line for line in logs if line.startswith("warning:"))
    assert "latest/6 is unusable" in warning and "sha256" in warning and "using latest/4 instead" in warning
    assert any("resumed from" in line and line.split(" at step ")[1].startswith("4") for line in logs)
    assert (out / "checkpoints" / "unusable" / "latest-6").is_dir()  # kept aside, not deleted
    assert_same_state(restored_state(out, text), restored_state(run6, text))


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

    class FullDisk:  # the folder Orbax's JSON handler writes its file into: the write stops after 10 characters
        def __init__(self, directory):
            self.directory = directory

        def __truediv__(self, name):
            return self

        def write_text(self, text):
            (self.directory / "metadata").write_text(text[:10])
            _enospc()

    real_save = ocp.JsonCheckpointHandler.async_save
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save",
                        lambda self, directory, *a, **k: real_save(self, FullDisk(directory), *a, **k))
    with pytest.raises(run_dir.TrainingError) as e:
        training.train(run_config(text, out, max_iters=8, resume=True))
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and "at step 8" in message
    assert re.search(r"the previous checkpoint \(step [46]\) is kept$", message)
    reader = ckpt_lib.Checkpointer(out, read_only=True)
    assert reader.steps("latest") == [6, 4] and 8 not in reader.steps("best")  # the partial step is gone
    reader.close()
    assert_same_state(restored_state(out, text), restored_state(run6, text))
    monkeypatch.undo()  # space again
    assert training.train(run_config(text, out, max_iters=8, resume=True))["step"] == 8
    assert not list((out / "checkpoints").glob("*/*tmp*"))  # Orbax's half-written temp dir is gone too


def test_full_disk_while_writing_the_manifest_removes_the_step(run6, tmp_path, text, monkeypatch):
    """Orbax has committed step 7, the manifest's fsync fails: CheckpointError, step 7 removed, 4 and 6 whole."""
    out = _copy(run6, tmp_path)
    state = restored_state(out, text)
    ckptr = ckpt_lib.Checkpointer(out)
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"latest checkpoint at step 7 .*No space left on device.*"
                                                       r"previous checkpoint \(step 6\) is kept$"):
        ckptr.save("latest", 7, params=state["params"], opt_state=state["opt_state"], key=state["train"]["key"],
                   meta=state["meta"])
    monkeypatch.undo()
    assert ckptr.steps("latest") == [6, 4] and not (out / "checkpoints" / "latest" / "7").exists()
    ckptr.close()
    assert_same_state(restored_state(out, text), state)
    assert int(restored_state(out, text, step=4)["train"]["step"]) == 4


# ------------------------------------------------------------------------ NaN / inf


def _poison(monkeypatch, bad_step: int | None, kind: str) -> None:
    """Makes training step `bad_step` (None: every step) non-finite: its loss ('loss') or only its gradients
    ('grad')."""
    current = threading.local()  # programs may be traced in a background thread, one trace per thread at a time
    real_keys, real_eval_key, real_loss = train_step.step_keys, train_step.eval_key, train_step.loss_fn

    def step_keys(base_key, step, n):
        current.step = step  # the traced step number, used below in the same trace
        return real_keys(base_key, step, n)

    def eval_key(base_key, step, split_index):
        current.step = None  # an evaluation follows: leave its loss alone
        return real_eval_key(base_key, step, split_index)

    def loss(logits, targets):
        value = real_loss(logits, targets)
        step = getattr(current, "step", None)
        if step is None:
            return value
        hit = True if bad_step is None else step == bad_step
        if kind == "loss":
            return value * jnp.where(hit, jnp.nan, 1.0)
        # 0 * sqrt(s) is 0, but its gradient at s = 0 is 0 * inf = NaN
        s = jnp.where(hit, 0.0 * logits.sum(), 1.0)
        return value + 0.0 * jnp.sqrt(s)

    monkeypatch.setattr(train_step, "step_keys", step_keys)
    monkeypatch.setattr(train_step, "eval_key", eval_key)
    monkeypatch.setattr(train_step, "loss_fn", loss)


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
    cfg = run_config(text, tmp_path / "out", max_iters=8)
    cfg.data.path = str(d)
    with pytest.raises(data.DataError, match=rf"train.bin holds 1 token id\(s\) outside the vocabulary "
                                             rf"\[0, {ds.vocab_size}\), the first {ds.vocab_size} at position 123"):
        training.train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, text, monkeypatch):
    """Step 5's loss is NaN: the run stops naming step 5 and keeps step 4's checkpoint."""
    _poison(monkeypatch, 5, "loss")
    cfg = run_config(text, tmp_path / "out", max_iters=8, **{"model.name": "bigram"})
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
    summary = training.train(run_config(text, out, max_iters=5, eval_interval=1, skip_nonfinite=True,
                                     **{"model.name": "bigram"}))
    assert summary["skipped_nonfinite"] == 1
    bigram = {"model.name": "bigram"}
    before, after = restored_state(out, text, step=4, **bigram), restored_state(out, text, step=5, **bigram)
    assert int(after["train"]["step"]) == 5
    for x, y in zip(jax.tree.leaves((before["params"], before["opt_state"])),
                    jax.tree.leaves((after["params"], after["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = {r["step"]: r for r in metrics_records(out) if "lr" in r}
    assert [steps[s]["skipped_nonfinite"] for s in range(5)] == [0, 0, 0, 0, 1]
    assert "loss" not in steps[4] and all(np.isfinite(steps[s]["loss"]) for s in range(4))
    assert after["meta"]["skipped_nonfinite"] == 1 and before["meta"]["skipped_nonfinite"] == 0


def test_skip_nonfinite_with_every_step_skipped_is_an_error(tmp_path, text, monkeypatch):
    """Every gradient NaN: the run does not end 'done' but says that nothing was learned, the checkpoint kept."""
    _poison(monkeypatch, None, "grad")
    out = tmp_path / "out"
    with pytest.raises(run_dir.TrainingError, match=r"all 4 steps of this run were skipped as non-finite"):
        training.train(run_config(text, out, max_iters=4, skip_nonfinite=True, **{"model.name": "bigram"}))
    assert ckpt_lib.Checkpointer(out, read_only=True).latest_step() == 4


@pytest.mark.slow  # sample.py in a subprocess
def test_best_and_latest_share_no_file_and_sampling_falls_back_from_a_corrupt_best(tmp_path, text):
    """The state of step 4 is both 'best' and 'latest': a byte flipped in place in best/4 leaves latest/4 whole,
    and sample.py's default (best) falls back to latest/4 with a one-line note; --which=best is one error line."""
    import sample

    out = tmp_path / "run"
    training.train(run_config(text, out, max_iters=4, eval_interval=4))
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
    real, pruned = ckpt_lib.Checkpointer.restore_params, []

    def restore_while_pruned(self, which, step=None, **kwargs):
        if not pruned:
            pruned.append(step)
            shutil.rmtree(self.step_dir(which, step))
        return real(self, which, step, **kwargs)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_params", restore_while_pruned)
    _, _, info = ckpt_lib.load_model(out, "latest")
    assert pruned == [6] and info["step"] == 4
    assert "Traceback" not in capfd.readouterr().err
    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_params", real)
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
