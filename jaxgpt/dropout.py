"""Dropout: PyTorch's inverted dropout, and the one Bernoulli mask every dropout in jaxgpt draws.

`keep_mask` hashes each element's place (a slice, a row, a column) under a seed drawn from the step's dropout key:
a pure function, so the backward pass and a resumed run see the same mask, every device and sharding draws the same
one, and the fused attention kernels (`flash_dropout` on GPUs, `flash_dropout_tpu` on TPUs) draw inside them the
mask the lecture's attention (`attention.attention`) draws on the (B, H, T, S) weights in memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout as in PyTorch; the identity when `rate == 0` or `key is None` (evaluation).

    The mask is `keep_mask` of each element's place (the leading axes, then the last two as rows and columns)
    under one seed drawn from `key`, not `jax.random.bernoulli`: the counter hash costs a few integer operations
    an element where threefry costs dozens (18x faster on a CPU), gives the same mask on every device and
    sharding, and on attention weights (B, H, T, S) drops the weights jaxgpt's fused kernels drop."""
    if rate == 0.0 or key is None:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    seed = jax.random.bits(key, (1,), jnp.uint32)[0]  # the seed the fused kernels draw from their key
    lead, n_rows, n_cols = (math.prod(x.shape[:-2]), *x.shape[-2:]) if x.ndim >= 2 else (1, 1, x.size)
    heads, rows, cols = (jnp.arange(n, dtype=jnp.uint32) for n in (lead, n_rows, n_cols))
    keep = keep_mask(seed, heads[:, None, None], rows[:, None], cols, n_cols, rate).reshape(x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: each input bit flips each output bit with probability close to 1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(seed: jax.Array, head: jax.Array, rows: jax.Array, cols: jax.Array, n_cols: int,
              rate: float) -> jax.Array:
    """True where element (row, col) of slice `head` is kept: Bernoulli(1 - rate), independent. For attention
    weights (B, H, T, S) a slice is a head of a batch row (b·H + h); `dropout` and the fused attention kernels
    (`flash_dropout`, `flash_dropout_tpu`) all draw their masks here.

    The position's counter row·n_cols + col and the slice's key (from the uint32 `seed`) go through two rounds of
    a 32-bit mixer; the top 24 bits are compared with rate·2²⁴, so P(drop) is `rate` to within 2⁻²⁴."""
    head_key = _mix32(seed ^ _mix32(head.astype(jnp.uint32) + jnp.uint32(0x9E3779B9)))
    counter = (rows * n_cols + cols).astype(jnp.uint32)
    bits = _mix32(_mix32(counter ^ head_key) + head_key)
    return (bits >> 8).astype(jnp.int32) >= jnp.int32(round(rate * 2**24))
