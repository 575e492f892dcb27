"""The recipe benchmark's exact val loss: every window once, batched, equals one forward over all windows."""

import pathlib
import sys

import numpy as np
from flax import nnx

import jaxgpt
from jaxgpt.model import loss_fn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_recipe  # noqa: E402


def test_exact_loss_covers_every_window_once():
    model = jaxgpt.GPT(jaxgpt.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16),
                       rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, 11, size=8 * 5 + 3)  # 5 whole windows, 2 tokens left over
    x = ids[:40].reshape(5, 8)
    y = ids[1:41].reshape(5, 8)
    expected = float(loss_fn(model(x), y))
    assert abs(bench_recipe.exact_loss(model, ids, 8, batch_size=2) - expected) < 1e-6  # batches of 2, 2, 1
    assert abs(bench_recipe.exact_loss(model, ids[:41], 8) - expected) < 1e-6
