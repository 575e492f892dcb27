"""nanoGPT's optimiser recipe in Optax, and Muon beside it.

AdamW whose weight decay touches only parameters with >= 2 dimensions (matmul weights and
embeddings; not biases or LayerNorm gains), a global-norm gradient clip, and nanoGPT's learning rate
schedule: linear warmup, cosine decay to `min_lr`, then constant.

`optimizer='muon'` (modded-nanogpt's recipe, through `optax.contrib.scale_by_muon`) gives the blocks' 2-D weight
matrices Muon, whose update is the Nesterov momentum orthogonalised by Newton-Schulz steps, and keeps the AdamW
above for the rest (embeddings, the output layer, LayerNorm gains, biases); same clip, same schedule's shape.

The recipe's numbers (`NUMBERS`: the learning rates, warmup and decay lengths, weight decay, betas, clip) may be
traced values: a training step that takes them as arguments (`recipe_numbers`) is one compiled program for every
learning rate, so a rerun that changes only a number finds that program in the compilation cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

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


OPTIMIZERS = ("adamw", "muon")

# The config's numbers that the compiled training step takes as arguments (`recipe_numbers`).
NUMBERS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")
# And Muon's, when the config's optimizer is 'muon'.
MUON_NUMBERS = ("muon_learning_rate", "muon_momentum", "muon_weight_decay")


def optimizer_name(config) -> str:
    """The config's `optimizer`; a recipe object without one (a namespace of the `NUMBERS`) is nanoGPT's 'adamw'."""
    name = getattr(config, "optimizer", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return name


def number_names(config) -> tuple[str, ...]:
    """The names of the numbers `config`'s optimizer takes: `NUMBERS`, plus `MUON_NUMBERS` for Muon."""
    return NUMBERS + (MUON_NUMBERS if optimizer_name(config) == "muon" else ())


def recipe_numbers(config) -> dict[str, np.float32]:
    """A training config's numbers (`number_names`) as float32 scalars, for `make_optimizer(config, numbers)`
    inside a compiled step.

    Passed to the step as arguments, not closed over as constants: runs that differ only in these numbers (another
    learning rate, say) share one program, which the compilation cache then keeps for the next run.
    """
    return {name: np.float32(getattr(config, name)) for name in number_names(config)}


def _numbers(config, numbers: Mapping | None) -> Mapping:
    """`numbers`, or the config's own (any object with the numbers as attributes: a ConfigDict, a namespace)."""
    return numbers if numbers is not None else {name: getattr(config, name) for name in number_names(config)}


def schedule_from_config(config, numbers: Mapping | None = None) -> optax.Schedule:
    """The learning-rate schedule of a training config (`jaxgpt.config`: learning_rate, decay_lr, warmup_iters, ...),
    with `numbers` (`recipe_numbers`, traced or not) in place of the config's own values."""
    n = _numbers(config, numbers)
    return lr_schedule(n["learning_rate"], decay_lr=config.decay_lr, warmup_iters=n["warmup_iters"],
                       lr_decay_iters=n["lr_decay_iters"], min_lr=n["min_lr"])


def make_optimizer(config, numbers: Mapping | None = None) -> optax.GradientTransformation:
    """A training config's optimizer: nanoGPT's AdamW recipe with its schedule, decay, betas and clip, or with
    `optimizer='muon'` the `muon` recipe; with `numbers` (`recipe_numbers`, traced or not) in place of the config's
    values. Whether it clips is the config's choice.

    Every state it makes starts as zeros (the training loop builds the first state from its shapes as zeros, with
    nothing to compile, rather than calling `init`).
    """
    n = _numbers(config, numbers)
    grad_clip = n["grad_clip"] if config.grad_clip > 0 else 0.0
    if optimizer_name(config) == "adamw":
        return adamw(schedule_from_config(config, numbers), weight_decay=n["weight_decay"], beta1=n["beta1"],
                     beta2=n["beta2"], grad_clip=grad_clip)
    # Muon's learning rate on AdamW's warm-up and decay, peaking at its own, with min_lr scaled in the same ratio.
    ratio = n["muon_learning_rate"] / n["learning_rate"]
    muon_schedule = lr_schedule(n["muon_learning_rate"], decay_lr=config.decay_lr, warmup_iters=n["warmup_iters"],
                                lr_decay_iters=n["lr_decay_iters"], min_lr=n["min_lr"] * ratio)
    return muon(muon_schedule, schedule_from_config(config, numbers), momentum=n["muon_momentum"],
                nesterov=config.muon_nesterov,
                ns_steps=config.muon_ns_steps, muon_weight_decay=n["muon_weight_decay"],
                weight_decay=n["weight_decay"], beta1=n["beta1"], beta2=n["beta2"], grad_clip=grad_clip)


# --------------------------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------------------------


def is_muon_matrix(path: tuple, leaf) -> bool:
    """Whether a parameter gets Muon: a weight matrix inside the blocks ('h'), i.e. two dimensions besides a
    `scan_layers` stack's layer axis (the attention and MLP kernels, the lecture's per-head ones too).

    The embeddings and the output layer are matrices too but stay with AdamW, as in modded-nanogpt: their rows are
    looked up or scored one token at a time, not a linear map whose singular values Muon evens out.
    """
    in_block = any(getattr(k, "key", None) == "h" for k in path)
    return in_block and jnp.ndim(leaf) - int(is_stacked_layer(path)) == 2


