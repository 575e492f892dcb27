"""nanoGPT's optimiser recipe in Optax.

AdamW whose weight decay touches only parameters with >= 2 dimensions (matmul weights and
embeddings; not biases or LayerNorm gains), a global-norm gradient clip, and nanoGPT's learning rate
schedule: linear warmup, cosine decay to `min_lr`, then constant.

The recipe's numbers (`NUMBERS`: the learning rates, warmup and decay lengths, weight decay, betas, clip) may be
traced values: a training step that takes them as arguments (`recipe_numbers`) is one compiled program for every
learning rate, so a rerun that changes only a number finds that program in the compilation cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.layout import is_stacked_layer


def get_lr(
    it: int | jax.Array,
    *,
    learning_rate: float | jax.Array,
    warmup_iters: int | jax.Array,
    lr_decay_iters: int | jax.Array,
    min_lr: float | jax.Array,
) -> jax.Array:
    """nanoGPT's `get_lr`: the learning rate for iteration `it` (0-based). Works on traced `it` and numbers."""
    it = jnp.asarray(it, jnp.float32)
    warmup = learning_rate * (it + 1) / (warmup_iters + 1)
    span = jnp.maximum(lr_decay_iters - warmup_iters, 1)
    decay_ratio = jnp.clip((it - warmup_iters) / span, 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)
    return jnp.where(it < warmup_iters, warmup, jnp.where(it > lr_decay_iters, min_lr, cosine))


def lr_schedule(
    learning_rate: float | jax.Array,
    *,
    decay_lr: bool = True,
    warmup_iters: int | jax.Array = 0,
    lr_decay_iters: int | jax.Array = 1,
    min_lr: float | jax.Array = 0.0,
) -> optax.Schedule:
    """An Optax schedule (a function of the update count) for nanoGPT's settings."""
    if not decay_lr:
        return optax.constant_schedule(learning_rate)
    return lambda count: get_lr(
        count,
        learning_rate=learning_rate,
        warmup_iters=warmup_iters,
        lr_decay_iters=lr_decay_iters,
        min_lr=min_lr,
    )


def decay_mask(params) -> object:
    """True for the leaves that get weight decay: those with ndim >= 2 (nanoGPT's rule).

    A `scan_layers` model stacks its blocks along a leading layer axis under 'h': there a leaf decays
    when it has >= 2 dimensions besides that axis, so stacked biases and LayerNorm gains stay undecayed.
    """

    def rule(path, p):
        return np.bool_(jnp.ndim(p) - int(is_stacked_layer(path)) >= 2)  # indexable with [...] like the leaves

    return jax.tree_util.tree_map_with_path(rule, params)


def clip_by_global_norm(max_norm: float | jax.Array) -> optax.GradientTransformation:
    """PyTorch's `clip_grad_norm_` as nanoGPT calls it: every gradient times min(1, max_norm / (norm + 1e-6)).

    One scalar factor for every leaf, where optax's clip divides each leaf by the norm: besides being nanoGPT's
    formula, a multiply by a scalar is folded by XLA into each leaf's AdamW update, where a divide is kept as a
    kernel of its own (27 fewer kernels to compile in the CPU recipe's step). Stateless, like optax's.
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float | jax.Array = 0.1,
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.95,
    eps: float = 1e-8,
    grad_clip: float | jax.Array = 1.0,
) -> optax.GradientTransformation:
    """Clip the global gradient norm to `grad_clip` (a number <= 0 disables it; a traced one always clips), then
    AdamW with nanoGPT's decay mask."""
    tx = optax.adamw(learning_rate, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if isinstance(grad_clip, jax.Array) or grad_clip > 0:
        tx = optax.chain(clip_by_global_norm(grad_clip), tx)
    return tx


# The config's numbers that the compiled training step takes as arguments (`recipe_numbers`).
NUMBERS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")


def recipe_numbers(config) -> dict[str, np.float32]:
    """A training config's `NUMBERS` as float32 scalars, for `make_optimizer(config, numbers)` inside a compiled step.

    Passed to the step as arguments, not closed over as constants: runs that differ only in these numbers (another
    learning rate, say) share one program, which the compilation cache then keeps for the next run.
    """
    return {name: np.float32(getattr(config, name)) for name in NUMBERS}


def _numbers(config, numbers: Mapping | None) -> Mapping:
    """`numbers`, or the config's own (any object with the `NUMBERS` as attributes: a ConfigDict, a namespace)."""
    return numbers if numbers is not None else {name: getattr(config, name) for name in NUMBERS}


def schedule_from_config(config, numbers: Mapping | None = None) -> optax.Schedule:
    """The learning-rate schedule of a training config (`jaxgpt.config`: learning_rate, decay_lr, warmup_iters, ...),
    with `numbers` (`recipe_numbers`, traced or not) in place of the config's own values."""
    n = _numbers(config, numbers)
    return lr_schedule(n["learning_rate"], decay_lr=config.decay_lr, warmup_iters=n["warmup_iters"],
                       lr_decay_iters=n["lr_decay_iters"], min_lr=n["min_lr"])


def make_optimizer(config, numbers: Mapping | None = None) -> optax.GradientTransformation:
    """nanoGPT's AdamW recipe with a training config's schedule, decay, betas and clip; with `numbers`
    (`recipe_numbers`, traced or not) in place of the config's values. Whether it clips is the config's choice."""
    n = _numbers(config, numbers)
    return adamw(schedule_from_config(config, numbers), weight_decay=n["weight_decay"], beta1=n["beta1"],
                 beta2=n["beta2"], grad_clip=n["grad_clip"] if config.grad_clip > 0 else 0.0)
