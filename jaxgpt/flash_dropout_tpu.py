"""Causal flash attention with attention dropout, for TPUs: two Pallas kernels that Mosaic compiles.

The TPU twin of `jaxgpt.flash_dropout` (read that module first): the same online softmax, the same dropout mask
(`dropout.keep_mask`, a hash of the step's seed and each weight's (head, query, key) place, so a GPU and a TPU
drop the same weights), laid out for a TPU. Two things differ, both for the TPU's memory:

- **The model's (B, T, C) layout, heads side by side.** A TPU tile is 128 lanes wide: a (B, H, T, 64) head array
  pads every row to 128 lanes and moves twice its bytes (JAX's own TPU flash kernel does). Here a kernel instance
  takes a 128-lane group of channels (two heads of 64) and, for each head of the group, zeroes the other lanes of
  q (and of k in the backward pass): a 128-deep contraction costs the TPU's 128x128 matrix unit what a 64-deep one
  does, and every load, store and matmul is lane-aligned. No transpose to (B, H, T, D) is needed either.
- **The backward pass reads the scores transposed,** (keys, queries), so that the log-sum-exp and
  delta = rowsum(dO·O) of the queries are rows, the layout the forward pass stores them in.

    forward   grid (B, C / 128, T / 128): a block of queries against the keys up to the diagonal
    backward  grid (B, C / 128): dK, dV block by block of keys, dQ accumulated for the whole sequence

Used by `attention.dot_product_attention` in TPU programs, with attention dropout and without: the
`shakespeare_char` bf16 training step on a TPU v5e moves 18.56 GB with it, 26.73 with JAX's own TPU flash kernel
(dropout off) and 26.18 with the ladder (dropout 0.2); GPT-2 124M's 52.18 against 78.69
(`benchmarks/bench_targets.py`). `interpret=True` runs the same kernels on any backend (the tests check them on a CPU
against `flash_dropout.reference`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxgpt.dropout import keep_mask

BLOCK = 128  # query and key rows a step of a kernel holds (the sequence comes in whole blocks)
LANES = 128  # the width of a TPU vector register: a kernel instance's group of channels
VMEM_BUDGET = 12 * 2**20  # below the 16 MiB of fast memory a TPU v4 / v5e kernel may use by default


def backward_vmem_bytes(T: int, dtype: jnp.dtype) -> int:
    """Fast memory the backward kernel holds: a lane group's whole sequence of q, k, v, O, dO, dQ, dK, dV (each
    twice: the pipeline fetches the next instance's while this one runs), dQ's float32 sum and delta's rows."""
    return T * LANES * (8 * 2 * jnp.dtype(dtype).itemsize + 4) + T * 8 * 4


