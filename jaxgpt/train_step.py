"""The training step: pure, jitted functions over the split NNX state.

The step is functional, the way Flax's gemma example and MaxText do it: `graphdef, params = nnx.split(model)`;
`train_chunk(params, opt_state, data, base_key, step0)` runs `n_steps` optimizer steps in one `lax.scan`
(so a CPU pays Python dispatch once per chunk, not per step), `nnx.merge`s the model inside, donates
`params` and `opt_state`, and returns the per-step losses. Gradient accumulation is a `lax.scan` over
micro-batches inside each step. `estimate_loss` is nanoGPT's evaluation: one compiled call for both splits.

Every random choice is a function of (seed, step): the batch and the dropout masks of step i come from
`fold_in(base_key, i)`. The data position and the RNG are therefore restored by restoring the step, and
N steps in one run equal N/2 + resume + N/2 bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
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


def _keys_of_seed(seed: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    key = jax.random.PRNGKey(seed)
    return key, jax.random.fold_in(key, 1)


_keys_of_seed_compiled = jax.jit(_keys_of_seed)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(`PRNGKey(seed)`, the run's base key `fold_in(PRNGKey(seed), 1)`): the initial weights and the end-of-run
    sample draw from the first, every step's and evaluation's keys come from the second.

    One compiled program (which the compilation cache keeps); computed eagerly, the two compile five small
    programs, ~0.5 s on a CPU before the model is built. A seed outside int32 is computed eagerly, as before.
    """
    if -(2**31) <= seed < 2**31:
        return _keys_of_seed_compiled(np.int32(seed))
    return _keys_of_seed(seed)


def step_keys(base_key: jax.Array, step: jax.Array | int, grad_accum_steps: int) -> tuple[jax.Array, jax.Array]:
    """(batch keys, dropout keys) of a step's micro-batches, each of shape (grad_accum_steps, ...)."""
    keys = jax.random.split(jax.random.fold_in(base_key, step), 2 * grad_accum_steps)
    return keys[:grad_accum_steps], keys[grad_accum_steps:]


