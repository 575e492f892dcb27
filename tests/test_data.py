"""split and get_batch: the lecture's train/val split and a pure, jit-able batch sampler."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.data import get_batch, split


def test_split_is_the_lectures_ninety_ten(shakespeare_path):
    from jaxgpt.tokenizer import CharTokenizer

    text = shakespeare_path.read_text(encoding="utf-8")
    data = CharTokenizer.from_text(text).encode(text)
    train, val = split(data)
    assert (len(train), len(val)) == (1003854, 111540)  # the lecture's printed sizes
    np.testing.assert_array_equal(np.concatenate([train, val]), data)


def test_y_is_x_shifted_by_one_and_windows_are_contiguous():
    data = jnp.arange(1000, dtype=jnp.int32)  # token value == its position
    x, y = get_batch(jax.random.key(0), data, batch_size=16, block_size=8)
    chex.assert_shape([x, y], (16, 8))
    assert x.dtype == jnp.int32
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)
    np.testing.assert_array_equal(np.diff(np.asarray(x), axis=1), 1)
    assert int(y.max()) <= 999


def test_pure_in_key_and_jit_able():
    data = jnp.arange(500, dtype=jnp.int32)
    a = get_batch(jax.random.key(3), data, 4, 16)
    b = get_batch(jax.random.key(3), data, 4, 16)
    c = get_batch(jax.random.key(4), data, 4, 16)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    jitted = jax.jit(get_batch, static_argnames=("batch_size", "block_size"))
    np.testing.assert_array_equal(jitted(jax.random.key(3), data, batch_size=4, block_size=16)[0], a[0])


def test_every_start_offset_is_reachable():
    data = jnp.arange(11, dtype=jnp.int32)  # block 8: starts 0, 1, 2 are the only valid ones
    x, _ = get_batch(jax.random.key(0), data, batch_size=256, block_size=8)
    assert set(np.asarray(x[:, 0]).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("length", [0, 5, 8])
def test_data_shorter_than_block_plus_one_is_a_clear_error(length):
    with pytest.raises(ValueError, match=r"needs at least 9"):
        get_batch(jax.random.key(0), jnp.zeros(length, jnp.int32), batch_size=2, block_size=8)
