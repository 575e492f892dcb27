"""The train step, the loop and its faults, and dataset loading (text, nanoGPT directory, download)."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import checkpoint, data, host_feed, optim, train_loop, train_step, training
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.run_dir import TrainingError


def tiny_text(tmp_path: pathlib.Path, shakespeare_path: pathlib.Path, n_chars: int = 4000) -> pathlib.Path:
    path = tmp_path / "tiny.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    return path


def tiny_config(text_path: pathlib.Path, out_dir: pathlib.Path, **overrides):
    """A model and run small enough for a test: a few steps of a 1-layer, 16-wide GPT."""
    c = config_lib.base_config()
    c.data.path = str(text_path)
    c.out_dir = str(out_dir)
    c.batch_size = 4
    c.max_iters = 8
    c.eval_interval = 4
    c.eval_iters = 2
    c.log_interval = 1
    c.warmup_iters = 2
    c.lr_decay_iters = 8
    c.learning_rate = 1e-2
    c.min_lr = 1e-3
    c.steps_per_call = 2
    c.progress = False
    c.sample_tokens = 0
    c.model.block_size = 8
    c.model.n_layer = 1
    c.model.n_head = 2
    c.model.n_embd = 16
    c.model.dropout = 0.1  # so that the dropout keys are part of what must resume exactly
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="session", autouse=True)
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for the session: the many tiny runs share their compiled steps."""
    path = tmp_path_factory.mktemp("xla")
    training.enable_compilation_cache(path, min_compile_time_secs=0)
    return path


@pytest.fixture
def text_path(tmp_path, shakespeare_path):
    return tiny_text(tmp_path, shakespeare_path)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------ the step


def _setup(vocab=11, block_size=8, dropout=0.0, bias=True):
    cfg = model_lib.GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16,
                              dropout=dropout, bias=bias)
    graphdef, params = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
    tx = optim.adamw(1e-2, weight_decay=0.1, grad_clip=1.0)
    return graphdef, params, tx


def test_boundaries_never_cross_an_evaluation():
    chunks = train_loop.chunk_boundaries(0, 23, eval_interval=10, steps_per_call=4)
    assert chunks[0] == (0, 4) and chunks[-1][1] == 23
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(chunks, chunks[1:]))  # contiguous
    assert all(a // 10 == (b - 1) // 10 for a, b in chunks)  # no chunk spans a multiple of 10
    assert train_loop.chunk_boundaries(10, 10, 10, 4) == []
    # A short first call, so that progress shows within seconds of the compile.
    assert train_loop.chunk_boundaries(0, 300, 250, 125, first_call=8) == [(0, 8), (8, 133), (133, 250), (250, 300)]


def test_chunks_of_any_length_share_one_program_and_equal_one_long_chunk():
    """With max_steps, 3 steps then 5 steps equal 8 steps in one call, bit for bit, and compile once."""
    graphdef, params, tx = _setup(dropout=0.1)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, 400), jnp.int32)
    key = jax.random.PRNGKey(4)
    chunk = train_step.make_train_chunk(graphdef, tx, batch_size=3, block_size=8, use_dropout=True, max_steps=8)
    p, o = jax.tree.map(jnp.copy, params), tx.init(params)
    p, o, m1 = chunk(p, o, tokens, key, jnp.int32(0), 3)
    p, o, m2 = chunk(p, o, tokens, key, jnp.int32(3), 5)
    q, _, m = chunk(jax.tree.map(jnp.copy, params), tx.init(params), tokens, key, jnp.int32(0), 8)
    assert m1["loss"].shape == m2["loss"].shape == (8,)  # max_steps entries, the first n_steps filled
    assert not np.asarray(m1["loss"][3:]).any()
    np.testing.assert_array_equal(np.concatenate([m1["loss"][:3], m2["loss"][:5]]), m["loss"])
    for a, b in zip(_leaves(p), _leaves(q)):
        np.testing.assert_array_equal(a, b)
    assert chunk.lower(p, o, tokens, key, jnp.int32(0), 3).as_text() == \
        chunk.lower(p, o, tokens, key, jnp.int32(0), 8).as_text()  # one program for both lengths


