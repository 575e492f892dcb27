"""Causal flash attention with attention dropout, for NVIDIA GPUs: three Pallas kernels that Triton compiles.

nanoGPT trains `shakespeare_char` with dropout 0.2 on the attention weights, and PyTorch's fused SDPA applies it
inside the kernel. cuDNN's fused attention also takes a dropout rate, but JAX gives it the random seed as a
compile-time constant: every step would drop the same weights. Without a fused kernel the weights are B·H·T·T
float32 scores in memory, several times a layer. These kernels keep the (T, S) scores in on-chip memory, block
by block, and draw the dropout mask inside them from a counter-based hash of (seed, batch row, head, query,
key): the same mask in the forward and the backward pass, a fresh one each step (the seed comes from the step's
dropout key, so a resumed run draws the same masks) and Bernoulli(1 - rate) element by element (`keep_mask`).

    softmax(q·kᵀ / √D) with causal masking   -> P        (online: running max and sum, never stored)
    dropout: P · keep / (1 - rate)            -> O = (P · keep / (1 - rate)) · v

Used by `attention.dot_product_attention` in GPU programs with attention dropout. `interpret=True` runs
the same kernels on any backend (the tests check them on a CPU against `reference`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxgpt.dropout import keep_mask

BLOCK = 64  # query and key rows a kernel instance holds: (64, 64) scores fit in registers with D up to 128
MIN_COMPUTE_CAPABILITY = (8, 0)  # XLA compiles Triton kernels for Ampere and newer only (a T4, 7.5, takes the ladder)


def fits(q_BTHD: jax.Array, k_BSHD: jax.Array) -> bool:
    """Whether the kernels take these arrays: self-attention, whole blocks, a power-of-two head size (Triton),
    16- or 32-bit floats."""
    T, S, D = q_BTHD.shape[1], k_BSHD.shape[1], q_BTHD.shape[-1]
    return (q_BTHD.ndim == 4 and T == S and T % BLOCK == 0 and D in (16, 32, 64, 128) and T * S < 2**31
            and q_BTHD.dtype in (jnp.float32, jnp.bfloat16, jnp.float16))


def reference(q_BTHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *, rate: float, key: jax.Array) -> jax.Array:
    """`attention` written out with the (T, S) weights in memory: causal softmax, then the same `keep_mask`."""
    B, T, H, D = q_BTHD.shape
    seed = jax.random.bits(key, (1,), jnp.uint32)[0]
    S = k_BSHD.shape[1]
    s = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BSHD, preferred_element_type=jnp.float32) / math.sqrt(D)
    rows, cols = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    p = jax.nn.softmax(jnp.where(cols <= rows, s, -jnp.inf), axis=-1)
    heads = jnp.arange(B * H).reshape(B, H, 1, 1)
    keep = keep_mask(seed, heads, rows, cols, S, rate)
    p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", p.astype(v_BSHD.dtype), v_BSHD,
                      preferred_element_type=jnp.float32).astype(q_BTHD.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The kernels: one instance per (batch row, head, block of BLOCK rows)
# ---------------------------------------------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a·b accumulated in float32, the operands as they come (16-bit: Triton's tensor-core dot; float32: the
    precision `jax.default_matmul_precision` says, TF32 by default as in XLA's GPU dots)."""
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _block_ids(seed_ref) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the mask's seed, this instance's head b·H + h counted over the whole batch, its block along the sequence).

    `seed_ref` holds the seed and the batch row this shard starts at: a batch split over devices draws the masks
    one device would."""
    b = seed_ref[1].astype(jnp.int32) + pl.program_id(0)
    return seed_ref[0], b * pl.num_programs(1) + pl.program_id(1), pl.program_id(2)


def _scores_and_keep(q, k, i_q, j_k, head, seed, n_cols, scale, rate):
    """The (BLOCK, BLOCK) scaled scores of query block i_q against key block j_k, their causal mask and keep mask."""
    rows = i_q * BLOCK + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
    cols = j_k * BLOCK + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
    s = _dot(q, k, trans_b=True) * scale
    return s, cols <= rows, keep_mask(seed, head, rows, cols, n_cols, rate)


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, rate: float):
    seed, head, i_q = _block_ids(seed_ref)
    n_cols = k_ref.shape[0]
    q = q_ref[...]

    def one_key_block(j_k, carry):
        m, l, acc = carry  # running max, running sum of exp, unnormalised output
        k = k_ref[pl.ds(j_k * BLOCK, BLOCK), :]
        v = v_ref[pl.ds(j_k * BLOCK, BLOCK), :]
        s, causal, keep = _scores_and_keep(q, k, i_q, j_k, head, seed, n_cols, scale, rate)
        s = jnp.where(causal, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + _dot(jnp.where(keep, p, 0.0).astype(v.dtype), v)
        return m_new, l, acc

    D = q.shape[-1]
    init = (jnp.full((BLOCK,), -jnp.inf, jnp.float32), jnp.zeros((BLOCK,), jnp.float32),
            jnp.zeros((BLOCK, D), jnp.float32))
    m, l, acc = lax.fori_loop(0, i_q + 1, one_key_block, init)  # causal: key blocks up to the diagonal
    o_ref[...] = (acc / (l[:, None] * (1.0 - rate))).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _weights(q, k, lse, i_q, j_k, head, seed, n_cols, scale, rate):
    """Softmax weights P (from the saved log-sum-exp) and the dropout multiplier keep / (1 - rate)."""
    s, causal, keep = _scores_and_keep(q, k, i_q, j_k, head, seed, n_cols, scale, rate)
    p = jnp.where(causal, jnp.exp(s - lse[:, None]), 0.0)
    return p, jnp.where(keep, 1.0 / (1.0 - rate), 0.0)


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale: float, rate: float):
    seed, head, j_k = _block_ids(seed_ref)
    n_rows = q_ref.shape[0]
    n_cols = n_rows  # self-attention: S == T (this instance holds one block of the keys)
    k, v = k_ref[...], v_ref[...]

    def one_query_block(i_q, carry):
        dk, dv = carry
        rows = pl.ds(i_q * BLOCK, BLOCK)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p, drop = _weights(q, k, lse_ref[rows], i_q, j_k, head, seed, n_cols, scale, rate)
        dv = dv + _dot((p * drop).astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True) * drop
        ds = p * (dp - delta_ref[rows][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(j_k, n_rows // BLOCK, one_query_block, (zeros, zeros))  # causal: queries from the diagonal
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float, rate: float):
    seed, head, i_q = _block_ids(seed_ref)
    n_cols = k_ref.shape[0]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def one_key_block(j_k, dq):
        cols = pl.ds(j_k * BLOCK, BLOCK)
        k, v = k_ref[cols, :], v_ref[cols, :]
        p, drop = _weights(q, k, lse, i_q, j_k, head, seed, n_cols, scale, rate)
        ds = p * (_dot(do, v, trans_b=True) * drop - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, i_q + 1, one_key_block, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wiring and the custom gradient
# ---------------------------------------------------------------------------------------------------------------


def _call(kernel, out_shape, q_BTHD, *, full: tuple[bool, ...], out_full: tuple[bool, ...], interpret: bool):
    """One pallas_call over the grid (B, H, T / BLOCK); each operand either the instance's block or its whole head
    (a (rows, D) view with a stride of H·D: the model's (B, T, H, D) layout needs no transpose)."""
    from jax.experimental.pallas import triton as plgpu

    B, T, H, D = q_BTHD.shape

    def spec(whole: bool, ndim: int) -> pl.BlockSpec:
        rows = T if whole else BLOCK
        if ndim == 3:  # (B, H, T): log-sum-exp and delta
            return pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, 0 if whole else i))
        return pl.BlockSpec((None, rows, None, D), lambda b, h, i: (b, 0 if whole else i, h, 0))

    def operand_specs(operands):
        return [pl.BlockSpec((2,), lambda b, h, i: (0,))] + [spec(w, x.ndim) for w, x in zip(full, operands)]

    def run(seed, *operands):
        return pl.pallas_call(
            kernel,
            grid=(B, H, T // BLOCK),
            in_specs=operand_specs(operands),
            out_specs=[spec(w, len(s.shape)) for w, s in zip(out_full, out_shape)],
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
            interpret=interpret,
        )(seed, *operands)

    return run


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BTHD, k_BSHD, v_BSHD, seed, rate, interpret):
    return _flash_forward(q_BTHD, k_BSHD, v_BSHD, seed, rate, interpret)[0]


