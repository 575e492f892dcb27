"""The key/value cache that lets a trained GPT decode one token per step instead of re-reading its past.

An attention keeps the keys and values of every position seen so far in a fixed-size buffer; a decoding
call with T new tokens at position `pos` writes their keys and values into slots pos .. pos+T-1 and
attends its queries against the whole buffer, each query seeing the slots up to its own position
(`jaxgpt.attention.attention` with `offset=pos`: the scoring, mask and float32 softmax of a full forward).

The buffer is (N, block_size, head_size) with one leading axis N: a `Head` keeps one per batch row
(N = B), nanoGPT's fused attention one per batch row and head (N = B * n_head). The attention matmuls
take the buffer as it lies, so inside a decode loop XLA writes each new slot in place. With a
(B, H, S, D) buffer XLA reshapes it for the matmuls and fuses the slot write into that reshape, which
turns every step's write into a copy of the whole cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgpt.attention import attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One attention's keys and values, each (N, block_size, head_size); slots past the fed tokens hold zeros."""

    k_NSD: jax.Array
    v_NSD: jax.Array


def init_cache(n: int, block_size: int, head_size: int, dtype: jnp.dtype) -> LayerCache:
    """An empty cache of `n` rows."""
    return LayerCache(jnp.zeros((n, block_size, head_size), dtype), jnp.zeros((n, block_size, head_size), dtype))


def attend(cache: LayerCache, q_NTD: jax.Array, k_NTD: jax.Array, v_NTD: jax.Array,
           pos: int | jax.Array) -> tuple[jax.Array, LayerCache]:
    """Writes k, v at slots pos .. pos+T-1, then causal attention of q against the cache -> (y (N, T, D), cache).

    The query at position pos + t sees slots 0 .. pos + t: its own past, as the causal mask of a full
    forward pass gives it.
    """
    dtype = cache.k_NSD.dtype
    k_NSD = jax.lax.dynamic_update_slice_in_dim(cache.k_NSD, k_NTD.astype(dtype), pos, axis=1)
    v_NSD = jax.lax.dynamic_update_slice_in_dim(cache.v_NSD, v_NTD.astype(dtype), pos, axis=1)
    y_NTD = attention(q_NTD.astype(dtype), k_NSD, v_NSD, causal=True, offset=pos)
    return y_NTD.astype(q_NTD.dtype), LayerCache(k_NSD, v_NSD)
