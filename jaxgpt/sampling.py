"""Sampling from a trained model: the lecture's `generate`, and a compiled key/value-cache decoder.

Two paths with one contract (`idx` (B, T) int32 in, (B, T + max_new_tokens) out):

    use_cache=False  the lecture's loop: each new token runs a full forward over the last
                     `block_size` tokens. Readable, and the reference the cache is tested against.
    use_cache=True   one compiled prefill writes every layer's keys and values into a fixed-size
                     cache; a compiled `lax.fori_loop` then feeds one token per step, reading the
                     cache instead of recomputing the past. Both are the model's own forward pass:
                     `GPT.__call__` with a `cache` (jaxgpt.kv_cache).

Past `block_size` both follow nanoGPT exactly: each token is conditioned on the last `block_size`
tokens at positions 0 .. block_size-1. Positions are added at the input (learned or sinusoidal), so
once the window slides every cached key and value changes; the cached path then switches to a
compiled loop of full-window forwards, projecting only the last position to the vocabulary. A sample
mostly past the context (more than twice `block_size` in all) runs that loop from its first token, the window
right-padded until it fills: one program to compile instead of two (three with a prefill).

Randomness is explicit: the i-th new token is drawn with `jax.random.fold_in(key, i)`, so the same
key gives the same text whether it is generated at once, in streamed chunks, with or without cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.kv_cache import LayerCache
from jaxgpt.layout import with_layout
from jaxgpt.model import GPT

# --------------------------------------------------------------------------------------------------
# Choosing the next token
# --------------------------------------------------------------------------------------------------


def filter_logits(logits_BV: jax.Array, *, top_k: int | None = None, top_p: float | jax.Array | None = None):
    """Sets the logits of tokens that may not be sampled to -inf.

    top_k: keep the k largest logits (nanoGPT: everything below the k-th value goes). top_p: keep
    the smallest set of most likely tokens whose probability reaches p (nucleus sampling); the most
    likely token is always kept. Applied in that order, after the temperature.
    """
    chex.assert_rank(logits_BV, 2)
    V = logits_BV.shape[-1]
    if top_k is not None and top_k < V:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
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
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    greedy: bool = False,
) -> jax.Array:
    """One token per row: argmax when `greedy`, else softmax(filtered logits / temperature) sampled."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    logits_BV = filter_logits(logits_BV, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Sampler:
    """The static part of the sampling settings (what changes the compiled program)."""

    greedy: bool
    top_k: int | None
    use_top_p: bool

    def __call__(self, logits_BV, key, temperature, top_p):
        return sample_next(
            logits_BV,
            key,
            temperature=temperature,
            top_k=self.top_k,
            top_p=top_p if self.use_top_p else None,
            greedy=self.greedy,
        )


def _check_args(model, idx, max_new_tokens, temperature, top_k, top_p) -> np.ndarray:
    """Validates the arguments of `generate`; returns idx as a host int32 array."""
    idx_np = np.asarray(idx)
    if idx_np.ndim != 2 or idx_np.shape[0] < 1 or idx_np.shape[1] < 1:
        raise ValueError(f"idx must be a (batch, time) array with at least one token, got shape {idx_np.shape}")
    if not np.issubdtype(idx_np.dtype, np.integer):
        raise ValueError(f"idx must hold integer token ids, got dtype {idx_np.dtype}")
    vocab_size = _vocab_size(model)
    if idx_np.min() < 0 or idx_np.max() >= vocab_size:
        raise ValueError(f"idx holds token ids outside [0, {vocab_size}): min {idx_np.min()}, max {idx_np.max()}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    return idx_np.astype(np.int32)


def _vocab_size(model) -> int:
    if isinstance(model, GPT):
        return model.config.vocab_size
    return int(model.token_embedding_table.num_embeddings)


def _sampler(model, temperature, top_k, top_p) -> _Sampler:
    vocab_size = _vocab_size(model)
    top_k = None if top_k is None or top_k >= vocab_size else int(top_k)
    return _Sampler(greedy=temperature == 0, top_k=top_k, use_top_p=top_p is not None and top_p < 1.0)


def _bucket(n: int, cap: int | None = None, minimum: int = 8) -> int:
    """n rounded up to a power of two (at least `minimum`, at most `cap`): few shapes, few compiles."""
    b = max(minimum, 1 << max(0, n - 1).bit_length())
    return b if cap is None else min(b, cap)


# --------------------------------------------------------------------------------------------------
# The reference: the lecture's generate
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 5))
def _reference_step(graphdef, state, window_BT, length, key, sampler, temperature, top_p):
    """Logits of the last real token of a right-padded window, and the token drawn from them.

    Right padding changes nothing before it (attention is causal, positions start at 0), so one
    compiled function serves every window length up to its bucket.
    """
    model = nnx.merge(graphdef, state)
    logits_BV = model(window_BT)[:, length - 1, :]
    return sampler(logits_BV, key, temperature, top_p)