def fits(q_BTC: jax.Array, k_BSC: jax.Array, n_head: int) -> bool:
    """Whether the kernels take these arrays: self-attention, whole blocks, heads that tile 128 lanes, bfloat16 or
    float32, and a sequence whose backward pass fits `VMEM_BUDGET` (up to 2,688 tokens in bf16, 1,408 in float32)."""
    if q_BTC.ndim != 3 or q_BTC.shape != k_BSC.shape or q_BTC.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    _, T, C = q_BTC.shape
    D = C // n_head
    return (C % n_head == 0 and T % BLOCK == 0 and C % LANES == 0 and LANES % D == 0
            and backward_vmem_bytes(T, q_BTC.dtype) <= VMEM_BUDGET)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """a·b over axes `contract` (of a, of b), accumulated in float32: (1, 0) is a @ b, (1, 1) a @ bᵀ, (0, 0) aᵀ @ b."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _lanes_of_head(r: int, head_size: int) -> jax.Array:
    """(BLOCK, LANES) boolean: the lanes of head r of a 128-lane group."""
    lane = lax.broadcasted_iota(jnp.int32, (BLOCK, LANES), 1)
    return (lane >= r * head_size) & (lane < (r + 1) * head_size)


def _head_ids(seed_ref, n_head: int, heads_per_group: int) -> tuple[jax.Array, jax.Array]:
    """(the mask's seed, head 0 of this instance's lane group counted over the whole batch, b·H + h).

    `seed_ref` holds the seed and the batch row this shard starts at, as in `flash_dropout`."""
    b = seed_ref[1] + pl.program_id(0)
    return seed_ref[0].astype(jnp.uint32), b * n_head + pl.program_id(1) * heads_per_group


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, head_size: int, n_head: int, rate: float):
    heads_per_group = LANES // head_size
    seed, head0 = _head_ids(seed_ref, n_head, heads_per_group)
    i_q = pl.program_id(2)
    n_cols = k_ref.shape[0]
    scale = head_size**-0.5
    q = q_ref[...]
    rows = i_q * BLOCK + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
    lane = lax.broadcasted_iota(jnp.int32, (BLOCK, LANES), 1)
    out = jnp.zeros((BLOCK, LANES), jnp.float32)
    lse = jnp.zeros((BLOCK, LANES), jnp.float32)  # lane r: head r's log-sum-exp
    for r in range(heads_per_group):
        in_head = _lanes_of_head(r, head_size)
        q_r = jnp.where(in_head, q, jnp.zeros_like(q))  # the scores contract over head r's channels only

        def one_key_block(j_k, carry, q_r=q_r, head=head0 + r):
            m, l, acc = carry  # running max, running sum of exp, unnormalised output (all lanes; head r's kept)
            k = k_ref[pl.ds(j_k * BLOCK, BLOCK), :]
            v = v_ref[pl.ds(j_k * BLOCK, BLOCK), :]
            cols = j_k * BLOCK + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
            s = jnp.where(cols <= rows, _dot(q_r, k, (1, 1)) * scale, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            p = jnp.exp(s - m_new)
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=1, keepdims=True)
            if rate > 0.0:
                p = jnp.where(keep_mask(seed, head, rows, cols, n_cols, rate), p, 0.0)
            acc = acc * correction + _dot(p.astype(v.dtype), v, (1, 0))
            return m_new, l, acc

        init = (jnp.full((BLOCK, 1), -jnp.inf, jnp.float32), jnp.zeros((BLOCK, 1), jnp.float32),
                jnp.zeros((BLOCK, LANES), jnp.float32))
        m, l, acc = lax.fori_loop(0, i_q + 1, one_key_block, init)  # causal: key blocks up to the diagonal
        out = jnp.where(in_head, acc / (l * (1.0 - rate)), out)
        lse = jnp.where(lane == r, m + jnp.log(l), lse)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.T[:heads_per_group]  # (heads, BLOCK): each head's row over the queries


def _backward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, dk_ref, dv_ref, dq_acc, delta_ref,
                     *, head_size: int, n_head: int, rate: float):
    heads_per_group = LANES // head_size
    seed, head0 = _head_ids(seed_ref, n_head, heads_per_group)
    n_blocks = q_ref.shape[0] // BLOCK
    n_cols = q_ref.shape[0]  # self-attention: S == T
    scale = head_size**-0.5
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def delta_rows(i_q, _):
        """delta = Σ_j P_ij dP_ij over the dropped weights = dO_i · O_i, a head's channels summed: a row per head."""
        queries = pl.ds(i_q * BLOCK, BLOCK)
        product_t = (do_ref[queries, :].astype(jnp.float32) * o_ref[queries, :].astype(jnp.float32)).T
        for r in range(heads_per_group):
            delta_ref[i_q, r:r + 1, :] = product_t[r * head_size:(r + 1) * head_size].sum(axis=0, keepdims=True)
        return 0

    lax.fori_loop(0, n_blocks, delta_rows, 0)
    keys_in_block = lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)  # transposed scores: keys down, queries across
    queries_in_block = lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
    for r in range(heads_per_group):
        in_head = _lanes_of_head(r, head_size)

        def one_key_block(j_k, _, r=r, in_head=in_head, head=head0 + r):
            keys = pl.ds(j_k * BLOCK, BLOCK)
            k, v = k_ref[keys, :], v_ref[keys, :]
            k_r, v_r = jnp.where(in_head, k, jnp.zeros_like(k)), jnp.where(in_head, v, jnp.zeros_like(v))
            key_pos = j_k * BLOCK + keys_in_block

            def one_query_block(i_q, carry):
                dk, dv = carry
                queries = pl.ds(i_q * BLOCK, BLOCK)
                q, do = q_ref[queries, :], do_ref[queries, :]
                query_pos = i_q * BLOCK + queries_in_block
                s_t = _dot(k_r, q, (1, 1)) * scale  # (keys, queries)
                p_t = jnp.where(key_pos <= query_pos, jnp.exp(s_t - lse_ref[i_q, r:r + 1, :]), 0.0)
                if rate > 0.0:
                    drop_t = jnp.where(keep_mask(seed, head, query_pos, key_pos, n_cols, rate), 1.0 / (1.0 - rate), 0.0)
                    dp_t = _dot(v_r, do, (1, 1)) * drop_t
                    p_dropped = p_t * drop_t
                else:
                    dp_t, p_dropped = _dot(v_r, do, (1, 1)), p_t
                dv = dv + _dot(p_dropped.astype(do.dtype), do, (1, 0))
                ds_t = (p_t * (dp_t - delta_ref[i_q, r:r + 1, :])).astype(q.dtype)
                dk = dk + _dot(ds_t, q, (1, 0))
                dq_acc[queries, :] += _dot(ds_t, k_r, (0, 0))  # only head r's lanes: k_r is zero elsewhere
                return dk, dv

            zeros = jnp.zeros((BLOCK, LANES), jnp.float32)
            dk, dv = lax.fori_loop(j_k, n_blocks, one_query_block, (zeros, zeros))  # causal: from the diagonal on
            if r == 0:  # the other lanes are written by the group's later heads
                dk_ref[keys, :] = (dk * scale).astype(dk_ref.dtype)
                dv_ref[keys, :] = dv.astype(dv_ref.dtype)
            else:
                dk_ref[keys, :] = jnp.where(in_head, (dk * scale).astype(dk_ref.dtype), dk_ref[keys, :])
                dv_ref[keys, :] = jnp.where(in_head, dv.astype(dv_ref.dtype), dv_ref[keys, :])
            return 0

        lax.fori_loop(0, n_blocks, one_key_block, 0)
    dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wiring and the custom gradient