def test_recipes_that_differ_only_in_their_numbers_share_one_program():
    """The loop's chunk takes the optimizer's learning rates, schedule lengths, decay, betas and clip as arguments:
    two recipes lower to one program (one compilation-cache entry, so a rerun with another learning rate compiles
    nothing), and each trains as its numbers compiled in as constants do, to float32 rounding. (No biases: the key
    bias's gradient is zero but for rounding, which Adam's normalisation makes lr-sized.)"""
    cfg = model_lib.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16, bias=False)
    graphdef, params = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 11, 400), jnp.int32)
    key = jax.random.PRNGKey(8)
    a = config_lib.base_config()
    a.warmup_iters, a.lr_decay_iters, a.learning_rate, a.min_lr = 2, 6, 1e-2, 1e-3
    b = config_lib.base_config()
    b.warmup_iters, b.lr_decay_iters, b.learning_rate, b.min_lr = 3, 5, 3e-2, 2e-3
    b.weight_decay, b.beta1, b.beta2, b.grad_clip = 0.05, 0.8, 0.9, 0.5
    lowered, trained = [], []
    for c in (a, b):
        c.batch_size, c.model.block_size, c.steps_per_call = 3, 8, 8
        tx = optim.make_optimizer(c)
        as_numbers = train_loop.recipe_train_chunk(graphdef, c, mesh=None)
        as_constants = train_step.make_train_chunk(graphdef, tx, batch_size=3, block_size=8, max_steps=8,
                                                   lr_schedule=optim.schedule_from_config(c))
        args = [(tokens, key, jnp.int32(0), 8, optim.recipe_numbers(c)), (tokens, key, jnp.int32(0), 8)]
        (p, _, m), (q, _, n) = [f(jax.tree.map(jnp.copy, params), tx.init(params), *xs)
                                for f, xs in zip((as_numbers, as_constants), args)]
        np.testing.assert_allclose(m["lr"], n["lr"], rtol=1e-6)
        np.testing.assert_allclose(m["loss"], n["loss"], rtol=1e-5)
        for x, y in zip(_leaves(p), _leaves(q)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        lowered.append([f.lower(params, tx.init(params), *xs).as_text() for f, xs in zip((as_numbers, as_constants),
                                                                                        args)])
        trained.append(_leaves(p))
    assert lowered[0][0] == lowered[1][0]  # the numbers' program is one
    assert lowered[0][1] != lowered[1][1]  # constants make two
    assert not all(np.allclose(x, y) for x, y in zip(*trained))  # and the numbers do take effect


def test_grad_accumulation_equals_one_big_batch():
    """Two micro-batches of 3 give the update of one batch of 6 (the gradient is their mean). (No biases: the key
    bias's gradient is zero but for rounding, which Adam's normalisation turns into lr-sized noise.)"""
    graphdef, params, tx = _setup(bias=False)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 11, (1, 2, 3, 8)).astype(np.int32)
    y = rng.integers(0, 11, (1, 2, 3, 8)).astype(np.int32)
    key = jax.random.PRNGKey(0)
    accum = train_step.make_train_chunk(graphdef, tx, batch_size=3, block_size=8, grad_accum_steps=2)
    whole = train_step.make_train_chunk(graphdef, tx, batch_size=6, block_size=8, grad_accum_steps=1)
    pa, _, ma = accum(jax.tree.map(jnp.copy, params), tx.init(params), (x, y), key, jnp.int32(0), n_steps=1)
    pw, _, mw = whole(jax.tree.map(jnp.copy, params), tx.init(params),
                      (x.reshape(1, 1, 6, 8), y.reshape(1, 1, 6, 8)), key, jnp.int32(0), n_steps=1)
    np.testing.assert_allclose(np.asarray(ma["loss"]), np.asarray(mw["loss"]), rtol=1e-6)
    for a, b in zip(_leaves(pa), _leaves(pw)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(pa), _leaves(params)))


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_carried_bf16_weights_train_as_the_model_casting_them_itself(grad_accum_steps):
    """A bf16 model with float32 parameters: the loop that carries the matrices cast to bf16 (`compute_dtype`)
    trains bit for bit as the loop whose model casts them each step, across chunk boundaries; the carried copy
    is never in the state it returns."""
    cfg = model_lib.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16, dropout=0.1,
                              dtype="bfloat16")
    graphdef, params = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
    tx = optim.adamw(1e-2, weight_decay=0.1, grad_clip=1.0)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, 400), jnp.int32)
    key = jax.random.PRNGKey(4)
    runs = []
    for compute_dtype in (None, "bfloat16"):
        chunk = train_step.make_train_chunk(graphdef, tx, batch_size=3, block_size=8, use_dropout=True, max_steps=4,
                                            grad_accum_steps=grad_accum_steps, compute_dtype=compute_dtype)
        p, o = jax.tree.map(jnp.copy, params), tx.init(params)
        p, o, m1 = chunk(p, o, tokens, key, jnp.int32(0), 3)
        p, o, m2 = chunk(p, o, tokens, key, jnp.int32(3), 4)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((p, o)) if jnp.issubdtype(x.dtype, jnp.floating))
        runs.append((np.concatenate([m1["loss"][:3], m2["loss"]]), _leaves(p), _leaves(o)))
        text = chunk.lower(params, tx.init(params), tokens, key, jnp.int32(0), 3).as_text()
        runs[-1] += (text.count("convert"),)
    (loss_a, p_a, o_a, converts_a), (loss_b, p_b, o_b, converts_b) = runs
    np.testing.assert_array_equal(loss_a, loss_b)
    for a, b in zip(p_a + o_a, p_b + o_b):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(p_a, _leaves(params)))  # it did train
    assert converts_b != converts_a  # and the two loops are different programs


