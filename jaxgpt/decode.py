"""Fast sampling: `jaxgpt.sampling.generate`'s contract, compiled, with a key/value cache.

    generate          (B, T) -> (B, T + max_new_tokens): the tokens `jaxgpt.sampling.generate` gives for the
                      same key and settings, at a compiled loop's speed. Use this one to sample (sample.py,
                      train.py's end-of-run sample); read `jaxgpt.sampling` to see what it computes.
    generate_stream   the same tokens, yielded in chunks as they are drawn
    prepare_generate  compiles what `generate` will run, drawing nothing, so that the sample starts at once

Within the context the model decodes through its own `init_cache` / `decode` (jaxgpt.model): the prompt
but its last token is prefilled into the cache in one call, then a compiled `lax.fori_loop` feeds one token
per step at its position, reading the keys and values of the past from the cache instead of recomputing them.

Past `block_size`, as nanoGPT, each token is conditioned on the last `block_size` tokens at positions
0 .. block_size-1. Learned or sinusoidal positions enter at the input, and rotary ones rotate the cached keys, so
when the window slides every cached key and value changes: a second compiled loop then runs a full forward over the
window per token.
A sample mostly past the context (more than twice `block_size` in all, like the CPU recipe's end-of-run
sample) runs that loop from its first token, the window right-padded until it fills (causal attention: the
padding changes nothing before it), so that one program is compiled instead of two.

Both loops draw the i-th new token with `jax.random.fold_in(key, i)` through `sampling.sample_next`, the
rule the lecture's loop uses; the temperature, top_k and top_p are compiled into the program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.sampling import check_prompt, check_settings, sample_next

Settings = tuple  # (temperature, top_k, top_p): static, hashable


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    """What the decode loops carry: the token buffer, the sequence length, the tokens drawn, the cache."""

    tokens_BN: jax.Array  # the sequence so far, left-aligned; slots >= length are not yet written
    length: jax.Array  # int32 scalar
    drawn: jax.Array  # int32 scalar: tokens generated so far, the fold_in index of the next key
    cache: tuple


def _append(s: _State, logits_BV: jax.Array, key: jax.Array, settings: Settings, cache: tuple) -> _State:
    """Draws the next token from the last position's logits and writes it at slot `length`."""
    temperature, top_k, top_p = settings
    nxt_B = sample_next(logits_BV, jax.random.fold_in(key, s.drawn), temperature=temperature, top_k=top_k,
                        top_p=top_p)
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BN, nxt_B[:, None], s.length, axis=1)
    return _State(tokens_BN, s.length + 1, s.drawn + 1, cache)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, params, prompt_BT: jax.Array, cache: tuple) -> tuple:
    """Writes the keys and values of the prompt, at positions 0 .. T-1, into the cache."""
    return nnx.merge(graphdef, params).decode(prompt_BT, cache, 0)[1]


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _cached_steps(graphdef, params, state: _State, settings: Settings, n_steps, key) -> _State:
    """n_steps cached steps; the caller keeps every fed position below block_size."""
    model = nnx.merge(graphdef, params)

    def step(_, s: _State) -> _State:
        pos = s.length - 1  # the last token is fed; its key and value join the cache
        tok_B1 = jax.lax.dynamic_slice_in_dim(s.tokens_BN, pos, 1, axis=1)
        logits_B1V, cache = model.decode(tok_B1, s.cache, pos)
        return _append(s, logits_B1V[:, 0], key, settings, cache)

    return jax.lax.fori_loop(0, n_steps, step, state)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _window_steps(graphdef, params, state: _State, settings: Settings, n_steps, key) -> _State:
    """n_steps full forwards over the last block_size tokens (the first block_size slots while shorter), each
    read at the sequence's last token."""
    model = nnx.merge(graphdef, params)
    block_size = model.block_size

    def step(_, s: _State) -> _State:
        start = jnp.maximum(s.length - block_size, 0)
        window_BT = jax.lax.dynamic_slice_in_dim(s.tokens_BN, start, block_size, axis=1)
        logits_BV = jax.lax.dynamic_index_in_dim(model(window_BT), s.length - start - 1, axis=1, keepdims=False)
        return _append(s, logits_BV, key, settings, s.cache)

    return jax.lax.fori_loop(0, n_steps, step, state)


def _stream(model: nnx.Module, idx_BT: np.ndarray, max_new_tokens: int, key: jax.Array, settings: Settings,
            chunk: int, dry_run: bool = False) -> Iterator[np.ndarray]:
    """Yields the new tokens in (B, <= chunk) arrays. `dry_run` runs every program with the shapes it would get but
    a loop count of 0: it compiles them and draws nothing."""
    block_size = model.block_size
    prompt_BT = idx_BT[:, -block_size:]  # nanoGPT conditions on the last block_size tokens only
    B, T = prompt_BT.shape
    graphdef, params = nnx.split(model)
    tokens_BN = np.zeros((B, max(T + max_new_tokens, block_size)), np.int32)
    tokens_BN[:, :T] = prompt_BT
    window_only = T + max_new_tokens > 2 * block_size
    cache = () if window_only else model.init_cache(B)
    if T > 1 and not window_only:  # the loop feeds the prompt's last token itself
        cache = _prefill(graphdef, params, prompt_BT[:, :-1], cache)
    state = _State(tokens_BN, np.int32(T), np.int32(0), cache)
    for done in range(0, max_new_tokens, chunk):
        n = min(chunk, max_new_tokens - done)
        length = T + done
        n_cached = 0 if window_only else min(n, max(0, block_size - length + 1))  # fed positions < block_size
        for loop, steps in ((_cached_steps, n_cached), (_window_steps, n - n_cached)):
            if steps:
                state = loop(graphdef, params, state, settings, np.int32(0 if dry_run else steps), key)
        yield np.asarray(state.tokens_BN)[:, length : length + n]


def generate_stream(
    model: nnx.Module,
    idx,
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    chunk_size: int = 32,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new tokens as they are drawn, in (B, n <= chunk_size) int32 chunks.

    Each chunk is one call of a compiled loop, so a small `chunk_size` streams more smoothly and a large one
    dispatches less. The tokens are `generate`'s for the same key.
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    idx_BT = check_prompt(idx, model.vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    yield from _stream(model, idx_BT, max_new_tokens, key, (temperature, top_k, top_p), chunk_size)


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

    The tokens of `jaxgpt.sampling.generate` (the lecture's loop) for the same arguments, compiled and with a
    key/value cache. temperature=0 is greedy decoding; top_k / top_p restrict sampling to the most likely tokens.
    """
    chunks = list(generate_stream(model, idx, max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                                  top_p=top_p, chunk_size=max(1, max_new_tokens)))
    return np.concatenate([check_prompt(idx, model.vocab_size), *chunks], axis=1)


def prepare_generate(
    model: nnx.Module,
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

    Compiling takes seconds and a sample a fraction of that: call this in a thread while something else runs (a
    server before its first request, say). Any parameters of the same shapes and shardings will do, and any `key` of
    the kind `generate` will get (a raw `PRNGKey` or a typed `jax.random.key`).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    idx_BT = np.zeros((batch_size, prompt_length), np.int32)
    for _ in _stream(model, idx_BT, max_new_tokens, key, (temperature, top_k, top_p), max(1, max_new_tokens),
                     dry_run=True):
        pass
