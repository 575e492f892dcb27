"""Conversion between jaxgpt's NNX state and nanoGPT-style PyTorch state dicts.

The mapping is mechanical because the module names are nanoGPT's:

    NNX path                       torch name                             value
    wte/embedding                  transformer.wte.weight                 as is
    h/0/attn/c_attn/kernel         transformer.h.0.attn.c_attn.weight     transposed ((in, out) vs (out, in))
    h/0/ln_1/scale                 transformer.h.0.ln_1.weight            as is
    lm_head/kernel                 lm_head.weight                         transposed

Non-parameter buffers of nanoGPT (the causal mask `attn.bias`, `attn.masked_bias`) are ignored, as is
torch.compile's `_orig_mod.` prefix. With tied embeddings the torch dict carries the shared matrix
twice (`transformer.wte.weight` and `lm_head.weight`); jaxgpt holds it once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.layout import unstack_layers, variable_value, with_layout
from jaxgpt.model import GPT, GPTConfig

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
BUFFER_NAME = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def torch_name(path: tuple) -> tuple[str, bool]:
    """The torch state-dict name of an NNX parameter path, and whether the value is transposed."""
    *modules, leaf = (str(p) for p in path)
    name = ".".join([*modules, _LEAF_NAMES[leaf]])
    if modules[0] != "lm_head":
        name = "transformer." + name
    return name, leaf == "kernel"


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def strip_prefix(state_dict: Mapping) -> dict:
    """Removes torch.compile's `_orig_mod.` prefix from the keys, as nanoGPT's loader does."""
    prefix = "_orig_mod."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def from_torch_state_dict(config: GPTConfig, state_dict: Mapping) -> GPT:
    """Builds a `GPT` for `config` holding the weights of a nanoGPT-style state dict.

    Accepts torch tensors or numpy arrays. A missing tensor, a tensor of the wrong shape or an
    unexpected parameter raises a `ValueError` naming it (and both shapes).
    """
    state_dict = strip_prefix(state_dict)
    if config.scan_layers:  # torch names are per layer: convert unstacked, then stack
        return with_layout(from_torch_state_dict(dataclasses.replace(config, scan_layers=False), state_dict), True)
    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    used = set()
    leaves = []
    for path, variable in nnx.to_flat_state(params):
        name, transpose = torch_name(path)
        expected = tuple(variable.shape[::-1] if transpose else variable.shape)
        if name not in state_dict:
            raise ValueError(f"state dict has no tensor {name!r} (expected shape {expected})")
        value = to_numpy(state_dict[name])
        if value.shape != expected:
            raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)} but the model expects {expected}")
        value = value.T if transpose else value
        # jnp.array copies: a zero-copy view of a torch tensor would change when torch trains in place.
        leaves.append((path, variable.replace(jnp.array(value, dtype=variable.dtype))))
        used.add(name)
    if config.tie_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(k for k in state_dict if k not in used and not BUFFER_NAME.match(k))
    if unexpected:
        raise ValueError(f"state dict has parameters the model does not: {unexpected[:5]} (check the config)")
    params = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, params, rest)


def to_torch_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """nanoGPT-style state dict (numpy arrays) of `model`; tied models also carry `lm_head.weight`."""
    out: dict[str, np.ndarray] = {}
    model = with_layout(model, scan_layers=False)  # torch names are per layer
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = torch_name(path)
        value = np.asarray(variable[...])
        out[name] = np.ascontiguousarray(value.T) if transpose else value
    if model.config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading or writing PyTorch checkpoints needs torch: pip install 'jaxgpt[interop]'") from None
    return torch


def torch_named(tree, config: GPTConfig) -> dict[str, np.ndarray]:
    """Any parameter-shaped tree (a model, or Adam moments) as torch-named, torch-laid-out arrays."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    if config.scan_layers and "h" in state and not any(isinstance(k, int) for k in state["h"].keys()):
        state = unstack_layers(state)
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        name, transpose = torch_name(path)
        value = variable_value(leaf)
        if isinstance(value, jax.ShapeDtypeStruct):
            out[name] = value
            continue
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(value.T) if transpose else value
    return out
