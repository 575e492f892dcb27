"""The lecture's ladder: three causal means agree with the values printed in its notebook (gpt-dev.ipynb), then
attention."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxgpt import attention as A

# xbow[0] as printed in the lecture's notebook (torch.manual_seed(1337); x = torch.randn(4, 8, 2)).
SEED_XBOW0 = np.array(
    [
        [0.1808, -0.0700],
        [-0.0894, -0.4926],
        [0.1490, -0.3199],
        [0.3504, -0.2238],
        [0.3525, 0.0545],
        [0.0688, -0.0396],
        [0.0927, -0.0682],
        [-0.0341, 0.1332],
    ]
)


@pytest.fixture
def seed_x():
    torch.manual_seed(1337)
    return jnp.asarray(torch.randn(4, 8, 2).numpy())


@pytest.mark.parametrize("fn", [A.causal_mean_loop, A.causal_mean_matmul, A.causal_mean_softmax])
def test_causal_means_reproduce_the_seed(fn, seed_x):
    xbow = fn(seed_x)
    chex.assert_shape(xbow, (4, 8, 2))
    np.testing.assert_allclose(xbow[0], SEED_XBOW0, atol=1e-4)


def test_the_three_rungs_agree_and_jit(seed_x):
    ref = A.causal_mean_loop(seed_x)
    for fn in (A.causal_mean_matmul, A.causal_mean_softmax):
        np.testing.assert_allclose(fn(seed_x), ref, atol=1e-6)
        np.testing.assert_allclose(jax.jit(fn)(seed_x), ref, atol=1e-6)


def test_uniform_attention_is_the_causal_mean(seed_x):
    # With q = 0 every score is equal, so causal attention over v = x is the running mean.
    q = jnp.zeros_like(seed_x)
    np.testing.assert_allclose(A.attention(q, seed_x, seed_x), A.causal_mean_loop(seed_x), atol=1e-6)


def test_attention_weights_match_the_lecture_formula():
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (2, 5, 16))
    k = jax.random.normal(kk, (2, 5, 16))
    wei = A.attention_weights(q, k)
    manual = (q @ jnp.swapaxes(k, -1, -2)) * 16**-0.5
    manual = jnp.where(jnp.tril(jnp.ones((5, 5))) == 0, -jnp.inf, manual)
    np.testing.assert_allclose(wei, jax.nn.softmax(manual, axis=-1), atol=1e-6)
    np.testing.assert_allclose(wei.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.triu(wei[0], k=1).max()) == 0.0  # no weight on the future


def test_encoder_form_is_unmasked_and_matches_the_seed():
    # The encoder form (the lecture; "Attention Is All You Need"): inputs attend to each other, no mask.
    torch.manual_seed(123)
    inputs = jnp.asarray(torch.rand((6, 3)).numpy())
    scores = inputs @ inputs.T
    np.testing.assert_allclose(scores[1], [0.4602, 1.2304, 0.2611, 1.1189, 0.3408, 1.0023], atol=1e-4)
    wei = A.attention_weights(inputs, inputs, causal=False)
    np.testing.assert_allclose(wei, jax.nn.softmax(scores * 3**-0.5, axis=-1), atol=1e-6)
    assert float(wei[0, 1:].min()) > 0.0  # the first token sees the future


def test_causal_mask_with_cache_offset():
    # Two new queries at the end of a length-5 sequence see keys 0..3 and 0..4.
    np.testing.assert_array_equal(A.causal_mask(2, 5), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(A.causal_mask(4), np.tril(np.ones((4, 4), bool)))
    # A cache of 5 slots holding 2 tokens: new queries at positions 2 and 3 see their past, not the empty slots.
    np.testing.assert_array_equal(A.causal_mask(2, 5, offset=2), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(A.causal_mask(2, 5, offset=jnp.int32(2)), A.causal_mask(2, 5, offset=2))


def test_attention_against_a_cache_equals_attention_over_the_sequence():
    """Queries at positions 3..4 against a 7-slot buffer holding 5 keys (the rest garbage) attend exactly as the
    last two rows of causal attention over the 5 tokens: `offset` is all a key/value cache needs."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4))
    full = A.attention(q, k, v)
    garbage = 1e3 * jnp.ones((2, 2, 4))
    cached = A.attention(q[:, 3:], jnp.concatenate([k, garbage], 1), jnp.concatenate([v, garbage], 1), offset=3)
    np.testing.assert_allclose(cached, full[:, 3:], atol=1e-5)


def test_attention_dropout_is_keyed_and_scaled():
    q = k = v = jnp.ones((1, 64, 8))
    no_key = A.attention(q, k, v, dropout_rate=0.5)
    np.testing.assert_allclose(no_key, A.attention(q, k, v), atol=1e-6)  # no key: evaluation
    a = A.attention(q, k, v, dropout_rate=0.5, key=jax.random.key(1))
    b = A.attention(q, k, v, dropout_rate=0.5, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, no_key)
    # Inverted dropout keeps the expectation: mean of many rows stays near 1.
    assert abs(float(a.mean()) - 1.0) < 0.1
