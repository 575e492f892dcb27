"""nanoGPT's N(0, std²) initialiser, and a model's weights drawn in one draw."""

from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.initializers import build_drawing_once, normal
from jaxgpt.model import GPT, GPTConfig

CONFIG = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256, bias=True)


def _gpt(rngs: nnx.Rngs) -> GPT:
    return GPT(CONFIG, rngs=rngs)


def _leaves(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_called_plainly_it_is_flax_normal(dtype):
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(normal(0.02)(key, (7, 5), dtype), nnx.initializers.normal(0.02)(key, (7, 5), dtype))
    assert normal(0.02)(key, (7, 5), dtype).dtype == dtype


class _Three(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(3, 4, kernel_init=normal(0.5), rngs=rngs)  # bias: zeros, not from the draw
        self.b = nnx.Embed(5, 2, embedding_init=normal(2.0), rngs=rngs)
        self.c = nnx.LayerNorm(6, rngs=rngs)
        self.d = nnx.Linear(2, 3, kernel_init=normal(0.1), use_bias=False, rngs=rngs)


def test_the_normals_are_consecutive_slices_of_one_draw_in_the_order_they_are_made():
    key = jax.random.PRNGKey(7)
    m = build_drawing_once(_Three, key)
    z = np.asarray(jax.random.normal(key, (12 + 10 + 6,), jnp.float32))
    np.testing.assert_allclose(m.a.kernel[...], 0.5 * z[:12].reshape(3, 4), rtol=1e-6)
    np.testing.assert_allclose(m.b.embedding[...], 2.0 * z[12:22].reshape(5, 2), rtol=1e-6)
    np.testing.assert_allclose(m.d.kernel[...], 0.1 * z[22:].reshape(2, 3), rtol=1e-6)
    np.testing.assert_array_equal(m.a.bias[...], 0.0)
    np.testing.assert_array_equal(m.c.scale[...], 1.0)


def test_a_gpt_drawn_once_has_nanogpt_init_statistics_and_the_plain_structure():
    model = build_drawing_once(_gpt, jax.random.PRNGKey(0))
    assert nnx.graphdef(model) == nnx.graphdef(_gpt(nnx.Rngs(0)))
    assert abs(float(jnp.std(model.wte.embedding[...])) - 0.02) < 1e-3
    assert abs(float(jnp.std(model.wpe.embedding[...])) - 0.02) < 1e-3
    residual_std = 0.02 / math.sqrt(2 * CONFIG.n_layer)
    for block in model.h:
        assert abs(float(jnp.std(block.attn.c_attn.kernel[...])) - 0.02) < 1e-3
        assert abs(float(jnp.std(block.mlp.c_fc.kernel[...])) - 0.02) < 1e-3
        assert abs(float(jnp.std(block.attn.c_proj.kernel[...])) - residual_std) < 1e-3
        assert abs(float(jnp.std(block.mlp.c_proj.kernel[...])) - residual_std) < 1e-3
        assert abs(float(jnp.mean(block.mlp.c_fc.kernel[...]))) < 1e-3
        np.testing.assert_array_equal(block.mlp.c_fc.bias[...], 0.0)
        np.testing.assert_array_equal(block.ln_1.scale[...], 1.0)
    # No two parameters share values: each took its own slice.
    kernels = [block.attn.c_proj.kernel[...].ravel() for block in model.h]
    assert max(abs(float(np.corrcoef(kernels[0], k)[0, 1])) for k in kernels[1:]) < 0.05


def test_the_same_key_gives_the_same_weights_and_another_key_others():
    a, b = (_leaves(build_drawing_once(_gpt, jax.random.PRNGKey(s))) for s in (0, 0))
    c = _leaves(build_drawing_once(_gpt, jax.random.PRNGKey(1)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[-1], c[-1])


def _count(jaxpr: jax.extend.core.Jaxpr, name: str) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for value in eqn.params.values():  # its jaxprs (jax 0.7 has no jax.extend.core.jaxprs_in_params)
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count(sub, name)
    return n


def test_a_gpt_is_drawn_by_one_random_draw():
    """The point of it: XLA's CPU compiler spends 0.1-0.2 s on each draw in a program."""
    once = jax.make_jaxpr(lambda k: nnx.state(build_drawing_once(_gpt, k)))(jax.random.PRNGKey(0))
    plain = jax.make_jaxpr(lambda k: nnx.state(_gpt(nnx.Rngs(k))))(jax.random.PRNGKey(0))
    assert _count(once.jaxpr, "random_bits") == 1
    assert _count(plain.jaxpr, "random_bits") == 2 + 4 * CONFIG.n_layer  # wte, wpe and four per block