def eval_key(base_key: jax.Array, step: int | jax.Array, split_index: int) -> jax.Array:
    """The key of split `split_index`'s evaluation batches at `step` (0: train, 1: val)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_key, EVAL_SALT), step), split_index)


def _loss(graphdef: nnx.GraphDef, params: nnx.State, x_BT: jax.Array, y_BT: jax.Array, key, use_dropout: bool):
    model = nnx.merge(graphdef, params)
    return loss_fn(model(x_BT, key=key if use_dropout else None), y_BT)


def make_train_chunk(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation | Callable[[dict], optax.GradientTransformation],
    *,
    batch_size: int,
    block_size: int,
    grad_accum_steps: int = 1,
    use_dropout: bool = False,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
    skip_nonfinite: bool = False,
    max_steps: int | None = None,
    lr_schedule: Callable | None = None,
    numbers: dict | None = None,
) -> Callable:
    """The jitted `train_chunk(params, opt_state, data, base_key, step0, *, n_steps)`, with `.lower` and `.prepare`
    (compile ahead in a thread; `.compiling()` says whether that still runs) taking the same arguments.

    With the data on the device and `max_steps`, one compiled program runs any n_steps <= max_steps (the
    step count is a loop bound, not a shape), so a run whose chunks differ in length compiles once.

    `data` is either the whole token array on the device (batches are drawn inside, with
    `jaxgpt.data`'s gather) or a pair of pre-drawn host batches `(x, y)` of shape
    (n_steps, grad_accum_steps, batch_size, block_size). Returns (params, opt_state, metrics) with
    metrics['loss'] (n_steps,): the mean micro-batch loss of each step, computed with the parameters before
    that step's update, and metrics['finite'] (n_steps,): whether the loss and the gradients were finite
    (host arrays when n_steps < max_steps: the call has then waited for the chunk).
    With `skip_nonfinite`, a step whose loss, gradients or updates are not finite changes neither the
    parameters nor the optimizer state.

    With a `mesh`, every batch is split over its ('data', 'fsdp') axes and params / opt_state keep the
    shardings of `jaxgpt.sharding.state_shardings` (`scan_layers`: the model stacks its blocks), in and out.
    With an `lr_schedule`, metrics['lr'] holds each step's learning rate (computed with the step, not after).

    With `numbers` (a dict of scalars: `jaxgpt.optim.recipe_numbers`), `tx` and `lr_schedule` are functions of them
    (`numbers -> GradientTransformation`, `numbers -> schedule`) and the program takes them as arguments, not as
    constants: runs that differ only in those numbers (a learning rate, a weight decay) share one compiled program.
    """
    grad_fn = jax.value_and_grad(partial(_loss, graphdef, use_dropout=use_dropout))

    def optimizer(numbers) -> tuple[optax.GradientTransformation, Callable | None]:  # numbers: traced, or None
        if numbers is None:
            return tx, lr_schedule
        return tx(numbers), lr_schedule and lr_schedule(numbers)

    def one_step(params, opt_state, data, base_key, step, xy_ABT, opt):
        batch_keys, drop_keys = step_keys(base_key, step, grad_accum_steps)

        def micro(grads, inputs):
            i, batch_key, drop_key = inputs
            if xy_ABT is None:
                x_BT, y_BT = data_lib.gather_batch(batch_key, data, batch_size, block_size)
            else:
                x_BT, y_BT = xy_ABT[0][i], xy_ABT[1][i]
            x_BT, y_BT = _constrain_batch(x_BT, mesh), _constrain_batch(y_BT, mesh)
            loss, g = grad_fn(params, x_BT, y_BT, drop_key)
            return (g if grads is None else jax.tree.map(jnp.add, grads, g)), loss

        if grad_accum_steps == 1:
            grads, loss = micro(None, (0, batch_keys[0], drop_keys[0]))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum_steps), batch_keys, drop_keys))
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            loss = losses.mean()
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if not skip_nonfinite:
            return new_params, new_opt_state, loss, finite
        keep_new = finite & _all_finite(updates)  # a NaN learning rate spoils the updates, not the gradients
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(keep_new, new, old),
                                         (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, loss, keep_new

    def train_chunk(params, opt_state, data, base_key, step0, n_steps, numbers, *, length: int):
        on_device = not isinstance(data, tuple)
        opt, schedule = optimizer(numbers)

        def body(i, carry):
            params, opt_state, metrics = carry
            xy = None if on_device else jax.tree.map(lambda a: a[i], data)
            params, opt_state, loss, ok = one_step(params, opt_state, data, base_key, step0 + i, xy, opt)
            new = {"loss": loss, "finite": ok}
            if schedule is not None:
                new["lr"] = jnp.asarray(schedule(step0 + i), jnp.float32)
            return params, opt_state, {k: metrics[k].at[i].set(v) for k, v in new.items()}

        params, opt_state = _constrain_state((params, opt_state), mesh, scan_layers)
        metrics = {"loss": jnp.zeros(length, jnp.float32), "finite": jnp.zeros(length, bool)}
        if schedule is not None:
            metrics["lr"] = jnp.zeros(length, jnp.float32)
        params, opt_state, metrics = jax.lax.fori_loop(0, n_steps, body, (params, opt_state, metrics))
        # Outputs sharded as the inputs were, so the donated buffers are reused.
        params, opt_state = _constrain_state((params, opt_state), mesh, scan_layers)
        return params, opt_state, metrics

    jitted = jax.jit(train_chunk, donate_argnames=("params", "opt_state"), static_argnames=("length",))

    def arguments(params, opt_state, data, base_key, step0, n_steps: int) -> tuple[tuple, dict]:
        on_device = not isinstance(data, tuple)
        if on_device and max_steps is not None and n_steps > max_steps:
            raise ValueError(f"n_steps={n_steps} is more than this train_chunk's max_steps={max_steps}")
        # The step count is a traced loop bound: every n_steps <= length shares one compiled program.
        length = (max_steps or n_steps) if on_device else n_steps
        return (params, opt_state, data, base_key, step0, jnp.int32(n_steps), numbers), {"length": length}

    ahead = CompiledAhead(jitted, name="jaxgpt-compile-train-step")  # programs by chunk length

    def call(params, opt_state, data, base_key, step0, *, n_steps: int):
        args, kwargs = arguments(params, opt_state, data, base_key, step0, n_steps)
        params, opt_state, metrics = ahead(kwargs["length"], args, kwargs)
        if kwargs["length"] == n_steps:
            return params, opt_state, metrics
        # Cut on the host: slicing on the device compiles a small program per dtype and length (~0.05 s each).
        return params, opt_state, {k: np.asarray(v)[:n_steps] for k, v in metrics.items()}

    def lower(params, opt_state, data, base_key, step0, *, n_steps: int):
        """The compiler's view of one call (`jax.stages.Lowered`), e.g. for its memory analysis."""
        args, kwargs = arguments(params, opt_state, data, base_key, step0, n_steps)
        return jitted.lower(*args, **kwargs)

    def prepare(params, opt_state, data, base_key, step0, *, n_steps: int) -> threading.Thread | None:
        """Starts compiling, in a thread, the program a call with arguments like these runs; that call then waits
        for it instead of compiling. Meanwhile the arguments may be used (only their shapes and shardings are
        read), e.g. by the first evaluation, whose own compiling and computing overlap this one's. Returns the
        thread, or None when the program is compiled or being compiled already."""
        args, kwargs = arguments(params, opt_state, data, base_key, step0, n_steps)
        return ahead.prepare(kwargs["length"], args, kwargs)

    call.lower, call.prepare, call.compiling = lower, prepare, ahead.compiling
    return call


class CompiledAhead:
    """The programs of one jitted function, compiled ahead in threads from its arguments' shapes.

    Compiling takes seconds on a CPU; started early (from `jax.ShapeDtypeStruct`s, while the weights are drawn
    and other programs compile), it overlaps other work. Programs are kept by a tag the caller chooses (a chunk
    length, say): a call with a tag whose program is compiled, or compiling, runs it (waiting if need be);
    any other call compiles on the call, as `jax.jit` does.
    """

    def __init__(self, jitted: Callable, *, name: str):
        self.jitted, self.name = jitted, name
        self.compiled: dict = {}
        self.preparing: dict[object, threading.Thread] = {}

    def prepare(self, tag, args: tuple, kwargs: dict) -> threading.Thread | None:
        """Starts compiling the program of `jitted(*args, **kwargs)` in a thread (None if `tag` has started)."""
        if tag in self.compiled or tag in self.preparing:
            return None

        def compile_ahead():
            with contextlib.suppress(Exception):  # the call then compiles the program itself, and raises what is wrong
                self.compiled[tag] = self.jitted.lower(*args, **kwargs).compile()

        self.preparing[tag] = in_background(compile_ahead, name=self.name)
        return self.preparing[tag]

    def __call__(self, tag, args: tuple, kwargs: dict):
        if tag in self.preparing:
            self.preparing.pop(tag).join()
        program = self.compiled.get(tag)
        return program(*args) if program else self.jitted(*args, **kwargs)

    def compiling(self) -> bool:
        """Whether a program `prepare` started is still compiling."""
        return any(thread.is_alive() for thread in list(self.preparing.values()))


def in_background(fn: Callable[[], None], *, name: str) -> threading.Thread:
    """Runs `fn` in a started thread under the caller's matmul precision (JAX keeps that setting per thread, and a
    program compiled under another precision would compute differently)."""
    precision = jax.config.jax_default_matmul_precision

    def run():
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            fn()

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def _all_finite(tree) -> jax.Array:
    """Whether every value of `tree` is finite, told by its global norm: a NaN or an infinity anywhere makes the norm
    one. The gradient clip computes the same norm, and XLA computes it once; per-leaf checks would add two
    kernels a leaf to compile. (A norm past float32's range, ~1.8e19, also counts as not finite.)"""
    return jnp.isfinite(optax.tree.norm(tree))


def make_estimate_loss(graphdef: nnx.GraphDef, *, batch_size: int, block_size: int, eval_iters: int,
                       mesh: Mesh | None = None) -> Callable:
    """The jitted `estimate_loss(params, splits, base_key, step) -> mean loss of each split` (no dropout), with
    `.prepare` (compile ahead in a thread) and `.lower` taking the same arguments.

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
        if isinstance(splits[0], tuple):  # pre-drawn batches
            xs, ys = (jnp.concatenate(parts) for parts in zip(*splits))
            windows = (xs, ys)
        else:  # where each batch's windows lie in the joined array
            lengths = [d.shape[0] for d in splits]
            starts = np.repeat(np.cumsum([0, *lengths[:-1]]), eval_iters).astype(np.int32)
            windows = (starts, np.repeat(lengths, eval_iters).astype(np.int32))
            tokens = jnp.concatenate(splits)

        def batch_loss(inputs):
            key, window = inputs
            if isinstance(splits[0], tuple):
                x_BT, y_BT = window
            else:
                x_BT, y_BT = data_lib.gather_batch(key, tokens, batch_size, block_size, start=window[0],
                                                   length=window[1])
            x_BT, y_BT = _constrain_batch(x_BT, mesh), _constrain_batch(y_BT, mesh)
            return _loss(graphdef, params, x_BT, y_BT, None, False)

        losses = jax.lax.map(batch_loss, (keys, windows))
        return tuple(losses.reshape(len(splits), eval_iters).mean(axis=1))

    ahead = CompiledAhead(jax.jit(estimate), name="jaxgpt-compile-estimate")  # programs by argument shapes

    def call(params, splits, base_key, step):
        args = (params, splits, base_key, step)
        return ahead(_shapes(args), args, {})

    def prepare(params, splits, base_key, step) -> threading.Thread | None:
        """Starts compiling, in a thread, the program a call with arguments like these (or their shapes) runs."""
        args = (params, splits, base_key, step)
        return ahead.prepare(_shapes(args), args, {})

    def lower(params, splits, base_key, step):
        """The compiler's view of one call (`jax.stages.Lowered`): its memory and cost analyses, or an ahead-of-time
        compile for other devices."""
        return ahead.jitted.lower(params, splits, base_key, step)

    call.prepare, call.lower = prepare, lower
    return call


def _shapes(tree) -> tuple:
    """A hashable summary of a tree of arrays (or their `jax.ShapeDtypeStruct`s): its structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)  # a Python int: its type


