"""Batches gathered on the host, for datasets kept off the device (`data.on_device=False`, a large np.memmap).

The host draws the same window starts the on-device step draws (`data.batch_starts` with the keys of
`train_step.step_keys` / `train_step.eval_key`), reads those windows (`data.windows`) and puts them on the
mesh: both paths train on the same windows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt import data as data_lib
from jaxgpt import sharding as sharding_lib
from jaxgpt.train_step import eval_key, step_keys


@partial(jax.jit, static_argnames=("batch_size", "block_size", "n_tokens"))
def _starts(keys: jax.Array, *, batch_size: int, block_size: int, n_tokens: int) -> jax.Array:
    flat = jnp.reshape(keys, (-1, keys.shape[-1]))
    starts = jax.vmap(lambda k: data_lib.batch_starts(k, batch_size, n_tokens, block_size))(flat)
    return starts.reshape(*keys.shape[:-1], batch_size)


def batch_offsets(keys: jax.Array, batch_size: int, block_size: int, n_tokens: int) -> np.ndarray:
    """The window starts `data.gather_batch` draws with raw uint32 `keys` of shape (*lead, 2) from `n_tokens`
    tokens: an int array (*lead, batch_size) on the host."""
    return np.asarray(_starts(keys, batch_size=batch_size, block_size=block_size, n_tokens=n_tokens))


@partial(jax.jit, static_argnames=("n_steps", "grad_accum_steps", "batch_size", "block_size", "n_tokens"))
def _step_starts(base_key: jax.Array, step0: jax.Array, *, n_steps: int, grad_accum_steps: int, batch_size: int,
                 block_size: int, n_tokens: int) -> jax.Array:
    keys = jax.vmap(lambda i: step_keys(base_key, step0 + i, grad_accum_steps)[0])(jnp.arange(n_steps))
    return _starts(keys, batch_size=batch_size, block_size=block_size, n_tokens=n_tokens)


def step_offsets(base_key: jax.Array, a: int, b: int, *, grad_accum_steps: int, batch_size: int, block_size: int,
                 n_tokens: int) -> np.ndarray:
    """The window starts of the training batches of steps [a, b), (b - a, grad_accum_steps, batch_size) on the host:
    those the on-device step draws. One small program per chunk length."""
    return np.asarray(_step_starts(base_key, np.int32(a), n_steps=b - a, grad_accum_steps=grad_accum_steps,
                                   batch_size=batch_size, block_size=block_size, n_tokens=n_tokens))


def eval_offsets(base_key: jax.Array, step: int, split_index: int, *, eval_iters: int, batch_size: int,
                 block_size: int, n_tokens: int) -> np.ndarray:
    """The window starts of split `split_index`'s evaluation batches at `step`, (eval_iters, batch_size): those
    `train_step.make_estimate_loss` draws on the device."""
    keys = jax.random.split(eval_key(base_key, step, split_index), eval_iters)
    return batch_offsets(keys, batch_size, block_size, n_tokens)


def host_fed_batches(data: np.ndarray, offsets: np.ndarray, block_size: int, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """The windows at `offsets` (*lead, batch_size) as global arrays on the mesh, their batch axis split over
    ('data', 'fsdp').

    Each process reads from `data` only the rows its own devices hold (all of them, with one process);
    every process draws the same offsets, so the global batch is the one a single process would build.
    """
    global_shape = (*offsets.shape, block_size)
    sharding = sharding_lib.batch_sharding(mesh, len(global_shape), batch_axis=-2)
    rows = sharding_lib.process_rows(sharding, global_shape, axis=-2)
    return tuple(sharding_lib.from_process_rows(a, sharding, global_shape)
                 for a in data_lib.windows(data, offsets[..., rows], block_size))
