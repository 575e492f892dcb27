"""nanoGPT's optimiser recipe in Optax.

AdamW whose weight decay touches only parameters with >= 2 dimensions (matmul weights and
embeddings; not biases or LayerNorm gains), a global-norm gradient clip, and nanoGPT's learning rate
schedule: linear warmup, cosine decay to `min_lr`, then constant.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.layout import is_stacked_layer


def get_lr(
    it: int | jax.Array,
    *,
    learning_rate: float,
    warmup_iters: int,
    lr_decay_iters: int,
    min_lr: float,
) -> jax.Array:
    """nanoGPT's `get_lr`: the learning rate for iteration `it` (0-based). Works on traced `it`."""
    it = jnp.asarray(it, jnp.float32)
    warmup = learning_rate * (it + 1) / (warmup_iters + 1)
    span = max(lr_decay_iters - warmup_iters, 1)
    decay_ratio = jnp.clip((it - warmup_iters) / span, 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)
    return jnp.where(it < warmup_iters, warmup, jnp.where(it > lr_decay_iters, min_lr, cosine))


def lr_schedule(
    learning_rate: float,
    *,
    decay_lr: bool = True,
    warmup_iters: int = 0,
    lr_decay_iters: int = 1,
    min_lr: float = 0.0,
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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
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
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """Clip the global gradient norm to `grad_clip` (0 disables), then AdamW with nanoGPT's decay mask."""
    tx = optax.adamw(learning_rate, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if grad_clip and grad_clip > 0:
        tx = optax.chain(clip_by_global_norm(grad_clip), tx)
    return tx


def schedule_from_config(config) -> optax.Schedule:
    """The learning-rate schedule of a training config (`jaxgpt.config`: learning_rate, decay_lr, warmup_iters, ...)."""
    return lr_schedule(config.learning_rate, decay_lr=config.decay_lr, warmup_iters=config.warmup_iters,
                       lr_decay_iters=config.lr_decay_iters, min_lr=config.min_lr)


def make_optimizer(config) -> optax.GradientTransformation:
    """nanoGPT's AdamW recipe with a training config's schedule, decay, betas and clip."""
    return adamw(schedule_from_config(config), weight_decay=config.weight_decay, beta1=config.beta1,
                 beta2=config.beta2, grad_clip=config.grad_clip)
