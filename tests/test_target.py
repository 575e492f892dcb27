"""Choices of how to compute follow the devices a program is compiled for, not the host (jaxgpt.target)."""

import types

import jax
import jax.numpy as jnp
import pytest

from jaxgpt import attention, flash_dropout, flash_dropout_tpu, target


def gpu(capability: str) -> list:
    """A stand-in for one NVIDIA device as `jax.devices()` or a compile-only topology lists it."""
    return [types.SimpleNamespace(platform="cuda", compute_capability=capability)]


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


def test_gpu_compute_capability_comes_from_the_devices_compiled_for():
    assert target.gpu_compute_capability() is None  # this host: a CPU
    with target.compiling_for(gpu("9.0")):
        assert (target.platform(), target.gpu_compute_capability()) == ("gpu", (9, 0))
        with target.compiling_for("gpu"):
            assert target.gpu_compute_capability() is None  # a platform name says no more
        with target.compiling_for(gpu("7.5") + gpu("8.6")):
            assert target.gpu_compute_capability() == (7, 5)  # the oldest decides
    with target.compiling_for("tpu"):
        assert target.gpu_compute_capability() is None


@pytest.mark.parametrize("devices", [gpu("7.5"), "gpu", "tpu", "cpu"])
def test_auto_attention_keeps_attention_dropout(monkeypatch, devices):
    """Where jaxgpt's fused dropout kernels do not compile (a T4, an unknown GPU), do not fit (16-wide heads, 32
    channels: not a TPU's 128 lanes) or do not exist (a CPU), attention dropout takes the ladder: cuDNN's, XLA's and
    JAX's Pallas kernels have no dropout on the weights."""
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: pytest.fail("a fused kernel was taken"))
    monkeypatch.setattr(flash_dropout, "attention", lambda *a, **k: pytest.fail("flash_dropout was taken"))
    monkeypatch.setattr(flash_dropout_tpu, "attention", lambda *a, **k: pytest.fail("flash_dropout_tpu was taken"))
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 128, 16), jnp.bfloat16)
    with target.compiling_for(devices):
        y = attention.dot_product_attention(q, q, q, impl="auto", dropout_rate=0.5, key=jax.random.PRNGKey(1))
    expected = attention.attention(q, q, q, dropout_rate=0.5, key=jax.random.PRNGKey(1))
    assert jnp.array_equal(y, expected)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("impl,fused", [("auto", True), ("xla", False), ("reference", False)])
def test_auto_attention_with_dropout_on_an_ampere_or_newer_gpu_takes_flash_dropout(monkeypatch, dtype, impl, fused):
    taken = []
    monkeypatch.setattr(flash_dropout, "attention",
                        lambda q, k, v, *, rate, key, first_row: taken.append((q.shape, rate)) or q)
    q_BHTD = jnp.zeros((1, 2, 128, 16), dtype)
    with target.compiling_for(gpu("8.0")):
        y = attention.dot_product_attention(q_BHTD, q_BHTD, q_BHTD, impl=impl, dropout_rate=0.2,
                                            key=jax.random.PRNGKey(1))
    assert taken == ([((1, 128, 2, 16), 0.2)] if fused else [])  # the kernels read (B, T, H, D)
    assert y.shape == q_BHTD.shape


def test_cudnn_outside_a_gpu_program_says_so():
    q = jnp.zeros((1, 2, 4, 8), jnp.bfloat16)
    with target.compiling_for("tpu"), pytest.raises(ValueError, match="runs on 'tpu'"):
        attention.dot_product_attention(q, q, q, impl="cudnn")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("impl,rate,fused", [("auto", 0.0, True), ("auto", 0.2, True), ("xla", 0.0, False),
                                             ("reference", 0.2, False)])
def test_auto_attention_on_a_tpu_takes_flash_dropout_tpu(monkeypatch, dtype, impl, rate, fused):
    """With dropout and without, in both precisions: the heads side by side, (B, T, C), 64-wide heads two to a lane
    group of 128."""
    taken = []
    monkeypatch.setattr(flash_dropout_tpu, "attention",
                        lambda q, k, v, *, n_head, rate, key, first_row: taken.append((q.shape, n_head, rate)) or q)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, **k: q)
    q_BHTD = jnp.zeros((1, 2, 128, 64), dtype)
    with target.compiling_for("tpu"):
        y = attention.dot_product_attention(q_BHTD, q_BHTD, q_BHTD, impl=impl, dropout_rate=rate,
                                            key=jax.random.PRNGKey(1))
    assert taken == ([((1, 128, 128), 2, rate)] if fused else [])
    assert y.shape == q_BHTD.shape


@pytest.mark.parametrize("dtype,T,flash", [(jnp.bfloat16, 128, True), (jnp.bfloat16, 64, False),
                                           (jnp.float32, 128, False)])
def test_auto_attention_on_a_tpu_takes_pallas_flash_for_the_heads_flash_dropout_tpu_does_not(monkeypatch, dtype, T,
                                                                                              flash):
    """8-wide heads, 16 channels: not whole 128-lane groups. JAX's Pallas kernel takes them in 16-bit and whole
    128-token blocks."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    taken = []
    monkeypatch.setattr(pallas_flash, "flash_attention", lambda q, k, v, **kwargs: taken.append(q.shape) or q)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, **k: q)
    q = jnp.zeros((1, 2, T, 8), dtype)
    with target.compiling_for("tpu"):
        attention.dot_product_attention(q, q, q, impl="auto")
    assert bool(taken) == flash