def _generate_reference(model, idx_BT: np.ndarray, max_new_tokens: int, key, sampler, temperature, top_p, offset=0):
    """The lecture's loop; the i-th new token uses key fold_in(key, offset + i)."""
    block_size = model.block_size
    graphdef, state = nnx.split(model)
    idx = idx_BT
    for i in range(max_new_tokens):
        idx_cond = idx[:, -block_size:]  # crop the context to the last block_size tokens
        T = idx_cond.shape[1]
        window = np.zeros((idx.shape[0], _bucket(T, cap=block_size)), np.int32)
        window[:, :T] = idx_cond
        idx_next = _reference_step(
            graphdef, state, window, T, jax.random.fold_in(key, offset + i), sampler, temperature, top_p
        )
        idx = np.concatenate([idx, np.asarray(idx_next)[:, None]], axis=1)
    return idx


# --------------------------------------------------------------------------------------------------
# The cached path: the model's own forward with a key/value cache (jaxgpt.kv_cache)
# --------------------------------------------------------------------------------------------------


def init_cache(model: GPT, batch_size: int) -> tuple[LayerCache, ...]:
    """Empty per-layer key/value caches for `batch_size` rows (`GPT.init_cache`)."""
    return model.init_cache(batch_size)


def prefill(model: GPT, idx_BT: jax.Array, cache: tuple[LayerCache, ...]):
    """Runs the prompt (B, T <= block_size) through the model, caching its keys and values at positions 0 .. T-1.

    Returns (logits (B, T, V), cache).
    """
    return model(idx_BT, cache=cache, pos=0)


def decode_step(model: GPT, tok_B: jax.Array, pos: jax.Array, cache: tuple[LayerCache, ...]):
    """Feeds one token per row at position `pos` (< block_size): returns (logits (B, V), cache)."""
    logits_B1V, cache = model(tok_B[:, None], cache=cache, pos=pos)
    return logits_B1V[:, 0, :], cache