# ---------------------------------------------------------------------------------------------------------------


def _compiler_params(n_grid: int):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)


def _cost(q_BTC: jax.Array, n_head: int, n_matmuls: int, n_bytes: int) -> pl.CostEstimate:
    """The causal half of the (T, T) scores: `n_matmuls` products of B·H·T²/2 by head_size, one exp each."""
    B, T, C = q_BTC.shape
    pairs = B * n_head * T * (T + 1) // 2
    return pl.CostEstimate(flops=2 * n_matmuls * pairs * (C // n_head), transcendentals=pairs,
                           bytes_accessed=n_bytes)


def _nbytes(*arrays) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


def _seed_spec():
    from jax.experimental.pallas import tpu as pltpu

    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _forward(q, k, v, seed, n_head, rate, interpret):
    B, T, C = q.shape
    D, G, n_blocks = C // n_head, C // LANES, T // BLOCK
    R = LANES // D
    block = pl.BlockSpec((None, BLOCK, LANES), lambda b, g, i: (b, i, g))
    whole = pl.BlockSpec((None, T, LANES), lambda b, g, i: (b, 0, g))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, G, n_blocks, R, BLOCK), jnp.float32)]  # log-sum-exp, rows by head
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, head_size=D, n_head=n_head, rate=rate),
        grid=(B, G, n_blocks),
        in_specs=[_seed_spec(), block, whole, whole],
        out_specs=[block, pl.BlockSpec((None, None, None, R, BLOCK), lambda b, g, i: (b, g, i, 0, 0))],
        out_shape=out_shape,
        compiler_params=_compiler_params(3),
        cost_estimate=_cost(q, n_head, 2, _nbytes(q, k, v, *out_shape)),
        interpret=interpret,
    )(seed, q, k, v)
    return o, lse


def _backward(q, k, v, seed, o, do, lse, n_head, rate, interpret):
    from jax.experimental.pallas import tpu as pltpu

    B, T, C = q.shape
    D, G, n_blocks = C // n_head, C // LANES, T // BLOCK
    R = LANES // D
    whole = pl.BlockSpec((None, T, LANES), lambda b, g: (b, 0, g))
    rows = pl.BlockSpec((None, None, n_blocks, R, BLOCK), lambda b, g: (b, g, 0, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    return pl.pallas_call(
        functools.partial(_backward_kernel, head_size=D, n_head=n_head, rate=rate),
        grid=(B, G),
        in_specs=[_seed_spec(), whole, whole, whole, whole, whole, rows],
        out_specs=[whole, whole, whole],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((T, LANES), jnp.float32), pltpu.VMEM((n_blocks, R, BLOCK), jnp.float32)],
        compiler_params=_compiler_params(2),
        cost_estimate=_cost(q, n_head, 5, _nbytes(q, k, v, o, do, lse, *out_shape)),
        interpret=interpret,
    )(seed, q, k, v, o, do, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_BTC, k_BTC, v_BTC, seed, n_head, rate, interpret):
    return _forward(q_BTC, k_BTC, v_BTC, seed, n_head, rate, interpret)[0]


def _flash_forward(q_BTC, k_BTC, v_BTC, seed, n_head, rate, interpret):
    o, lse = _forward(q_BTC, k_BTC, v_BTC, seed, n_head, rate, interpret)
    return o, (q_BTC, k_BTC, v_BTC, seed, o, lse)


def _flash_backward(n_head, rate, interpret, residuals, do_BTC):
    q, k, v, seed, o, lse = residuals
    dq, dk, dv = _backward(q, k, v, seed, o, do_BTC, lse, n_head, rate, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_forward, _flash_backward)


def attention(q_BTC: jax.Array, k_BTC: jax.Array, v_BTC: jax.Array, *, n_head: int, rate: float = 0.0,
              key: jax.Array | None = None, first_row: jax.Array | int = 0, interpret: bool = False) -> jax.Array:
    """Causal attention of `n_head` heads side by side (C = n_head · head_size), dropout `rate` on the weights,
    fused -> (B, T, C). Shapes: `fits`. With `rate > 0` a `key` must be given: the same key drops the same weights
    as `flash_dropout.attention` does; at rate 0 no mask is drawn (evaluation, or a model without dropout)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate > 0.0 and key is None:
        raise ValueError("attention dropout needs a key: pass key=, or rate=0.0")
    bits = jnp.zeros((), jnp.int32) if rate == 0.0 else lax.bitcast_convert_type(
        jax.random.bits(key, (1,), jnp.uint32)[0], jnp.int32)  # the seed flash_dropout draws from the key
    seed = jnp.stack([bits, jnp.asarray(first_row, jnp.int32)])
    return _flash(q_BTC, k_BTC, v_BTC, seed, n_head, float(rate), interpret)
