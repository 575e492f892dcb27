"""Dropout (`jaxgpt.dropout`): the mask's distribution, inverted scaling, and one mask for the lecture's attention
and the fused kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import attention as A
from jaxgpt import dropout as D


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_keep_mask_is_bernoulli_and_independent(rate):
    """Each weight is kept with probability 1 - rate; neighbours along rows, columns, heads and seeds are not
    correlated (pair frequencies match (1 - rate)^2 to within 5 standard errors)."""
    n_heads, n = 8, 256
    rows, cols = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    seed = jax.random.bits(jax.random.key(0), (), jnp.uint32)
    keep = np.asarray(D.keep_mask(seed, jnp.arange(n_heads)[:, None, None], rows, cols, n, rate))
    other_seed = np.asarray(D.keep_mask(seed + 1, jnp.arange(n_heads)[:, None, None], rows, cols, n, rate))
    p = 1.0 - rate
    size = keep.size
    assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / size)
    pairs = {"columns": (keep[:, :, 1:], keep[:, :, :-1]), "rows": (keep[:, 1:], keep[:, :-1]),
             "heads": (keep[1:], keep[:-1]), "seeds": (keep, other_seed)}
    for name, (a, b) in pairs.items():
        both = (a & b).mean()
        assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / a.size), name


@pytest.mark.parametrize("shape", [(4, 64, 96), (2, 3, 32, 40), (64, 96), (6000,)])
def test_dropout_keeps_each_element_with_probability_one_minus_rate_and_scales_the_kept(shape):
    """Any shape: the leading axes, rows and columns are the mask's places; kept elements are x / (1 - rate)."""
    rate = 0.25
    x = jax.random.normal(jax.random.key(0), shape) + 3.0  # no zeros of its own
    y = np.asarray(D.dropout(x, rate, jax.random.key(1)))
    keep = y != 0
    p = 1.0 - rate
    assert abs(keep.mean() - p) < 5 * np.sqrt(p * rate / keep.size)
    np.testing.assert_allclose(y[keep], np.asarray(x)[keep] / p, rtol=1e-6)
    assert np.array_equal(y, D.dropout(x, rate, jax.random.key(1)))
    assert not np.array_equal(keep, np.asarray(D.dropout(x, rate, jax.random.key(2))) != 0)


def test_the_ladders_attention_dropout_drops_the_weights_the_fused_kernels_drop():
    """On (B, H, T, D) heads the ladder's mask is the kernels' (`flash_dropout.reference`, against which
    tests/test_flash_dropout.py checks both kernels): one mask whichever attention a device runs."""
    from jaxgpt import flash_dropout

    B, H, T, D = 2, 3, 64, 16
    q, k, v = (jax.random.normal(kk, (B, H, T, D)) for kk in jax.random.split(jax.random.key(0), 3))
    key = jax.random.key(7)
    ladder = A.attention(q, k, v, dropout_rate=0.2, key=key)
    to_bthd = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
    fused = flash_dropout.reference(to_bthd(q), to_bthd(k), to_bthd(v), rate=0.2, key=key)
    np.testing.assert_allclose(ladder, to_bthd(fused), atol=2e-6)
    assert not np.allclose(ladder, A.attention(q, k, v, dropout_rate=0.2, key=jax.random.key(8)), atol=1e-3)