def test_host_batches_are_the_device_batches():
    tokens = np.random.default_rng(2).integers(0, 50, 300).astype(np.uint16)
    keys = jax.random.split(jax.random.PRNGKey(5), 6).reshape(2, 3, 2)
    x, y = data.windows(tokens, host_feed.batch_offsets(keys, batch_size=4, block_size=7, n_tokens=300), 7)
    assert isinstance(x, np.ndarray) and x.dtype == np.int32
    assert x.shape == y.shape == (2, 3, 4, 7)
    for i in range(2):
        for j in range(3):
            xd, yd = data.get_batch(keys[i, j], tokens.astype(np.int32), batch_size=4, block_size=7)
            np.testing.assert_array_equal(x[i, j], np.asarray(xd))
            np.testing.assert_array_equal(y[i, j], np.asarray(yd))


def test_estimate_loss_is_the_mean_eval_loss_without_dropout():
    graphdef, params, _ = _setup(dropout=0.5)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, 400), jnp.int32)
    est = train_step.make_estimate_loss(graphdef, batch_size=2, block_size=8, eval_iters=3)
    base_key, step = jax.random.PRNGKey(9), 250
    model = nnx.merge(graphdef, params)

    def mean_loss(key):  # nanoGPT's estimate_loss: the mean loss of eval_iters batches
        return np.mean([float(model_lib.loss_fn(model(x), y))
                        for x, y in (data.get_batch(k, tokens, 2, 8) for k in jax.random.split(key, 3))])

    train, val = est(params, (tokens, tokens), base_key, np.int32(step))
    # Each split draws with its own key of this step (here both splits read the same tokens).
    assert float(train) == pytest.approx(mean_loss(train_step.eval_key(base_key, step, 0)), rel=1e-5)
    assert float(val) == pytest.approx(mean_loss(train_step.eval_key(base_key, step, 1)), rel=1e-5)
    assert float(train) != float(val)
    again = est(params, (tokens, tokens), base_key, step)  # a Python int step draws the same batches
    assert (float(again[0]), float(again[1])) == (float(train), float(val))  # no dropout: deterministic


# ------------------------------------------------------------------------------------------ the loop


def test_run_writes_metrics_plot_and_checkpoints(tmp_path, text_path):
    out = tmp_path / "run"
    summary = training.train(tiny_config(text_path, out, sample_tokens=20))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(8))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["step"] == 8 and summary["best_val_loss"] == min(r["val_loss"] for r in records if "val_loss" in r)
    assert len(summary["sample"]) == 21  # the newline prompt + 20 characters
    # The text is the final model's.
    model, tokenizer, _ = checkpoint.load_model(out, "latest")
    assert summary["sample"] == train_loop.sample_text(model, tokenizer, 20, seed=tiny_config(text_path, out).seed)
    _, _, latest = checkpoint.load_model(out, "latest")
    assert latest["step"] == 8
    # The host path (data kept off the device, batches gathered from a memmap) trains on the same windows.
    host = tmp_path / "host"
    training.train(tiny_config(text_path, host, **{"data.on_device": False}))
    host_records = [json.loads(line) for line in (host / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in host_records if "loss" in r],
                               [r["loss"] for r in records if "loss" in r], rtol=1e-6)