def muon_labels(params) -> object:
    """'muon' for the leaves `is_muon_matrix` picks, 'adamw' for the others: `optax.partition`'s labels."""
    return jax.tree_util.tree_map_with_path(lambda path, p: "muon" if is_muon_matrix(path, p) else "adamw", params)


def _matrix_axes(updates) -> object:
    """Muon's dimension numbers for every leaf given it: the last two axes are the matrix (in, out), any leading
    one (the layer axis of stacked blocks) a batch of matrices, each orthogonalised on its own."""
    return jax.tree.map(lambda _: optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1), updates)


class MuonMomentumState(NamedTuple):
    """`optax.contrib.MuonState` without its Newton-Schulz coefficients: only what starts at zero and changes."""

    count: jax.Array
    mu: optax.Updates


def scale_by_muon(*, momentum: float | jax.Array = 0.95, nesterov: bool = True,
                  ns_steps: int = 5) -> optax.GradientTransformation:
    """`optax.contrib.scale_by_muon` (Optax's default Newton-Schulz coefficients) on matrices or stacks of them
    (`_matrix_axes`), its state holding only the step count and the momentum.

    Optax's state also holds the coefficients, a constant: kept out of it here so that a state of zeros is the
    initial state, as `make_optimizer` promises, and checkpoints hold only what training changes.
    """
    inner = optax.contrib.scale_by_muon(ns_steps=ns_steps, beta=momentum, nesterov=nesterov,
                                        weight_dimension_numbers=_matrix_axes)

    def init(params) -> MuonMomentumState:
        state = inner.init(params)
        return MuonMomentumState(state.count, state.mu)

    def update(updates, state: MuonMomentumState, params=None):
        del params  # Muon reads only the gradients and its momentum
        coefficients = inner.init({}).ns_coeffs  # Optax's, as its own init makes them
        stack, unstack = _stacking_by_shape(updates)
        stacked, new = inner.update(stack(updates), optax.contrib.MuonState(state.count, stack(state.mu),
                                                                            coefficients))
        return unstack(stacked), MuonMomentumState(new.count, unstack(new.mu))

    return optax.GradientTransformation(init, update)


def _stacking_by_shape(tree) -> tuple[Callable, Callable]:
    """(stack, unstack) for trees shaped like `tree`: its same-shaped leaves as one array each (a list), and back.

    Muon orthogonalises every matrix on its own; stacked, the matrices of one shape (a layer's query/key/value
    kernels, one per block) go through one batched Newton-Schulz chain instead of one chain each. The numbers are
    the same; an H100 program of shakespeare_char_speedrun_gpu launches 1,246 kernels a step unstacked, about 600
    stacked (benchmarks/bench_targets.py), the difference being 24 chains against 4.
    """
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault((jnp.shape(leaf), jnp.result_type(leaf)), []).append(i)

    def stack(t) -> list[jax.Array]:
        ls = treedef.flatten_up_to(t)
        return [jnp.stack([ls[i] for i in members]) for members in groups.values()]

    def unstack(stacked: list[jax.Array]):
        ls = [None] * len(leaves)
        for members, array in zip(groups.values(), stacked):
            for j, i in enumerate(members):
                ls[i] = array[j]
        return treedef.unflatten(ls)

    return stack, unstack


def scale_by_width() -> optax.GradientTransformation:
    """Each orthogonalised update times sqrt(max(1, fan_out / fan_in)), the width scaling of `optax.contrib.muon`
    and Keller Jordan's Muon, so that its RMS per input unit does not shrink as the output grows. Stateless."""

    def scale(u: jax.Array) -> jax.Array:
        fan_in, fan_out = u.shape[-2], u.shape[-1]
        return jnp.sqrt(jnp.maximum(1, fan_out / fan_in)) * u

    def update(updates, state, params=None):
        del params
        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def muon(
    learning_rate: float | optax.Schedule,
    adamw_learning_rate: float | optax.Schedule,
    *,
    momentum: float | jax.Array = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    muon_weight_decay: float | jax.Array = 0.0,
    weight_decay: float | jax.Array = 0.1,
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.95,
    eps: float = 1e-8,
    grad_clip: float | jax.Array = 1.0,
) -> optax.GradientTransformation:
    """Clip the global gradient norm to `grad_clip` (as `adamw`), then Muon at `learning_rate` for the leaves
    `muon_labels` marks and nanoGPT's AdamW at `adamw_learning_rate` for the others.

    Muon's part is `optax.contrib.muon`'s: the orthogonalised momentum, width-scaled, plus `muon_weight_decay`
    times the weights, times the learning rate. AdamW's part has no Nesterov momentum and decays only >= 2-D
    leaves, where `optax.contrib.muon`'s AdamW shares Muon's `nesterov` and decays every leaf: hence a partition
    of our own.
    """
    muon_tx = optax.chain(
        scale_by_muon(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps),
        scale_by_width(),
        optax.add_decayed_weights(muon_weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw_tx = optax.adamw(adamw_learning_rate, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask)
    tx = optax.partition({"adamw": adamw_tx, "muon": muon_tx}, muon_labels)
    if isinstance(grad_clip, jax.Array) or grad_clip > 0:
        tx = optax.chain(clip_by_global_norm(grad_clip), tx)
    return tx
