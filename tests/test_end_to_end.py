"""The commands together: sample.py on a checkpoint that training wrote, and init_from a nanoGPT checkpoint."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import jaxgpt
import sample
from jaxgpt import checkpoint, training
from jaxgpt.config import ConfigError
from jaxgpt.layout import variable_value
from tests.test_training import tiny_config, tiny_text

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params(model: nnx.Module) -> dict:
    return {path: np.asarray(variable_value(v)) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow  # a Python subprocess
def test_sample_cli_streams_what_the_trained_model_generates(tmp_path, shakespeare_path):
    text = tiny_text(tmp_path, shakespeare_path)
    out = tmp_path / "run"
    training.train(tiny_config(text, out))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2",
           "--max_new_tokens=24", "--seed=7", "--top_k=10", "--which=latest"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok, _ = checkpoint.load_model(out, "latest")
    keys = jax.random.split(jax.random.key(7), 2)
    expected = [tok.decode(jaxgpt.generate(model, tok.encode("ROMEO:")[None], 24, key=k, temperature=0.8,
                                           top_k=10)[0]) for k in keys]
    assert r.stdout.split("\n---------------\n")[:2] == expected


def test_sample_cli_names_a_missing_checkpoint(tmp_path):
    err = io.StringIO()
    assert sample.main([f"--out_dir={tmp_path / 'nothing'}"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and str(tmp_path / "nothing") in err.getvalue()
    err = io.StringIO()
    assert sample.main([f"--init_from=nanogpt:{tmp_path / 'nothing'}"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and "nothing" in err.getvalue()


@pytest.fixture
def nanogpt_run(tmp_path, shakespeare_path):
    """A nanoGPT out_dir (ckpt.pt + the char meta.pkl of the tiny text) and that text."""
    text = tiny_text(tmp_path, shakespeare_path)
    chars = sorted(set(text.read_text(encoding="utf-8")))
    config = jaxgpt.GPTConfig(vocab_size=len(chars), block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = jaxgpt.GPT(config, rngs=nnx.Rngs(3))
    run = tmp_path / "nanogpt-out"
    jaxgpt.save_nanogpt_checkpoint(model, run / "ckpt.pt", iter_num=100, config={"dataset": "tiny"})
    with open(run / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return run, text, model


def test_train_init_from_a_nanogpt_checkpoint_starts_from_its_weights(tmp_path, nanogpt_run):
    run, text, source = nanogpt_run
    out = tmp_path / "finetune"
    # The config asks for another architecture: init_from's checkpoint decides it.
    config = tiny_config(text, out, init_from=f"nanogpt:{run}", max_iters=2, learning_rate=1e-9, min_lr=1e-10,
                         **{"model.n_embd": 32, "model.block_size": 16, "model.dropout": 0.0})
    training.train(config)
    model, tok, info = checkpoint.load_model(out, "latest")
    assert info["step"] == 2 and info["config"]["model"]["n_embd"] == 16
    assert info["config"]["model"]["block_size"] == 8  # batches of the checkpoint's context, not the config's
    assert tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
    got, want = _params(model), _params(source)
    assert got.keys() == want.keys()
    for name in want:  # two steps at lr 1e-9 move nothing measurable: the weights are the checkpoint's
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=str(name))
    # ...and the run resumes with the checkpoint's architecture, not the config file's.
    training.train(tiny_config(text, out, init_from=f"nanogpt:{run}", max_iters=4, resume=True,
                               **{"model.dropout": 0.0}))
    assert checkpoint.load_model(out, "latest")[2]["step"] == 4


def test_init_from_refuses_a_dataset_with_another_vocabulary(tmp_path, nanogpt_run):
    run, _, _ = nanogpt_run
    other = tmp_path / "other.txt"
    other.write_text("zyx wvu " * 200, encoding="utf-8")
    with pytest.raises(ConfigError, match="another tokenizer"):
        training.train(tiny_config(other, tmp_path / "o", init_from=f"nanogpt:{run}"))
    with pytest.raises(ConfigError, match="init_from"):
        training.train(tiny_config(other, tmp_path / "o", init_from="nanogpt:/no/such/run"))
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_sample_cli_init_from_a_nanogpt_checkpoint(nanogpt_run):
    run, _, model = nanogpt_run
    out, err = io.StringIO(), io.StringIO()
    code = sample.main([f"--init_from=nanogpt:{run}", "--start=First", "--num_samples=1", "--max_new_tokens=12",
                        "--seed=5", "--temperature=0"], out=out, err=err)
    assert code == 0, err.getvalue()
    tok = jaxgpt.load_tokenizer(str(run / "meta.pkl"))
    expected = tok.decode(jaxgpt.generate(model, tok.encode("First")[None], 12, key=jax.random.key(0),
                                          temperature=0)[0])
    assert out.getvalue().split("\n---------------\n")[0] == expected