def _constrain_batch(x_BT: jax.Array, mesh: Mesh | None) -> jax.Array:
    return x_BT if mesh is None else sharding_lib.constrain_batch(x_BT, mesh)


def _constrain_state(tree, mesh: Mesh | None, scan_layers: bool):
    # The FSDP rule depends only on paths and shapes, so it gives the same shardings inside the trace.
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding_lib.state_shardings(tree, mesh, scan_layers))


@partial(jax.jit, static_argnames=("batch_size", "high"))
def _offsets(keys: jax.Array, *, batch_size: int, high: int) -> jax.Array:
    flat = jnp.reshape(keys, (-1, keys.shape[-1]))
    ix_NB = jax.vmap(lambda k: jax.random.randint(k, (batch_size,), 0, high))(flat)
    return ix_NB.reshape(*keys.shape[:-1], batch_size)


def batch_offsets(keys: jax.Array, batch_size: int, block_size: int, n_tokens: int) -> np.ndarray:
    """The window starts `gather_batch` draws with raw uint32 `keys` of shape (*lead, 2) from `n_tokens` tokens:
    an int array (*lead, batch_size) on the host. One small compiled program."""
    return np.asarray(_offsets(keys, batch_size=batch_size, high=n_tokens - block_size))


@partial(jax.jit, static_argnames=("n_steps", "grad_accum_steps", "batch_size", "high"))
def _step_offsets(base_key, step0, *, n_steps: int, grad_accum_steps: int, batch_size: int, high: int):
    keys = jax.vmap(lambda i: step_keys(base_key, step0 + i, grad_accum_steps)[0])(jnp.arange(n_steps))
    return _offsets(keys, batch_size=batch_size, high=high)


