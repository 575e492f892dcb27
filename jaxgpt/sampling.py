"""Sampling from a trained model, as the lecture does it: `generate`, and the rules for the next token.

    filter_logits   top-k, then top-p (nucleus): the tokens that may not be drawn get -inf
    sample_next     one token per row from the last position's logits (temperature 0 is greedy)
    check_settings  the one check of max_new_tokens, temperature, top_k and top_p (sample.py uses it too)
    check_prompt    idx must be a (batch, time) array of token ids of the model's vocabulary
    generate        the lecture's loop: a full forward over the last block_size tokens per new token

`generate` is the readable reference; `jaxgpt.decode.generate` is the same contract compiled, with a
key/value cache, and gives the same tokens for the same key: use it for anything longer than a demo.
Randomness is explicit: the i-th new token is drawn with `jax.random.fold_in(key, i)`.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits_BV: jax.Array, *, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Sets the logits of tokens that may not be sampled to -inf.

    top_k: keep the k largest logits (nanoGPT: everything below the k-th value goes). top_p: keep
    the smallest set of most likely tokens whose probability reaches p (nucleus sampling); the most
    likely token is always kept, and p = 1 keeps every token. Applied in that order, after the temperature.
    """
    chex.assert_rank(logits_BV, 2)
    V = logits_BV.shape[-1]
    if top_k is not None and top_k < V:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        sorted_BV = jnp.sort(probs_BV, axis=-1)[:, ::-1]
        mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
        # the smallest probability still kept: the sorted token whose predecessors hold < p of the mass
        kept_BV = mass_before_BV < top_p
        kept_BV = kept_BV.at[:, 0].set(True)
        floor_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(probs_BV < floor_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_next(
    logits_BV: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """One token per row (B,): argmax when `temperature` is 0, else softmax(filtered logits / temperature) sampled."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    logits_BV = filter_logits(logits_BV, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raises ValueError, naming the argument, unless the settings are ones `generate` can sample with."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_prompt(idx, vocab_size: int) -> np.ndarray:
    """idx as a host (B, T) int32 array; ValueError unless it holds at least one token, every id < vocab_size."""
    idx_np = np.asarray(idx)
    if idx_np.ndim != 2 or idx_np.shape[0] < 1 or idx_np.shape[1] < 1:
        raise ValueError(f"idx must be a (batch, time) array with at least one token, got shape {idx_np.shape}")
    if not np.issubdtype(idx_np.dtype, np.integer):
        raise ValueError(f"idx must hold integer token ids, got dtype {idx_np.dtype}")
    if idx_np.min() < 0 or idx_np.max() >= vocab_size:
        raise ValueError(f"idx holds token ids outside [0, {vocab_size}): min {idx_np.min()}, max {idx_np.max()}")
    return idx_np.astype(np.int32)


def generate(
    model: nnx.Module,
    idx,
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """Continues each row of `idx` (B, T) by `max_new_tokens` tokens; returns (B, T + max_new_tokens).

    The lecture's loop: each new token costs a full forward pass (compiled once per context length).
    temperature=0 is greedy decoding; top_k / top_p restrict sampling to the most likely tokens.
    `jaxgpt.decode.generate` gives the same tokens for the same key, compiled and with a key/value cache.
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    idx_BT = check_prompt(idx, model.vocab_size)  # a host array: cropping and appending compile nothing
    for i in range(max_new_tokens):
        idx_cond = idx_BT[:, -model.block_size :]  # crop the context to the last block_size tokens
        logits_BTV = _forward(model, idx_cond)
        logits_BV = logits_BTV[:, -1, :]  # the last position predicts the next token
        key_i = jax.random.fold_in(key, i)
        idx_next_B = sample_next(logits_BV, key_i, temperature=temperature, top_k=top_k, top_p=top_p)
        idx_BT = np.concatenate([idx_BT, np.asarray(idx_next_B)[:, None]], axis=1)  # append the sampled token
    return idx_BT


@nnx.jit
def _forward(model: nnx.Module, idx_BT: jax.Array) -> jax.Array:
    """`model(idx_BT)`, compiled once per shape: run op by op, a forward pass costs a dispatch per operation."""
    return model(idx_BT)
