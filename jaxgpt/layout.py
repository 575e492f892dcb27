"""The two parameter layouts of a GPT's blocks, and moving between them.

Per layer (the default): `h.0`, `h.1`, ... each hold one Block's parameters, as nanoGPT's state dict names
them. Stacked (`GPTConfig.scan_layers`): one Block under `h` whose every parameter has a leading `n_layer`
axis, so the forward pass is one `lax.scan` and compiles once whatever the depth. Optimizer moments
mirror the parameters, so the same functions move them too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def variable_value(leaf: Any) -> Any:
    """A state leaf's value: an `nnx.Variable`'s array (or shape), any other leaf as it is.

    Flax 0.12.0's Variable has no `get_value()`, and later versions deprecate its `.value`: this takes either.
    """
    if not isinstance(leaf, nnx.Variable):
        return leaf
    return leaf.get_value() if hasattr(type(leaf), "get_value") else leaf.value


def _key(entry) -> object:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))


def is_stacked_layer(path: tuple) -> bool:
    """Whether a pytree path points into stacked blocks: under 'h' with no integer layer key after it."""
    keys = [_key(k) for k in path]
    return "h" in keys and not any(isinstance(k, int) for k in keys[keys.index("h") + 1 :])


def stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
    """One module holding the parameters of `blocks` (all alike) stacked along a new leading layer axis."""
    graphdef, *states = (nnx.split(blocks[0])[0], *(nnx.state(b) for b in blocks))
    return nnx.merge(graphdef, jax.tree.map(lambda *layers: jnp.stack(layers), *states))


def _raw(state) -> dict:
    """The nested dicts inside an nnx.State (its sub-states are plain dicts), or a plain mapping's copy."""
    return dict(state.raw_mapping) if isinstance(state, nnx.State) else dict(state)


def stack_layers(state: nnx.State) -> nnx.State:
    """A GPT state with per-layer blocks (`h.0`, `h.1`, ...) -> the stacked form (`h` with a layer axis).

    Works on any state of the model's structure (params, or an optimizer moment such as Adam's mu).
    """
    raw = _raw(state)
    layers = raw["h"]
    n_layer = len(layers)
    if sorted(layers.keys()) != list(range(n_layer)):
        raise ValueError("stack_layers expects per-layer blocks under 'h' (keys 0..n_layer-1): is it stacked already?")
    raw["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(n_layer)))
    return nnx.State(raw)


def unstack_layers(state: nnx.State) -> nnx.State:
    """The stacked form (`h` with a leading layer axis) -> per-layer blocks `h.0`, `h.1`, ..."""
    raw = _raw(state)
    stacked = raw["h"]
    if any(isinstance(k, int) for k in stacked.keys()):
        raise ValueError("unstack_layers expects stacked blocks under 'h': it holds per-layer blocks already")
    n_layer = jax.tree.leaves(stacked)[0].shape[0]
    raw["h"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layer)}
    return nnx.State(raw)


def with_layout(model: nnx.Module, scan_layers: bool) -> nnx.Module:
    """The same weights in the other layout: a new model of the same class with `config.scan_layers` set."""
    if model.config.scan_layers == scan_layers:
        return model
    config = dataclasses.replace(model.config, scan_layers=scan_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0))))
    state = nnx.state(model)
    return nnx.merge(graphdef, stack_layers(state) if scan_layers else unstack_layers(state))