def last_logits(model: GPT, idx_BT: jax.Array, last: int | jax.Array = -1) -> jax.Array:
    """logits (B, V) of position `last` (the last by default) of a full forward (the head projects only that row)."""
    x_BTC = model.blocks(model.embed(idx_BT), [None] * model.config.n_layer)
    return model.head(x_BTC[:, last][:, None])[:, 0, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    """Everything the decode loops carry: token buffer, sequence length, tokens drawn, cache."""

    tokens_BN: jax.Array  # the sequence so far, left-aligned; slots >= length are not yet written
    length: jax.Array  # int32 scalar: current sequence length
    drawn: jax.Array  # int32 scalar: tokens generated so far (the fold_in index of the next key)
    cache: tuple


@functools.partial(jax.jit, static_argnums=(0,))
def _start(graphdef, params, prompt_BT, length, buffer_BN):
    """Prefill over the (right-padded) prompt bucket and set up the loop state."""
    model = nnx.merge(graphdef, params)
    _, cache = prefill(model, prompt_BT, model.init_cache(prompt_BT.shape[0]))
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(buffer_BN, prompt_BT, 0, axis=1)
    return _State(tokens_BN, length, jnp.zeros((), jnp.int32), cache)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _decode_cached(graphdef, params, state: _State, sampler, n_steps, key, temperature, top_p):
    """n_steps cached steps (the caller guarantees every position stays < block_size)."""
    model = nnx.merge(graphdef, params)

    def step(_, s: _State):
        pos = s.length - 1  # the last token is fed; its key and value join the cache
        tok_B = jax.lax.dynamic_index_in_dim(s.tokens_BN, pos, axis=1, keepdims=False)
        logits_BV, cache = decode_step(model, tok_B, pos, s.cache)
        nxt_B = sampler(logits_BV, jax.random.fold_in(key, s.drawn), temperature, top_p)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BN, nxt_B[:, None], s.length, axis=1)
        return _State(tokens_BN, s.length + 1, s.drawn + 1, cache)

    return jax.lax.fori_loop(0, n_steps, step, state)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _decode_window(graphdef, params, state: _State, sampler, n_steps, key, temperature, top_p):
    """n_steps steps of a full forward over the last block_size tokens each; while the sequence is shorter, over its
    first block_size slots, read at its last token (causal attention: the slots after it change nothing)."""
    model = nnx.merge(graphdef, params)
    block_size = model.config.block_size

    def step(_, s: _State):
        start = jnp.maximum(s.length - block_size, 0)
        window_BT = jax.lax.dynamic_slice_in_dim(s.tokens_BN, start, block_size, axis=1)
        logits_BV = last_logits(model, window_BT, s.length - start - 1)
        nxt_B = sampler(logits_BV, jax.random.fold_in(key, s.drawn), temperature, top_p)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BN, nxt_B[:, None], s.length, axis=1)
        return _State(tokens_BN, s.length + 1, s.drawn + 1, s.cache)

    return jax.lax.fori_loop(0, n_steps, step, state)


def _stream_cached(model: GPT, idx_BT: np.ndarray, max_new_tokens, key, sampler, temperature, top_p, chunk,
                   dry_run: bool = False):
    """Yields the new tokens of the cached path in chunks of at most `chunk` (B, n) arrays.

    `dry_run` calls every program with the same shapes but a loop count of 0: it compiles them and draws nothing.
    """
    block_size = model.config.block_size
    B, T = idx_BT.shape
    prompt_BT = idx_BT[:, -block_size:]  # nanoGPT conditions on the last block_size tokens only
    T_c = prompt_BT.shape[1]
    T_pad = _bucket(T_c, cap=block_size)
    padded = np.zeros((B, T_pad), np.int32)
    padded[:, :T_c] = prompt_BT
    graphdef, params = nnx.split(with_layout(model, scan_layers=False))  # the cache is kept per layer
    buffer = np.zeros((B, _bucket(T_pad + max_new_tokens, minimum=64)), np.int32)  # host zeros: nothing to compile
    # Mostly past the context (train.py's end-of-run sample, say), every step runs the window loop from the start:
    # one program to compile instead of a prefill, the cached loop and the window loop, for a slower start.
    window_only = T_c + max_new_tokens > 2 * block_size
    if window_only:
        buffer[:, :T_c] = prompt_BT
        state = _State(buffer, np.int32(T_c), np.int32(0), ())
    elif T_c == 1:  # no prefill to compile: the first decode step feeds the prompt's one token into an empty cache
        buffer[:, :1] = prompt_BT
        state = _State(buffer, np.int32(1), np.int32(0), model.init_cache(B, host=True))
    else:
        state = _start(graphdef, params, padded, np.int32(T_c), buffer)
    # Host scalars and host slices below: on the device each would compile a small program of its own.
    temperature = np.float32(temperature if temperature else 1.0)
    top_p = np.float32(1.0 if top_p is None else top_p)
    done = 0
    while done < max_new_tokens:
        n = min(chunk, max_new_tokens - done)
        length = T_c + done
        n_cached = 0 if window_only else min(n, max(0, block_size - length + 1))  # fed positions < block_size
        n_window = n - n_cached
        if n_cached:
            n_cached = 0 if dry_run else n_cached
            state = _decode_cached(graphdef, params, state, sampler, np.int32(n_cached), key, temperature, top_p)
        if n_window:
            n_window = 0 if dry_run else n_window
            state = _decode_window(graphdef, params, state, sampler, np.int32(n_window), key, temperature, top_p)
        yield np.asarray(state.tokens_BN)[:, length : length + n]
        done += n


