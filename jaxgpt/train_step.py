"""The training step: pure, jitted functions over the split NNX state.

The step is functional, the way Flax's gemma example and MaxText do it: `graphdef, params = nnx.split(model)`;
`train_chunk(params, opt_state, data, base_key, step0, n_steps)` runs `n_steps` optimizer steps in one loop
(so a CPU pays Python dispatch once per chunk, not per step), `nnx.merge`s the model inside, donates
`params` and `opt_state`, and returns the per-step losses. Gradient accumulation is a `lax.scan` over
micro-batches inside each step. `estimate_loss` is nanoGPT's evaluation: one compiled call for both splits.

Every random choice is a function of (seed, step): the batch and the dropout masks of step i come from
`fold_in(base_key, i)`. The data position and the RNG are therefore restored by restoring the step, and
N steps in one run equal N/2 + resume + N/2 bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxgpt import data as data_lib
from jaxgpt import sharding as sharding_lib
from jaxgpt.model import loss_fn

EVAL_SALT = 0x5EED  # eval batches come from a key stream apart from the training batches'


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(`PRNGKey(seed)`, the run's base key `fold_in(PRNGKey(seed), 1)`): the initial weights and the end-of-run
    sample draw from the first, every step's and evaluation's keys come from the second."""
    key = jax.random.PRNGKey(seed)
    return key, jax.random.fold_in(key, 1)


def step_keys(base_key: jax.Array, step: jax.Array | int, grad_accum_steps: int) -> tuple[jax.Array, jax.Array]:
    """(batch keys, dropout keys) of a step's micro-batches, each of shape (grad_accum_steps, ...)."""
    keys = jax.random.split(jax.random.fold_in(base_key, step), 2 * grad_accum_steps)
    return keys[:grad_accum_steps], keys[grad_accum_steps:]