def test_resume_is_bit_exact(tmp_path, text_path):
    """8 steps in one run equal 4 steps + resume + 4 steps, bit for bit (params, optimizer state, losses)."""
    one = tmp_path / "one"
    training.train(tiny_config(text_path, one))
    two = tmp_path / "two"
    training.train(tiny_config(text_path, two, max_iters=4))
    assert checkpoint.load_model(two, "latest")[2]["step"] == 4
    training.train(tiny_config(text_path, two, resume=True))

    def state(out):
        c = checkpoint.Checkpointer(out)
        cfg = tiny_config(text_path, out)
        vocab_size = data.load_dataset(text_path).vocab_size
        graphdef, params = nnx.split(config_lib.build_model(cfg, vocab_size, 0))
        opt_state = optim.make_optimizer(cfg).init(params)
        restored = c.restore("latest", params=params, opt_state=opt_state, key=jax.random.PRNGKey(0))
        c.close()
        return restored

    s1, s2 = state(one), state(two)
    assert int(s1["train"]["step"]) == int(s2["train"]["step"]) == 8
    for a, b in zip(_leaves((s1["params"], s1["opt_state"])), _leaves((s2["params"], s2["opt_state"]))):
        np.testing.assert_array_equal(a, b)
    losses = [[r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for out in (one, two)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, text_path, monkeypatch):
    """A learning rate that turns NaN from update 6 on: the loss of step 7 is NaN; step 4's checkpoint stays."""
    real = optim.lr_schedule

    def poisoned(learning_rate, **kw):
        schedule = real(learning_rate, **kw)
        return lambda count: jnp.where(count >= 6, jnp.nan, schedule(count))

    monkeypatch.setattr(optim, "lr_schedule", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"at step 7\b.*step 4"):
        training.train(tiny_config(text_path, out, max_iters=12, steps_per_call=4))
    model, _, info = checkpoint.load_model(out, "latest")
    assert info["step"] == 4
    assert all(np.isfinite(leaf).all() for leaf in _leaves(nnx.state(model)))


def test_eval_only_evaluates_the_checkpoint_and_runs_no_training_step(tmp_path, text_path, monkeypatch):
    calls = []
    real = train_loop.recipe_train_chunk

    def recording(*args, **kwargs):
        chunk = real(*args, **kwargs)
        return lambda *a, **kw: calls.append(a[4]) or chunk(*a, **kw)

    monkeypatch.setattr(train_loop, "recipe_train_chunk", recording)
    out = tmp_path / "run"
    trained = training.train(tiny_config(text_path, out))
    assert len(calls) == 4  # 8 steps, 2 per call
    calls.clear()
    summary = training.train(tiny_config(text_path, out, resume=True, eval_only=True))
    assert calls == []
    assert summary["step"] == 8 and summary["best_val_loss"] == trained["best_val_loss"]


def test_bigram_trains(tmp_path, text_path):
    out = tmp_path / "bigram"
    summary = training.train(tiny_config(text_path, out, **{"model.name": "bigram", "learning_rate": 1e-1,
                                                              "max_iters": 20, "eval_interval": 10}))
    vocab_size = data.load_dataset(text_path).vocab_size
    first_val = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert summary["best_val_loss"] < first_val - 0.2  # it learns
    model, tok, _ = checkpoint.load_model(out, "best")
    assert isinstance(model, model_lib.BigramLanguageModel) and tok.vocab_size == vocab_size


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "content, match",
    [(None, "does not exist.*data.path"), ("", "is empty"), ("abcdefgh", "needs at least 9")],
)
def test_bad_datasets_fail_before_anything_is_written(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(data.DataError, match=match):
        training.train(tiny_config(path, out))
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_unwritable_out_dir(tmp_path, text_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="not writable.*out_dir"):
        training.train(tiny_config(text_path, blocker / "run"))


def test_resume_without_checkpoint(tmp_path, text_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        training.train(tiny_config(text_path, tmp_path / "empty", resume=True))


def test_existing_run_is_not_overwritten(tmp_path, text_path):
    out = tmp_path / "run"
    training.train(tiny_config(text_path, out, max_iters=4))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="already holds a run"):
        training.train(tiny_config(text_path, out, max_iters=4))
    assert (out / "metrics.jsonl").read_text() == before
    training.train(tiny_config(text_path, out, max_iters=4, overwrite=True, seed=7))
    assert (out / "metrics.jsonl").read_text() != before


def test_resume_with_a_different_model_is_refused(tmp_path, text_path):
    out = tmp_path / "run"
    training.train(tiny_config(text_path, out, max_iters=4))
    with pytest.raises(TrainingError, match="model.block_size=8.*16"):
        training.train(tiny_config(text_path, out, resume=True, **{"model.block_size": 16}))


# ------------------------------------------------------------------------------------------ datasets


def test_text_dataset_split_and_tokenizer(text_path):
    ds = data.load_dataset(text_path, 0.9)
    text = text_path.read_text()
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == text
    assert len(ds.train) == int(0.9 * len(text)) and ds.vocab_size == len(set(text))


def test_nanogpt_directory(tmp_path):
    chars = sorted(set("hello world"))
    stoi = {c: i for i, c in enumerate(chars)}
    np.array([stoi[c] for c in "hello world" * 5], np.uint16).tofile(tmp_path / "train.bin")
    np.array([stoi[c] for c in "world hello"], np.uint16).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    ds = data.load_dataset(tmp_path)
    assert isinstance(ds.train, np.memmap) and ds.tokenizer.decode(ds.val) == "world hello"
    (tmp_path / "meta.pkl").unlink()
    assert data.load_dataset(tmp_path).tokenizer is None
    (tmp_path / "val.bin").unlink()
    with pytest.raises(data.DataError, match=r"has no \['val.bin'\]"):
        data.load_dataset(tmp_path)


def test_download_checks_size_and_sha256(tmp_path):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    src = tmp_path / "src.txt"
    src.write_bytes(payload)
    url = src.as_uri()
    dest = tmp_path / "cache" / "input.txt"
    digest = hashlib.sha256(payload).hexdigest()
    with pytest.raises(data.DataError, match="sha256"):
        data.download(url, dest, size=len(payload), sha256="0" * 64)
    with pytest.raises(data.DataError, match="bytes"):
        data.download(url, dest, size=len(payload) + 1, sha256=digest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left behind
    data.download(url, dest, size=len(payload), sha256=digest)
    assert dest.read_bytes() == payload


def test_default_dataset_downloads_into_the_cache_once(tmp_path, monkeypatch, shakespeare_path):
    monkeypatch.delenv("JAXGPT_SHAKESPEARE", raising=False)
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHAKESPEARE_URL", shakespeare_path.as_uri())
    assert data.cache_dir() == tmp_path / "cache"
    path = data.default_text_path()
    assert path.parent.parent == tmp_path / "cache" and path.stat().st_size == data.SHAKESPEARE_BYTES
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "nowhere.txt").as_uri())
    assert data.default_text_path() == path  # cached: no second download


def test_offline_without_a_file_says_which_flag_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXGPT_SHAKESPEARE", raising=False)
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "nowhere.txt").as_uri())
    with pytest.raises(data.DataError, match="set JAXGPT_SHAKESPEARE=/path/to/input.txt .*--config.data.path"):
        data.load_dataset("")


def test_jaxgpt_shakespeare_names_the_default_corpus_everywhere(tmp_path, monkeypatch):
    """One rule for the default corpus: $JAXGPT_SHAKESPEARE first, never a download when it is set."""
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "nowhere.txt").as_uri())
    corpus = tmp_path / "input.txt"
    corpus.write_text("To be, or not to be\n" * 20)
    monkeypatch.setenv("JAXGPT_SHAKESPEARE", str(corpus))
    assert data.default_text_path() == corpus and data.load_dataset("").source == str(corpus)
    monkeypatch.setenv("JAXGPT_SHAKESPEARE", str(tmp_path / "missing.txt"))
    with pytest.raises(data.DataError, match=r"JAXGPT_SHAKESPEARE=.*missing.txt is not a file: point it at"):
        data.load_dataset(None)
    assert not (tmp_path / "cache").exists()
