"""The fused dropout attention kernels (`jaxgpt.flash_dropout`): run by Pallas's interpreter on a CPU, compiled by
Triton on a GPU (`benchmarks/gpu_check.sh` runs this file there). The contract tests run the TPU's kernels too
(`jaxgpt.flash_dropout_tpu`, more in `tests/test_flash_dropout_tpu.py`).

The kernels are what a GPU program with attention dropout runs (`attention.dot_product_attention`);
`tests/test_bench_targets.py` checks that the GPU program compiles to them. Here: their numbers against the
attention written out with the same mask and their gradients (the mask's distribution: `tests/test_dropout.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import attention as attention_lib
from jaxgpt import flash_dropout
from tests import test_flash_dropout_tpu as tpu_kernels
from tests.test_sharding import run_with_devices

B, T, H, D = 2, 128, 2, 32
INTERPRET = jax.default_backend() != "gpu"


def _qkv(seed: int = 0, dtype=jnp.float32, shape=(B, T, H, D)):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, shape, dtype) for k in keys)


def _flash(q, k, v, rate, key, **kw):
    return flash_dropout.attention(q, k, v, rate=rate, key=key, interpret=INTERPRET, **kw)


# The contract both fused kernels keep, on (B, T, H, D) arrays: the GPU's here, the TPU's (`flash_dropout_tpu`) in
# tpu_kernels, each at shapes its blocks take.
KERNELS = {"gpu": (_flash, (B, T, H, D)), "tpu": (tpu_kernels._flash, (tpu_kernels.B, tpu_kernels.T, 4, 64))}


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("kernel,head_size", [("gpu", D), ("tpu", 64), ("tpu", 32), ("tpu", 128)])
def test_kernels_give_the_attention_written_out_with_the_same_mask(rate, kernel, head_size):
    """The TPU's at three head sizes: 64 and 32 share a 128-lane group (two heads, four), 128 fills one."""
    flash, (b, t, h, d) = KERNELS[kernel]
    q, k, v = _qkv(shape=(b, t, h * d // head_size, head_size))
    key = jax.random.key(7)
    with jax.default_matmul_precision("highest"):
        y = flash(q, k, v, rate, key)
        want = flash_dropout.reference(q, k, v, rate=rate, key=key)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_without_dropout_it_is_the_lectures_causal_attention(kernel):
    flash, shape = KERNELS[kernel]
    q, k, v = _qkv(1, shape=shape)
    to_bhtd = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        y = flash(q, k, v, 0.0, jax.random.key(0))
        want = attention_lib.attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), causal=True)
    np.testing.assert_allclose(to_bhtd(y), want, atol=2e-5, rtol=1e-5)


def test_gradients_equal_the_written_out_attentions():
    """The backward kernels recompute the scores and the mask; their dq, dk, dv equal autodiff of the reference."""
    q, k, v = _qkv(2)
    key = jax.random.key(3)
    weights = jnp.cos(jnp.arange(B * T * H * D, dtype=jnp.float32)).reshape(B, T, H, D)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, rate=0.2, key=key) * weights)

    with jax.default_matmul_precision("highest"):
        got = jax.grad(loss(lambda *a, **kw: _flash(*a, kw["rate"], kw["key"])), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss(flash_dropout.reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    # Causality through the gradient: the first query's output does not depend on any later key or value.
    dk_first = jax.grad(lambda k: jnp.sum(_flash(q, k, v, 0.2, key)[:, 0]))(k)
    assert float(jnp.abs(dk_first[:, 1:]).max()) == 0.0
    assert float(jnp.abs(dk_first[:, 0]).max()) > 0.0


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_inputs_stay_close_to_float32(kernel):
    flash, shape = KERNELS[kernel]
    q, k, v = _qkv(4, shape=shape)
    key = jax.random.key(5)
    y16 = flash(*(t.astype(jnp.bfloat16) for t in (q, k, v)), 0.2, key)
    assert y16.dtype == jnp.bfloat16
    with jax.default_matmul_precision("highest"):
        y32 = flash_dropout.reference(q, k, v, rate=0.2, key=key)
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_mask_is_a_function_of_the_key_and_differs_between_keys(kernel):
    flash, shape = KERNELS[kernel]
    q, k, v = _qkv(6, shape=shape)
    a = flash(q, k, v, 0.2, jax.random.key(1))
    assert np.array_equal(a, flash(q, k, v, 0.2, jax.random.key(1)))
    assert not np.allclose(a, flash(q, k, v, 0.2, jax.random.key(2)))


def test_a_batch_split_over_devices_draws_the_masks_of_one_device():
    """`first_row` places a shard's rows in the whole batch; `attention.per_batch_shard` runs the kernels per shard
    of a batch split over a mesh (2 CPU devices here) and gives what one device gives."""
    q, k, v = _qkv(8)
    key = jax.random.key(9)
    whole = _flash(q, k, v, 0.2, key)
    halves = [_flash(q[i:i + 1], k[i:i + 1], v[i:i + 1], 0.2, key, first_row=i) for i in range(B)]
    np.testing.assert_array_equal(jnp.concatenate(halves), whole)
    assert not np.array_equal(halves[1], _flash(q[1:], k[1:], v[1:], 0.2, key))  # row 1 is not row 0 again

    result = run_with_devices("""
        import json
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from jaxgpt import attention, flash_dropout, sharding

        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(x, (4, 64, 2, 16)) for x in keys)
        def split_over_the_mesh(q, k, v, key):  # the key traced, as a training step's is
            flash = lambda q, k, v, first_row: flash_dropout.attention(q, k, v, rate=0.2, key=key,
                                                                        first_row=first_row, interpret=True)
            return attention.per_batch_shard(flash, q, k, v)

        one = flash_dropout.attention(q, k, v, rate=0.2, key=jax.random.key(1), interpret=True)
        mesh = sharding.make_mesh(2, 1)
        put = lambda t: jax.device_put(t, NamedSharding(mesh, PartitionSpec("data")))
        split = jax.jit(split_over_the_mesh)(put(q), put(k), put(v), jax.random.key(1))
        print(json.dumps({"equal": bool(np.array_equal(np.asarray(split), np.asarray(one))),
                          "shards": len(split.sharding.device_set)}))
    """, n=2)
    assert result == {"equal": True, "shards": 2}


def test_shapes_the_kernels_take():
    q = jnp.zeros((1, 256, 6, 64), jnp.bfloat16)
    assert flash_dropout.fits(q, q)
    assert not flash_dropout.fits(q[:, :100], q[:, :100])  # not whole 64-row blocks
    assert not flash_dropout.fits(jnp.zeros((1, 256, 6, 48)), jnp.zeros((1, 256, 6, 48)))  # Triton: power of two
    assert not flash_dropout.fits(q.astype(jnp.int32), q.astype(jnp.int32))
    with pytest.raises(ValueError, match="dropout rate"):
        flash_dropout.attention(q, q, q, rate=1.0, key=jax.random.key(0))