def eval_key(base_key: jax.Array, step: int | jax.Array, split_index: int) -> jax.Array:
    """The key of split `split_index`'s evaluation batches at `step` (0: train, 1: val)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_key, EVAL_SALT), step), split_index)


def model_loss(graphdef: nnx.GraphDef, params: nnx.State, x_BT: jax.Array, y_BT: jax.Array, key: jax.Array | None,
               use_dropout: bool) -> jax.Array:
    """The loss of the model (graphdef, params) on a batch: with dropout, drawn from `key`, when `use_dropout`.
    `key` is None in evaluation."""
    model = nnx.merge(graphdef, params)
    return loss_fn(model(x_BT, key=key if use_dropout else None), y_BT)


def make_train_chunk(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, max_steps: int | None = None,
                     **kwargs) -> Callable:
    """The jitted `train_chunk(params, opt_state, data, base_key, step0, n_steps) -> (params, opt_state, metrics)` of
    `train_chunk_fn(graphdef, tx, max_steps=max_steps, **kwargs)` (which says what it computes), `params` and
    `opt_state` donated.

    With `max_steps`, `n_steps` (at most `max_steps`) is a traced loop bound: one compiled program runs chunks of
    any length, and the metrics have `max_steps` entries, the first `n_steps` of them filled. Without it,
    `n_steps` is static: a program per length, metrics of `n_steps` entries.
    """
    static = () if max_steps is not None else ("n_steps",)
    return jax.jit(train_chunk_fn(graphdef, tx, max_steps=max_steps, **kwargs),
                   donate_argnames=("params", "opt_state"), static_argnames=static)


def train_chunk_fn(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    block_size: int,
    grad_accum_steps: int = 1,
    use_dropout: bool = False,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
    skip_nonfinite: bool = False,
    max_steps: int | None = None,
    lr_schedule: optax.Schedule | None = None,
    compute_dtype: jnp.dtype | str | None = None,
) -> Callable:
    """The pure `train_chunk(params, opt_state, data, base_key, step0, n_steps) -> (params, opt_state, metrics)`:
    `n_steps` optimizer steps from step `step0`.

    `data` is either the whole token array on the device (batches are drawn inside, `data.gather_batch`) or a
    pair of pre-drawn host batches `(x, y)` of shape (n_steps, grad_accum_steps, batch_size, block_size).
    metrics['loss'] holds each step's mean micro-batch loss, computed with the parameters before that step's
    update; metrics['finite'] whether the loss and the gradients were finite; with an `lr_schedule`, metrics['lr']
    each step's learning rate. With `skip_nonfinite`, a step whose loss, gradients or updates are not finite
    changes neither the parameters nor the optimizer state.

    With `max_steps` the metrics have `max_steps` entries (`n_steps` may be traced), else `n_steps`.

    With a `mesh`, every batch is split over its ('data', 'fsdp') axes and params / opt_state keep the
    shardings of `jaxgpt.sharding.state_shardings` (`scan_layers`: the model stacks its blocks), in and out.

    `compute_dtype` is the dtype the model computes in (`model.dtype`). When it is narrower than the parameters,
    the loop carries the weight matrices already cast to it, each step's update writing the cast beside the new
    weights: the model would cast them itself, the same values, but a GPU then runs each cast as a kernel of
    its own (a weight feeds its forward and its backward matmul). Losses and gradients are unchanged: the
    gradient of a cast weight is its copy's, cast back.
    """
    grad_fn = jax.value_and_grad(partial(model_loss, graphdef, use_dropout=use_dropout))

    def cast_weights(params):  # the matrices in compute_dtype; None where the model computes in their own dtype
        if compute_dtype is None:
            return None
        dtype = jnp.dtype(compute_dtype)
        return jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 and p.dtype.itemsize > dtype.itemsize else None,
                            params)

    def with_weights(params, weights):  # the parameters the model reads: the cast matrices where there are any
        if weights is None:
            return params
        return jax.tree.map(lambda w, p: p if w is None else w, weights, params, is_leaf=lambda x: x is None)

    def one_step(params, weights, opt_state, data, base_key, step, xy_ABT):
        batch_keys, drop_keys = step_keys(base_key, step, grad_accum_steps)

        def micro(grads, inputs):
            i, batch_key, drop_key = inputs
            if xy_ABT is None:
                x_BT, y_BT = data_lib.gather_batch(batch_key, data, batch_size, block_size)
            else:
                x_BT, y_BT = xy_ABT[0][i], xy_ABT[1][i]
            x_BT, y_BT = _constrain_batch(x_BT, mesh), _constrain_batch(y_BT, mesh)
            loss, g = grad_fn(with_weights(params, weights), x_BT, y_BT, drop_key)
            g = jax.tree.map(lambda g, p: g.astype(p.dtype), g, params)
            return (g if grads is None else jax.tree.map(jnp.add, grads, g)), loss

        if grad_accum_steps == 1:
            grads, loss = micro(None, (0, batch_keys[0], drop_keys[0]))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum_steps), batch_keys, drop_keys))
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            loss = losses.mean()
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if not skip_nonfinite:
            return new_params, cast_weights(new_params), new_opt_state, loss, finite
        keep_new = finite & _all_finite(updates)  # a NaN learning rate spoils the updates, not the gradients
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(keep_new, new, old),
                                         (new_params, new_opt_state), (params, opt_state))
        return params, cast_weights(params), opt_state, loss, keep_new

    def train_chunk(params, opt_state, data, base_key, step0, n_steps):
        on_device = not isinstance(data, tuple)
        length = max_steps if max_steps is not None else n_steps

        def body(i, carry):
            params, weights, opt_state, metrics = carry
            xy = None if on_device else jax.tree.map(lambda a: a[i], data)
            params, weights, opt_state, loss, ok = one_step(params, weights, opt_state, data, base_key, step0 + i, xy)
            new = {"loss": loss, "finite": ok}
            if lr_schedule is not None:
                new["lr"] = jnp.asarray(lr_schedule(step0 + i), jnp.float32)
            return params, weights, opt_state, {k: metrics[k].at[i].set(v) for k, v in new.items()}

        params, opt_state = _constrain_state((params, opt_state), mesh, scan_layers)
        metrics = {"loss": jnp.zeros(length, jnp.float32), "finite": jnp.zeros(length, bool)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.zeros(length, jnp.float32)
        carry = (params, cast_weights(params), opt_state, metrics)
        params, _, opt_state, metrics = jax.lax.fori_loop(0, n_steps, body, carry)
        # Outputs sharded as the inputs were, so the donated buffers are reused.
        params, opt_state = _constrain_state((params, opt_state), mesh, scan_layers)
        return params, opt_state, metrics

    return train_chunk


def _all_finite(tree) -> jax.Array:
    """Whether every value of `tree` is finite, told by its global norm: a NaN or an infinity anywhere makes the norm
    one. The gradient clip computes the same norm, and XLA computes it once; per-leaf checks would add two
    kernels a leaf to compile. (A norm past float32's range, ~1.8e19, also counts as not finite.)"""
    return jnp.isfinite(optax.tree.norm(tree))


def make_estimate_loss(graphdef: nnx.GraphDef, *, batch_size: int, block_size: int, eval_iters: int,
                       mesh: Mesh | None = None) -> Callable:
    """The jitted `estimate_loss(params, splits, base_key, step) -> mean loss of each split` (no dropout).

    `splits` is a tuple of datasets, each the token array on the device or pre-drawn batches `(x, y)` of
    shape (eval_iters, B, T). Split i's loss is the mean over `eval_iters` random batches (nanoGPT's
    `estimate_loss`) drawn with `eval_key(base_key, step, i)`, inside the program (eagerly, the keys would compile
    programs of their own). Every split's batches run through one loop over one forward pass, their token arrays
    joined: a loop per split would compile the forward pass once per split. With a `mesh`, each batch is split over
    its ('data', 'fsdp') axes.
    """

    def estimate(params, splits, base_key, step):
        keys = jnp.concatenate([jax.random.split(eval_key(base_key, step, i), eval_iters)
                                for i in range(len(splits))])
        host_fed = isinstance(splits[0], tuple)
        if host_fed:
            xs, ys = (jnp.concatenate(parts) for parts in zip(*splits))
            windows = (xs, ys)
        else:  # where each batch's windows lie in the joined array
            lengths = [d.shape[0] for d in splits]
            starts = np.repeat(np.cumsum([0, *lengths[:-1]]), eval_iters).astype(np.int32)
            windows = (starts, np.repeat(lengths, eval_iters).astype(np.int32))
            tokens = jnp.concatenate(splits)

        def batch_loss(inputs):
            key, window = inputs
            if host_fed:
                x_BT, y_BT = window
            else:
                x_BT, y_BT = data_lib.gather_batch(key, tokens, batch_size, block_size, start=window[0],
                                                   length=window[1])
            x_BT, y_BT = _constrain_batch(x_BT, mesh), _constrain_batch(y_BT, mesh)
            return model_loss(graphdef, params, x_BT, y_BT, None, False)

        losses = jax.lax.map(batch_loss, (keys, windows))
        return tuple(losses.reshape(len(splits), eval_iters).mean(axis=1))

    return jax.jit(estimate)


def _constrain_batch(x_BT: jax.Array, mesh: Mesh | None) -> jax.Array:
    return x_BT if mesh is None else sharding_lib.constrain_batch(x_BT, mesh)


def _constrain_state(tree, mesh: Mesh | None, scan_layers: bool):
    # The FSDP rule depends only on paths and shapes, so it gives the same shardings inside the trace.
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding_lib.state_shardings(tree, mesh, scan_layers))
