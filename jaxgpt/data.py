"""Train/val split and random batches of (context, next-token) pairs, as pure functions.

`get_batch` is the lecture's `get_batch` without the Python loop over the batch: the start offsets
come from a `jax.random` key and the windows are gathered in one indexing op, so it can run inside
a jitted train step with the dataset already on the device.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.Array | np.ndarray


def split(data: ArrayLike, train_fraction: float = 0.9) -> tuple[ArrayLike, ArrayLike]:
    """The first `train_fraction` of the tokens for training, the rest for validation (as the lecture)."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def check_length(data: ArrayLike, block_size: int, what: str = "data") -> None:
    """Raises a clear `ValueError` when `data` cannot hold one (block_size + 1)-token window."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"{what} has {len(data)} tokens but block_size={block_size} needs at least "
            f"{block_size + 1}: use more text or a smaller block_size"
        )


@partial(jax.jit, static_argnames=("batch_size", "block_size"))
def _gather(key: jax.Array, data: jax.Array, batch_size: int, block_size: int):
    ix_B = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)
    window_BT1 = ix_B[:, None] + jnp.arange(block_size + 1)[None, :]
    tokens = data[window_BT1].astype(jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]


def get_batch(key: jax.Array, data: ArrayLike, batch_size: int, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Draws `batch_size` random windows of `block_size` tokens from `data`.

    Returns x_BT (int32) and y_BT, where y is x shifted one token to the left: y[b, t] is the token
    that follows x[b, :t+1]. Pure in `key`: the same key gives the same batch.
    """
    check_length(data, block_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_BT, y_BT = _gather(key, jnp.asarray(data), batch_size, block_size)
    chex.assert_shape([x_BT, y_BT], (batch_size, block_size))
    return x_BT, y_BT
