"""The training benchmark's bookkeeping: its FLOP count, its shapes' attention and the RESULTS.md block it rewrites."""

import pathlib
import sys

import pytest
from flax import nnx

import jaxgpt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402
import common  # noqa: E402

from tests.matmul_flops import training_matmul_flops_per_token, vector_params  # noqa: E402


@pytest.mark.parametrize("name", sorted(bench_train.SHAPES))
def test_flops_per_token_is_the_models_matmul_count(name):
    """The GFLOP/s column's count equals the matmuls of the benchmarked model's training step.

    nanoGPT's 6N also counts 6 FLOPs per LayerNorm gain, which is in N but in no matmul.
    """
    shape = bench_train.SHAPES[name].shape
    model = nnx.eval_shape(lambda: jaxgpt.GPT(jaxgpt.GPTConfig(**shape.model_args(65)), rngs=nnx.Rngs(0)))
    counted = training_matmul_flops_per_token(model, shape.block_size)
    assert common.flops_per_token(shape, 65) == counted + 6 * vector_params(model)


@pytest.mark.parametrize("name", sorted(bench_train.SHAPES))
def test_each_shape_times_the_attention_its_config_runs(name):
    """The jax rows time what train.py would run for this shape's config in configs/."""
    from jaxgpt import config as config_lib

    config = config_lib.load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py")
    assert bench_train.SHAPES[name].attention_impl == config.model.attention_impl


def test_write_results_replaces_only_its_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    bench_train.write_results(path, "first table")
    path.write_text(path.read_text() + "\n### Log\nkept\n")
    bench_train.write_results(path, "second table")
    text = path.read_text()
    assert "second table" in text and "first table" not in text
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("### Log\nkept")
