"""Choices of how to compute follow the devices a program is compiled for, not the host (jaxgpt.target)."""

import jax
import jax.numpy as jnp
import pytest

from jaxgpt import attention, target


def test_platform_is_the_hosts_outside_compiling_for():
    assert target.platform() == jax.default_backend()
    with target.compiling_for("tpu"):
        assert target.platform() == "tpu"
        with target.compiling_for(jax.devices()):
            assert target.platform() == "cpu"
        assert target.platform() == "tpu"
    assert target.platform() == jax.default_backend()


@pytest.mark.parametrize("platform,dtype,expected", [
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, "xla"),
    ("tpu", jnp.bfloat16, "xla"), ("cpu", jnp.bfloat16, "xla"),
])
def test_auto_attention_picks_by_the_compile_target(monkeypatch, platform, dtype, expected):
    picked = []

    def fake(q, k, v, *, is_causal, implementation):
        picked.append(implementation)
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q = jnp.zeros((1, 2, 4, 8), dtype)
    with target.compiling_for(platform):
        attention.dot_product_attention(q, q, q, impl="auto")
    assert picked == [expected]


@pytest.mark.parametrize("platform", ["gpu", "tpu", "cpu"])
def test_auto_attention_keeps_attention_dropout(monkeypatch, platform):
    """No fused kernel has nanoGPT's dropout on the weights: while it is active, every platform takes the ladder."""
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: pytest.fail("a fused kernel was taken"))
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 128, 8), jnp.bfloat16)
    with target.compiling_for(platform):
        y = attention.dot_product_attention(q, q, q, impl="auto", dropout_rate=0.5, key=jax.random.PRNGKey(1))
    expected = attention.attention(q, q, q, dropout_rate=0.5, key=jax.random.PRNGKey(1))
    assert jnp.array_equal(y, expected)


def test_cudnn_outside_a_gpu_program_says_so():
    q = jnp.zeros((1, 2, 4, 8), jnp.bfloat16)
    with target.compiling_for("tpu"), pytest.raises(ValueError, match="runs on 'tpu'"):
        attention.dot_product_attention(q, q, q, impl="cudnn")


@pytest.mark.parametrize("dtype,T,flash", [(jnp.bfloat16, 128, True), (jnp.bfloat16, 64, False),
                                           (jnp.float32, 128, False)])
def test_auto_attention_on_a_tpu_takes_pallas_flash_in_16_bit_blocks(monkeypatch, dtype, T, flash):
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    taken = []
    monkeypatch.setattr(pallas_flash, "flash_attention", lambda q, k, v, **kwargs: taken.append(q.shape) or q)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, **k: q)
    q = jnp.zeros((1, 2, T, 8), dtype)
    with target.compiling_for("tpu"):
        attention.dot_product_attention(q, q, q, impl="auto")
    assert bool(taken) == flash
