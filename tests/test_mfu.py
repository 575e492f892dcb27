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