# --------------------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------------------


def generate_stream(
    model,
    idx,
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    chunk_size: int = 32,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new tokens as they are produced, (B, n) int32 chunks.

    Each chunk is one call of the compiled loop, so a small `chunk_size` streams more smoothly and a
    large one dispatches less. The tokens are the same as `generate`'s for the same key.
    """
    idx_BT = _check_args(model, idx, max_new_tokens, temperature, top_k, top_p)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    sampler = _sampler(model, temperature, top_k, top_p)
    if use_cache and isinstance(model, GPT):
        yield from _stream_cached(model, idx_BT, max_new_tokens, key, sampler, temperature, top_p, chunk_size)
        return
    # The reference path (and models without a cache, like the bigram model) one token at a time.
    temp = np.float32(temperature if temperature else 1.0)
    top_p_arr = np.float32(1.0 if top_p is None else top_p)
    seq = idx_BT
    for done in range(0, max_new_tokens, chunk_size):
        n = min(chunk_size, max_new_tokens - done)
        new = _generate_reference(model, seq, n, key, sampler, temp, top_p_arr, offset=done)[:, seq.shape[1] :]
        seq = np.concatenate([seq, new], axis=1)
        yield new


def prepare_generate(
    model,
    prompt_length: int,
    max_new_tokens: int,
    *,
    key: jax.Array,
    batch_size: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> None:
    """Compiles (or reads from the compile cache) the programs `generate` will run for these shapes and settings,
    drawing no token, so that the later `generate` starts at once.

    Compiling takes seconds and a sample a fraction of that: call this in a thread while something else runs
    (train.py does during training). Any parameters of the same shapes and shardings will do, and any `key` of the
    kind `generate` will get (a raw `PRNGKey` or a typed `jax.random.key`). Only the cached path of a GPT
    compiles ahead; for other models it does nothing.
    """
    if not isinstance(model, GPT):
        return
    idx_BT = _check_args(model, np.zeros((batch_size, prompt_length), np.int32), max_new_tokens, temperature,
                         top_k, top_p)
    sampler = _sampler(model, temperature, top_k, top_p)
    chunk = max(1, max_new_tokens)  # as `generate` streams
    for _ in _stream_cached(model, idx_BT, max_new_tokens, key, sampler, temperature, top_p,
                            chunk, dry_run=True):
        pass


def generate(
    model,
    idx,
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """Continues each row of `idx` (B, T) by `max_new_tokens` tokens; returns (B, T + max_new_tokens).

    temperature=0 is greedy decoding; top_k / top_p restrict sampling to the most likely tokens.
    use_cache=False runs the lecture's loop (a full forward per token), the readable reference.
    """
    idx_BT = _check_args(model, idx, max_new_tokens, temperature, top_k, top_p)
    chunks = list(
        generate_stream(
            model,
            idx_BT,
            max_new_tokens,
            key=key,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            use_cache=use_cache,
            chunk_size=max(1, max_new_tokens),
        )
    )
    return np.concatenate([idx_BT, *chunks], axis=1) if chunks else idx_BT