def _flash_forward(q_BTHD, k_BSHD, v_BSHD, seed, rate, interpret):
    B, T, H, D = q_BTHD.shape
    kernel = functools.partial(_forward_kernel, scale=D**-0.5, rate=rate)
    out_shape = [jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)]
    o, lse = _call(kernel, out_shape, q_BTHD, full=(False, True, True), out_full=(False, False),
                   interpret=interpret)(seed, q_BTHD, k_BSHD, v_BSHD)
    return o, (q_BTHD, k_BSHD, v_BSHD, seed, o, lse)


def _flash_backward(rate, interpret, residuals, do_BTHD):
    q, k, v, seed, o, lse = residuals
    D = q.shape[-1]
    # Σ_j P_ij dP_ij over the dropped weights is dO_i · O_i: one elementwise pass, XLA fuses it.
    delta_BHT = jnp.einsum("bthd,bthd->bht", do_BTHD.astype(jnp.float32), o.astype(jnp.float32))
    operands = (q, k, v, do_BTHD, lse, delta_BHT)
    kw = dict(scale=D**-0.5, rate=rate)
    dk, dv = _call(functools.partial(_dkdv_kernel, **kw), [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2, q,
                   full=(True, False, False, True, True, True), out_full=(False, False),
                   interpret=interpret)(seed, *operands)
    dq = _call(functools.partial(_dq_kernel, **kw), [jax.ShapeDtypeStruct(q.shape, q.dtype)], q,
               full=(False, True, True, False, False, False), out_full=(False,),
               interpret=interpret)(seed, *operands)[0]
    return dq, dk, dv, None


_flash.defvjp(_flash_forward, _flash_backward)


def attention(q_BTHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *, rate: float, key: jax.Array,
              first_row: jax.Array | int = 0, interpret: bool = False) -> jax.Array:
    """Causal attention with dropout `rate` on the weights, fused -> (B, T, H, D). Shapes: `fits`.

    The mask is a function of `key` (one uint32 seed drawn from it) and of each weight's place in the whole batch
    (`first_row`: the batch row this shard's row 0 is), so the same key gives the same result, sharded or not."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    seed = jnp.concatenate([jax.random.bits(key, (1,), jnp.uint32), jnp.asarray(first_row, jnp.uint32)[None]])
    return _flash(q_BTHD, k_BSHD, v_BSHD, seed, float(rate), interpret)
