"""MFU: nanoGPT's FLOP formula and the peak-FLOP/s lookup by device kind."""

import types

import jax
import pytest
from flax import nnx

from jaxgpt.mfu import PEAK_BF16_FLOPS, flops_per_token, has_bf16, mfu, peak_flops
from jaxgpt.model import GPT, GPTConfig
from tests.matmul_flops import training_matmul_flops_per_token, vector_params

# device_kind strings as JAX reports them on each chip the table covers.
REPORTED_KINDS = ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3",
                  "NVIDIA H100 PCIe", "NVIDIA H200", "TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5p", "TPU v5",
                  "TPU v6 lite", "TPU v6e"]


def test_every_table_entry_is_found_by_its_own_name():
    """Catches a missing or shadowing pattern: 'H100' must not swallow 'H100 PCIe', nor 'TPU v5' 'TPU v5e'."""
    for name, peak in PEAK_BF16_FLOPS.items():
        assert peak_flops(name) == peak, name
        assert 1e13 < peak < 1e16, name  # dense bf16 peaks of current chips: tens to thousands of TFLOP/s


@pytest.mark.parametrize("kind", REPORTED_KINDS)
def test_a_reported_kind_at_its_peak_throughput_has_mfu_one(kind):
    per_token = flops_per_token(10_000, 2, 4, 8, 16)
    peak = peak_flops(kind)
    assert peak is not None
    assert mfu(peak / per_token, per_token, device_kind=kind) == pytest.approx(1.0)
    assert mfu(peak / per_token, per_token, n_devices=4, device_kind=kind) == pytest.approx(0.25)
    assert peak_flops(kind.lower()) == peak_flops(kind.upper()) == peak  # case does not matter


def test_variants_of_a_chip_share_a_peak_and_the_lite_parts_are_not_the_big_ones():
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3")  # same Hopper die and clocks
    assert peak_flops("NVIDIA H100 PCIe") < peak_flops("NVIDIA H100 80GB HBM3")
    assert peak_flops("TPU v5 lite") == peak_flops("TPU v5e") < peak_flops("TPU v5p") == peak_flops("TPU v5")
    assert peak_flops("TPU v6 lite") == peak_flops("TPU v6e")


def test_unknown_devices_have_no_mfu():
    for kind in ("cpu", "TFRT_CPU_0", "Tesla T4", "NVIDIA GeForce RTX 4090", "TPU v3", ""):
        assert peak_flops(kind) is None, kind
        assert mfu(1e6, 1e9, device_kind=kind) is None


@pytest.mark.parametrize("args", [dict(bias=False), dict(bias=True), dict(bias=False, attention="heads"),
                                  dict(bias=False, scan_layers=True)])
def test_flops_per_token_is_the_training_steps_matmul_count(args):
    """nanoGPT's 6N + 12·L·H·Q·T equals the matmuls of a forward and backward through jaxgpt's GPT.

    The one difference is by design: 6N also counts 6 FLOPs for each LayerNorm gain and bias, which
    are in N but in no matmul.
    """
    config = GPTConfig(block_size=16, vocab_size=29, n_layer=2, n_head=4, n_embd=24, **args)
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))  # shapes are all the count needs
    counted = training_matmul_flops_per_token(model, config.block_size)
    estimate = flops_per_token(model.num_params(), 2, 4, 6, 16)
    assert estimate == counted + 6 * vector_params(model)


def test_gpt2_flops_and_mfu_match_nanogpt():
    # nanoGPT's README: GPT-2 124M, 12 layers, block 1024 -> N = 123.69M non-embedding-position parameters.
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False)
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    n = model.num_params()
    assert n == 123_587_328  # 124,373,760 parameters minus the 1024 x 768 position table
    per_token = flops_per_token(n, 12, 12, 64, 1024)
    assert per_token == training_matmul_flops_per_token(model, 1024) + 6 * vector_params(model)
    # nanoGPT's estimate_mfu: achieved FLOP/s over the peak of all chips.
    tokens_per_s = 12 * 1024 * 40 / 1.0
    expected = tokens_per_s * per_token / peak_flops("A100")
    assert mfu(tokens_per_s, per_token, device_kind="A100") == pytest.approx(expected)
    assert mfu(tokens_per_s, per_token, n_devices=8, device_kind="A100") == pytest.approx(
        mfu(tokens_per_s, per_token, device_kind="A100") / 8
    )


def test_step_mfu_helper_uses_the_models_flops_and_all_devices():
    from jaxgpt import config as config_lib
    from jaxgpt.mfu import model_flops_per_token, step_mfu

    c = config_lib.base_config()
    c.model.update(n_layer=2, n_head=4, n_embd=32, block_size=16)
    n = config_lib.model_shape(c, 50).num_params()
    per_token = flops_per_token(n, 2, 4, 8, 16)
    assert model_flops_per_token(c.model, n) == per_token
    assert step_mfu(c.model, n, 8, device_kind="TPU v4")(1e5) == pytest.approx(1e5 * per_token / (275e12 * 8))
    assert step_mfu(c.model, n, 8, device_kind="cpu")(1e5) is None
    assert step_mfu(c.model, n, 1)(1e5) is None  # these tests run on CPU: no peak, no MFU
    c.model.name = "bigram"  # no attention: 6N alone
    bigram = config_lib.model_shape(c, 50)
    assert bigram.num_params() == 50 * 50
    assert model_flops_per_token(c.model, bigram.num_params()) == 6 * 50 * 50


def test_mfu_is_logged_per_step_and_shown_on_the_bar(tmp_path, shakespeare_path, monkeypatch, capsys):
    """With a known chip (a pretend 1 GFLOP/s one here), every step record carries nanoGPT's MFU."""
    import json

    from jaxgpt import config as config_lib
    from jaxgpt import data, training
    from jaxgpt import mfu as mfu_lib
    from tests.test_training import tiny_config, tiny_text

    monkeypatch.setattr(mfu_lib, "peak_flops", lambda device_kind=None: 1e9)
    out, text = tmp_path / "run", tiny_text(tmp_path, shakespeare_path)
    c = tiny_config(text, out, max_iters=4, plot=False, progress=True, compile_cache=False)
    training.train(c)
    vocab_size = data.load_dataset(text).vocab_size
    n = config_lib.model_shape(c, vocab_size).num_params()
    m = c.model
    per_token = flops_per_token(n, m.n_layer, m.n_head, m.n_embd // m.n_head, m.block_size)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9)
    assert "mfu=" in capsys.readouterr().err


@pytest.mark.parametrize("platform, capability, bf16", [
    ("tpu", None, True), ("gpu", "7.5", False), ("gpu", "7.0", False), ("gpu", "8.0", True), ("gpu", "9.0", True),
    ("gpu", "gfx90a", False), ("cpu", None, False),
])
def test_bf16_only_where_the_hardware_has_it(platform, capability, bf16):
    """The Colab notebook computes in bf16 on a TPU or an A100 / L4 / H100, not on a T4 (7.5) or a CPU."""
    device = types.SimpleNamespace(platform=platform, compute_capability=capability)
    assert has_bf16(device) is bf16
    assert has_bf16(jax.devices("cpu")[0]) is False  # a real device, its attributes as JAX gives them
