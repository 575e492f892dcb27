"""The TPU's fused attention kernels (`jaxgpt.flash_dropout_tpu`): run by Pallas's interpreter on a CPU, compiled
by Mosaic on a TPU, and compiled for a TPU v5e on this CPU by the environment's own libtpu (CI's second environment:
Colab's TPU stack).

The kernels are what a TPU program runs for its attention (`attention.dot_product_attention`);
`tests/test_bench_targets.py` checks that the TPU programs compile to them. `tests/test_flash_dropout.py` checks the
contract both kernels keep (the attention written out with the same mask, so the same weights are dropped on both, at
head sizes 64, 32 and 128: two heads to a 128-lane group, four, one); here: the gradients, the batch split, the shapes
taken, the compile."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import flash_dropout, flash_dropout_tpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import targets  # noqa: E402

B, T = 2, 256  # two 128-row blocks: the diagonal block and the one below it
INTERPRET = jax.default_backend() != "tpu"


def _qkv(seed: int = 0, H: int = 4, D: int = 64, dtype=jnp.float32):
    """q, k, v as (B, T, H, D): the GPU kernels' layout, and the heads side by side after a reshape."""
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (B, T, H, D), dtype) for k in keys)


def _flash(q_BTHD, k_BTHD, v_BTHD, rate, key, **kw):
    """The TPU kernels on (B, T, H, D) arrays, through the model's (B, T, C) layout."""
    B_, T_, H, D = q_BTHD.shape
    to_btc = lambda t: t.reshape(t.shape[0], T_, H * D)  # noqa: E731
    y = flash_dropout_tpu.attention(to_btc(q_BTHD), to_btc(k_BTHD), to_btc(v_BTHD), n_head=H, rate=rate, key=key,
                                    interpret=INTERPRET, **kw)
    return y.reshape(q_BTHD.shape)


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_gradients_equal_the_written_out_attentions(rate):
    """The backward kernel recomputes the scores and the mask, transposed; its dq, dk, dv equal autodiff of the
    reference, head by head (a lane group's two heads do not leak into each other)."""
    q, k, v = _qkv(2)
    key = jax.random.key(3)
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, rate=rate, key=key) * weights)

    with jax.default_matmul_precision("highest"):
        got = jax.grad(loss(lambda *a, **kw: _flash(*a, kw["rate"], kw["key"])), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss(flash_dropout.reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    # Causality through the gradient: query 130 (in the second block) does not depend on any later key.
    dk_130 = jax.grad(lambda k: jnp.sum(_flash(q, k, v, rate, key)[:, 130]))(k)
    assert float(jnp.abs(dk_130[:, 131:]).max()) == 0.0
    assert float(jnp.abs(dk_130[:, :131]).max()) > 0.0


def test_a_shard_of_the_batch_draws_the_masks_of_one_device():
    """`first_row`: the shard's first row's place in the whole batch. (bf16, and the mask's dependence on the key: the
    contract both kernels keep, `tests/test_flash_dropout.py`.)"""
    q, k, v = _qkv(6)
    whole = _flash(q, k, v, 0.2, jax.random.key(1))
    halves = [_flash(q[i:i + 1], k[i:i + 1], v[i:i + 1], 0.2, jax.random.key(1), first_row=i) for i in range(B)]
    np.testing.assert_array_equal(jnp.concatenate(halves), whole)
    assert not np.array_equal(halves[1], _flash(q[1:], k[1:], v[1:], 0.2, jax.random.key(1)))  # row 1 is not row 0


def test_shapes_the_kernels_take():
    q = jnp.zeros((1, 256, 384), jnp.bfloat16)
    assert flash_dropout_tpu.fits(q, q, 6)  # 64-wide heads, two to a lane group
    assert flash_dropout_tpu.fits(q, q, 3)  # 128-wide heads
    assert not flash_dropout_tpu.fits(q, q, 8)  # 48-wide heads do not tile 128 lanes
    assert not flash_dropout_tpu.fits(q[:, :192], q[:, :192], 6)  # not whole 128-row blocks
    assert not flash_dropout_tpu.fits(jnp.zeros((1, 256, 320)), jnp.zeros((1, 256, 320)), 5)  # not whole groups
    assert not flash_dropout_tpu.fits(q.astype(jnp.int32), q.astype(jnp.int32), 6)
    long = jax.ShapeDtypeStruct((1, 4096, 384), jnp.bfloat16)  # its backward pass would not fit the fast memory
    assert flash_dropout_tpu.fits(long, long, 6) is False
    assert flash_dropout_tpu.backward_vmem_bytes(4096, jnp.bfloat16) > flash_dropout_tpu.VMEM_BUDGET
    with pytest.raises(ValueError, match="dropout rate"):
        flash_dropout_tpu.attention(q, q, q, n_head=6, rate=1.0, key=jax.random.key(0))


COMPILE = """
import json
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from jaxgpt import flash_dropout_tpu

chip = topologies.get_topology_desc(topology_name="v5e:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1)).devices[0]
on_chip = SingleDeviceSharding(chip)
kernels = {}
for dtype in ("bfloat16", "float32"):
    for rate in (0.0, 0.2):
        x = jax.ShapeDtypeStruct((2, 256, 384), jnp.dtype(dtype), sharding=on_chip)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=on_chip)

        def loss(q, k, v, key_data, rate=rate):
            y = flash_dropout_tpu.attention(q, k, v, n_head=6, rate=rate, key=jax.random.wrap_key_data(key_data))
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, key).lower().compile().as_text()
        kernels[f"{dtype} {rate}"] = text.count('custom_call_target="tpu_custom_call"')
print(json.dumps({"jax": jax.__version__, "kernels": kernels}))
"""


def test_the_kernels_compile_for_a_tpu_v5e_with_this_jax():
    """Mosaic, in the libtpu that matches the installed jax (`bench_targets.py --install`), compiles the forward and
    the backward kernel in both precisions, with dropout and without: 64-wide heads, 6 to a 384-wide model."""
    packages = os.environ.get("JAXGPT_TARGETS_PACKAGES", str(ROOT / ".targets"))
    run = subprocess.run([sys.executable, "-c", COMPILE], env=targets.compile_env(packages), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["jax"] == jax.__version__
    assert result["kernels"] == {f"{d} {r}": 2 for d in ("bfloat16", "float32") for r in (0.0, 0.2)}
