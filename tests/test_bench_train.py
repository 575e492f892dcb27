"""The training benchmark's bookkeeping: its FLOP count and the RESULTS.md block it rewrites."""

import pathlib
import sys

import pytest
from flax import nnx

import jaxgpt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402


@pytest.mark.parametrize("name", sorted(bench_train.SHAPES))
def test_flops_per_token_uses_the_models_parameter_count(name):
    shape = bench_train.SHAPES[name]
    config = jaxgpt.GPTConfig(**shape.model_args())
    n = nnx.eval_shape(lambda: jaxgpt.GPT(config, rngs=nnx.Rngs(0))).num_params()
    attention = 12 * shape.n_layer * shape.block_size * shape.n_embd
    assert bench_train.flops_per_token(shape) == 6 * n + attention


def test_write_results_replaces_only_its_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    bench_train.write_results(path, "first table")
    path.write_text(path.read_text() + "\n### Log\nkept\n")
    bench_train.write_results(path, "second table")
    text = path.read_text()
    assert "second table" in text and "first table" not in text
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("### Log\nkept")
