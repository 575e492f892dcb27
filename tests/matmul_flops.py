"""An independent FLOP count for the MFU tests: the matrix multiplications a GPT training step traces.

nanoGPT's estimate (6N + 12·L·T·C per token) is a formula; this counts `dot_general`s in the jaxpr of
the loss gradient instead, so a wrong formula, a wrong parameter count or a model that does more or
fewer matmuls than the estimate assumes shows up as a difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.extend import core as jex_core

from jaxgpt.layout import variable_value


def dot_flops(jaxpr: jex_core.Jaxpr) -> int:
    """2 x multiply-adds of every dot_general in `jaxpr`, scans counted `length` times."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
            continue
        if name in ("cond", "while"):  # no fixed count of FLOPs: the model's step has none
            raise NotImplementedError(f"cannot count the matmul FLOPs through {name}")
        repeat = eqn.params["length"] if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    total += repeat * dot_flops(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    total += repeat * dot_flops(sub)
    return total


def training_matmul_flops_per_token(model: nnx.Module, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward and backward through `model` (abstract: nothing is computed)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    idx = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)

    def loss(p, idx):
        logits = nnx.merge(graphdef, p, rest)(idx)
        return optax.softmax_cross_entropy_with_integer_labels(logits, idx).mean()

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return dot_flops(jax.make_jaxpr(jax.grad(loss))(abstract, idx).jaxpr) / seq_len


def vector_params(model: nnx.Module) -> int:
    """LayerNorm gains and biases (stacked per layer or not): in nanoGPT's N, but in no matmul."""
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return sum(int(np.prod(variable_value(v).shape)) for path, v in leaves if path[-1] in ("scale", "bias"))
