"""Orbax checkpoints: latest / best, what they hold, and load_model for sampling."""

from __future__ import annotations

import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt import checkpoint, optim, training
from jaxgpt.model import GPT
from jaxgpt.tokenizer import CharTokenizer
from tests.test_training import tiny_config, tiny_text


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare_path):
    tmp = tmp_path_factory.mktemp("ckpt")
    training.enable_compilation_cache(tmp / "xla", min_compile_time_secs=0)
    text = tiny_text(tmp, shakespeare_path)
    out = tmp / "run"
    summary = training.train(tiny_config(text, out, max_iters=8, eval_interval=4))
    return out, text, summary


def test_load_model_restores_best_and_latest(run):
    out, text, summary = run
    model, tok, info = checkpoint.load_model(out)  # 'best' by default
    assert isinstance(model, GPT) and isinstance(tok, CharTokenizer)
    assert tok == CharTokenizer.from_text(text.read_text())
    assert info["which"] == "best" and info["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    assert info["config"]["model"]["n_embd"] == 16 and info["config"]["batch_size"] == 4
    assert info["step"] in (4, 8)
    latest_model, _, latest = checkpoint.load_model(out, "latest")
    assert latest["step"] == 8
    logits = latest_model(np.asarray([tok.encode("First")]))
    assert logits.shape == (1, 5, tok.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_restore_gives_back_the_saved_arrays(run, tmp_path):
    out, text, _ = run
    model, _, info = checkpoint.load_model(out, "latest")
    graphdef, params = nnx.split(model)
    tx = optim.make_optimizer(tiny_config(text, out))
    opt_state = tx.init(params)
    copy = tmp_path / "copy"
    saver = checkpoint.Checkpointer(copy)
    key = jax.random.PRNGKey(42)
    saver.save("latest", 3, params=params, opt_state=opt_state, key=key, meta={"config": info["config"], "x": 1})
    restored = saver.restore("latest", params=params, opt_state=opt_state, key=jax.random.PRNGKey(0))
    saver.close()
    for a, b in zip(jax.tree.leaves((params, opt_state, key)),
                    jax.tree.leaves((restored["params"], restored["opt_state"], restored["train"]["key"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored["train"]["step"]) == 3 and restored["meta"]["x"] == 1


def test_close_waits_for_orbaxs_clean_up_of_old_temporary_folders(tmp_path, monkeypatch):
    """A run interrupted before its first checkpoint removes the empty checkpoint folders right after `close`: the
    thread in which Orbax lists them for temporary folders must be done by then (else it prints a traceback)."""
    import asyncio
    import importlib
    import threading

    temporary_paths = importlib.import_module("orbax.checkpoint._src.path.temporary_paths")  # Orbax's own
    original = temporary_paths.cleanup_temporary_paths
    listed = []

    async def slow_clean_up(*args, **kwargs):
        await asyncio.sleep(0.5)  # a busy disk: the listing comes after `close` would have returned
        listed.append(await original(*args, **kwargs))

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_clean_up)
    ckptr = checkpoint.Checkpointer(tmp_path / "out")
    ckptr.close()
    assert len(listed) == len(checkpoint.CHECKPOINT_KINDS)  # every manager's clean-up finished inside close()
    assert not [t for t in threading.enumerate() if "orbax" in type(t).__module__]


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        checkpoint.load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="which"):
        checkpoint.load_model(tmp_path, "middle")


def _saveable_state(run) -> dict:
    """What `Checkpointer.save` takes, from the fixture run's latest checkpoint."""
    out, text, _ = run
    model, _, info = checkpoint.load_model(out, "latest")
    _, params = nnx.split(model)
    opt_state = optim.make_optimizer(tiny_config(text, out)).init(params)
    return dict(params=params, opt_state=opt_state, key=jax.random.PRNGKey(7), meta={"config": info["config"]})


def test_a_step_both_best_and_latest_is_written_once_and_copied(run, tmp_path):
    """`link` gives 'latest' copies of the files of 'best' (whole or not at all, never hard links that a change in
    place would reach through both names); pruning 'best' later leaves 'latest' whole, and a link killed midway
    leaves a temp dir that is no step and is cleared."""
    state = _saveable_state(run)
    params, opt_state = state["params"], state["opt_state"]
    ckptr = checkpoint.Checkpointer(tmp_path)
    for step in (3, 5):
        ckptr.save("best", step, **state)
        ckptr.link("latest", step, source="best")
    assert ckptr.steps("best") == [5] and ckptr.steps("latest") == [5, 3]  # each manager prunes as after a save
    best, latest = ckptr.step_dir("best", 5), ckptr.step_dir("latest", 5)
    files = sorted(p.relative_to(best) for p in best.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(latest) for p in latest.rglob("*") if p.is_file())
    assert all((best / f).read_bytes() == (latest / f).read_bytes() for f in files)  # copied, not rewritten
    assert all((best / f).stat().st_ino != (latest / f).stat().st_ino for f in files)  # no file shared
    checkpoint.verify(ckptr.step_dir("latest", 3))  # its 'best' twin is gone: the copies are whole
    restored = ckptr.restore("latest", step=3, params=params, opt_state=opt_state, key=state["key"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckptr.link("latest", 5, source="best")  # already whole there: nothing changes
    assert ckptr.steps("latest") == [5, 3]
    ckptr.close()

    leftover = checkpoint.checkpoint_dir(tmp_path, "latest") / ".7.jaxgpt-linking"
    leftover.mkdir()
    reader = checkpoint.Checkpointer(tmp_path, read_only=True)
    assert reader.steps("latest") == [5, 3] and leftover.is_dir()
    reader.close()
    checkpoint.Checkpointer(tmp_path).close()
    assert not leftover.exists()


def test_a_link_that_fails_is_one_line_and_keeps_the_older_step(run, tmp_path, monkeypatch):
    state = _saveable_state(run)
    ckptr = checkpoint.Checkpointer(tmp_path)
    ckptr.save("best", 3, **state)
    ckptr.link("latest", 3, source="best")
    ckptr.save("best", 5, **state)

    def full_disk(src, dst, **kwargs):  # the copy stops after its first file
        os.makedirs(dst)
        (pathlib.Path(dst) / "partial").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not save the latest checkpoint at step 5 .*No space "
                                                         r"left on device.*previous checkpoint \(step 3\) is kept"):
        ckptr.link("latest", 5, source="best")
    assert ckptr.steps("latest") == [3]
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path, "latest").iterdir()] == ["3"]
    ckptr.close()
