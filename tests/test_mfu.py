"""MFU: nanoGPT's FLOP formula and the peak-FLOP/s lookup by device kind."""

import pytest
from flax import nnx

from jaxgpt.mfu import PEAK_BF16_FLOPS, flops_per_token, mfu, peak_flops
from jaxgpt.model import GPT, GPTConfig


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
    ],
)
def test_peak_lookup(kind, peak):
    assert peak_flops(kind) == peak


def test_unknown_devices_have_no_mfu():
    assert peak_flops("cpu") is None
    assert peak_flops("Tesla T4") is None
    assert mfu(1e6, 1e9, device_kind="cpu") is None
    assert set(PEAK_BF16_FLOPS) >= {"A100", "H100 SXM", "H200", "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"}


def test_gpt2_flops_and_mfu_match_nanogpt():
    # nanoGPT's README: GPT-2 124M, 12 layers, block 1024 -> N = 123.69M non-embedding-position parameters.
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False)
    n = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))).num_params()
    assert n == 123_587_328  # 124,373,760 parameters minus the 1024 x 768 position table
    per_token = flops_per_token(n, 12, 12, 64, 1024)
    assert per_token == 6 * n + 12 * 12 * 12 * 64 * 1024
    # nanoGPT's estimate_mfu: achieved FLOP/s over the peak of all chips.
    tokens_per_s = 12 * 1024 * 40 / 1.0
    assert mfu(tokens_per_s, per_token, device_kind="A100") == pytest.approx(tokens_per_s * per_token / 312e12)
    assert mfu(tokens_per_s, per_token, n_devices=8, device_kind="A100") == pytest.approx(
        mfu(tokens_per_s, per_token, device_kind="A100") / 8
    )


def test_step_mfu_helper_uses_the_models_flops_and_all_devices():
    from jaxgpt import config as config_lib
    from jaxgpt.training import step_mfu

    c = config_lib.base_config()
    c.model.update(n_layer=2, n_head=4, n_embd=32, block_size=16)
    model = nnx.eval_shape(lambda: config_lib.build_model(c, 50, nnx.Rngs(0)))
    per_token = flops_per_token(model.num_params(), 2, 4, 8, 16)
    assert step_mfu(c, model, 8, device_kind="TPU v4")(1e5) == pytest.approx(1e5 * per_token / (275e12 * 8))
    assert step_mfu(c, model, 8, device_kind="cpu")(1e5) is None
    assert step_mfu(c, model, 1)(1e5) is None  # these tests run on CPU: no peak, no MFU


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
    n = nnx.eval_shape(lambda: config_lib.build_model(c, vocab_size, nnx.Rngs(0))).num_params()
    m = c.model
    per_token = flops_per_token(n, m.n_layer, m.n_head, m.n_embd // m.n_head, m.block_size)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9)
    assert "mfu=" in capsys.readouterr().err