def step_offsets(base_key: jax.Array, a: int, b: int, *, grad_accum_steps: int, batch_size: int, block_size: int,
                 n_tokens: int) -> np.ndarray:
    """The window starts of the training batches of steps [a, b), (b - a, grad_accum_steps, batch_size) on the host:
    those the on-device step draws (`step_keys`). One small compiled program per chunk length."""
    return np.asarray(_step_offsets(base_key, np.int32(a), n_steps=b - a, grad_accum_steps=grad_accum_steps,
                                    batch_size=batch_size, high=n_tokens - block_size))


def windows(data: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y int32 (*offsets.shape, block_size): the windows of `data` starting at `offsets`, read on the host."""
    tokens = np.asarray(data[offsets[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    return tokens[..., :-1], tokens[..., 1:]


def host_batches(data: np.ndarray, keys: jax.Array, batch_size: int, block_size: int,
                 rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """The batches `gather_batch` draws with raw uint32 `keys` of shape (*lead, 2), gathered on the host from `data`.

    For datasets kept off the device (large np.memmap): the same offsets as the on-device path, so both
    paths train on the same windows. Only the batch rows `rows` are read. Returns x, y int32 of shape
    (*lead, rows, block_size).
    """
    return windows(data, batch_offsets(keys, batch_size, block_size, len(data))[..., rows], block_size)


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
                 for a in windows(data, offsets[..., rows], block_size))
