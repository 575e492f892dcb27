"""The dense layers' matmul, with a backward pass laid out for XLA's CPU GEMMs.

`nnx.Linear` takes a `dot_general`; jaxgpt's layers pass `dense_dot_general`, which is `lax.dot_general`
everywhere except on CPU devices, where the weight gradient is computed as (g^T x)^T instead of
x^T g. Both are the same products and sums; the second leaves the activations in their natural layout,
which XLA's CPU backend otherwise transposes with strided reads inside the fusions that produce them.
GPUs and TPUs take transposed GEMM operands natively, so they keep the plain dot. Several CPU devices (a CPU's
cores as a data-parallel mesh, `mesh.cpu_devices`) take the CPU form too: each one runs the same CPU GEMMs. The
choice follows the devices the program is compiled for (`jaxgpt.target`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt import target


def dot_f32_acc(a: jax.Array, b: jax.Array, dimension_numbers=None) -> jax.Array:
    """`lax.dot_general` accumulating in float32, cast back to the operands' dtype (default: a @ b).

    The same as the plain dot for float32. For bfloat16 it is what mixed precision means, and XLA's CPU
    backend runs bf16 x bf16 -> f32 GEMMs on the CPU's bf16 units, while bf16 -> bf16 takes a slower path.
    """
    dimension_numbers = dimension_numbers or (((a.ndim - 1,), (0,)), ((), ()))
    out = jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(a, b))


@jax.custom_vjp
def matmul_cpu(x_NK: jax.Array, w_KM: jax.Array) -> jax.Array:
    """x @ w whose weight gradient is computed as (g^T x)^T (see the module docstring)."""
    return dot_f32_acc(x_NK, w_KM)


def _matmul_cpu_fwd(x_NK, w_KM):
    return dot_f32_acc(x_NK, w_KM), (x_NK, w_KM)


def _matmul_cpu_bwd(residuals, g_NM):
    # The weight gradient contracts over batch·time, the major axis of both x and g: g^T x, then a
    # transpose of that weight-sized result, instead of transposing the activations.
    x_NK, w_KM = residuals
    K, M = w_KM.shape
    dw_MK = dot_f32_acc(g_NM.reshape(-1, M), x_NK.reshape(-1, K), (((0,), (0,)), ((), ())))
    dx_NK = dot_f32_acc(g_NM, w_KM.T)
    return dx_NK.astype(x_NK.dtype), dw_MK.T.astype(w_KM.dtype)


matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nnx.Linear`'s dot: `matmul_cpu` for a plain x @ W on CPU devices, else `lax.dot_general`."""
    plain = (
        target.platform() != "cpu"
        or rhs.ndim != 2
        or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ()))
        or preferred_element_type is not None
        or kwargs.get("out_sharding") is not None
    )
    if plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    return matmul_cpu(lhs, rhs)
