"""The key/value cache that lets a trained GPT decode one token per step instead of re-reading its past.

Each layer keeps the keys and values of every position seen so far in a fixed-size buffer; a call with
T new tokens at position `pos` writes their keys and values into slots pos .. pos+T-1 and attends its
queries against the whole buffer, each query seeing the slots up to its own position. The same
`Block` serves training (no cache) and decoding (a cache): the attention takes one and returns it.

Batch and heads share the buffer's leading axis, (B * n_head, block_size, head_size): the attention
matmuls take the buffer as it lies, so inside a decode loop XLA writes each new slot in place. With a
(B, H, S, D) buffer XLA reshapes it for the matmuls and fuses the slot write into that reshape, which
turns every step's write into a copy of the whole cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's keys and values, each (B * n_head, block_size, head_size); slots past the fed tokens hold zeros."""

    k_NSD: jax.Array
    v_NSD: jax.Array


def init_cache(n_layer: int, batch_size: int, n_head: int, block_size: int, head_size: int,
               dtype: jnp.dtype, *, host: bool = False) -> tuple[LayerCache, ...]:
    """An empty cache for each of `n_layer` layers; `host`: NumPy zeros, which compile no program to make."""
    shape = (batch_size * n_head, block_size, head_size)
    zeros = np.zeros if host else jnp.zeros
    return tuple(LayerCache(zeros(shape, dtype), zeros(shape, dtype)) for _ in range(n_layer))


def _merge_heads(x_BHTD: jax.Array, dtype: jnp.dtype) -> jax.Array:
    B, H, T, D = x_BHTD.shape
    return x_BHTD.reshape(B * H, T, D).astype(dtype)


def attend(cache: LayerCache, q_BHTD: jax.Array, k_BHTD: jax.Array, v_BHTD: jax.Array,
           pos: int | jax.Array) -> tuple[jax.Array, LayerCache]:
    """Writes k, v at slots pos .. pos+T-1, then causal attention of q against the cache -> (y (B, H, T, D), cache).

    The query at position pos + t sees slots 0 .. pos + t: its own past, as the causal mask of a full
    forward pass gives it. Scores and weights accumulate in float32, as `jaxgpt.attention.attention` does.
    """
    B, H, T, D = q_BHTD.shape
    dtype = cache.k_NSD.dtype
    k_NSD = jax.lax.dynamic_update_slice_in_dim(cache.k_NSD, _merge_heads(k_BHTD, dtype), pos, axis=1)
    v_NSD = jax.lax.dynamic_update_slice_in_dim(cache.v_NSD, _merge_heads(v_BHTD, dtype), pos, axis=1)
    q_NTD = _merge_heads(q_BHTD, dtype)
    S = k_NSD.shape[1]
    scores_NTS = jnp.einsum("ntd,nsd->nts", q_NTD, k_NSD, preferred_element_type=jnp.float32) * D**-0.5
    visible_TS = jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None]
    wei_NTS = jax.nn.softmax(jnp.where(visible_TS, scores_NTS, -jnp.inf), axis=-1)
    y_NTD = jnp.einsum("nts,nsd->ntd", wei_NTS.astype(dtype), v_NSD, preferred_element_type=jnp.float32)
    return y_NTD.astype(q_BHTD.dtype).reshape(B, H, T, D), LayerCache(k_NSD, v_NSD)
