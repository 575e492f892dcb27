"""The lecture's ladder from averaging the past to scaled dot-product attention.

Each rung is a pure function with the same contract: tokens at time t may only look at times <= t.

    causal_mean_loop     the double loop: x[b, t] = mean(x[b, :t+1])          (the readable reference)
    causal_mean_matmul   the same with one matmul by a row-normalised lower-triangular matrix
    causal_mean_softmax  the same with zeros masked to -inf and a softmax: weights become learnable
    attention_weights    data-dependent weights: softmax(q @ k^T / sqrt(head_size)), masked
    attention            weights @ v, with dropout on the weights (nanoGPT's attn_dropout)

`dot_product_attention` picks how a model computes the last rung: the ladder's `attention`, or fused kernels:
`jax.nn.dot_product_attention` (XLA's, or cuDNN's flash attention on NVIDIA GPUs), jaxgpt's own with nanoGPT's
attention dropout (`flash_dropout` for GPUs, `flash_dropout_tpu` for TPUs) and JAX's Pallas flash attention on TPUs.
'auto' takes the flash kernel the program's devices have (on a TPU jaxgpt's, with or without dropout; on a GPU
cuDNN's in 16-bit and jaxgpt's when training with attention dropout) and XLA's elsewhere.

Two rules of modern GPTs act on the queries and keys before the scores (`GPTConfig.pos_encoding='rotary'`,
`GPTConfig.qk_norm`): `rotary` turns each pair of channels by an angle proportional to the position, so that a
query-key score depends on their distance only; `rms_norm` scales each vector to unit root-mean-square.

`causal=False` gives the encoder (unmasked) form: the lecture's note that an encoder block simply drops the
mask, as in the Transformer paper ("Attention Is All You Need", Vaswani et al., 2017).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from jaxgpt import target
from jaxgpt.dropout import dropout


def causal_mask(T: int, S: int | None = None, *, offset: int | jax.Array | None = None) -> jax.Array:
    """Boolean (T, S) matrix: query i, at position offset + i, may attend to key j iff j <= offset + i.

    With S == T (and no offset) this is `tril(ones(T, T))`. The default offset, S - T, makes the T queries
    the last T positions of a length-S sequence. A key/value cache passes the position of its first new
    token instead (`jaxgpt.kv_cache`): its buffer is longer than the sequence written so far.
    """
    S = T if S is None else S
    offset = S - T if offset is None else offset
    return jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]


def causal_mean_loop(x_BTC: jax.Array) -> jax.Array:
    """x_bow[b, t] = mean_{i <= t} x[b, i], written as the lecture's double loop."""
    chex.assert_rank(x_BTC, 3)
    B, T, _ = x_BTC.shape
    rows = []
    for b in range(B):
        rows.append(jnp.stack([jnp.mean(x_BTC[b, : t + 1], axis=0) for t in range(T)]))
    return jnp.stack(rows)


def causal_mean_matmul(x_BTC: jax.Array) -> jax.Array:
    """The same average as one matmul: lower-triangular ones, each row divided by its sum."""
    chex.assert_rank(x_BTC, 3)
    T = x_BTC.shape[1]
    wei_TT = jnp.tril(jnp.ones((T, T), x_BTC.dtype))
    wei_TT = wei_TT / wei_TT.sum(axis=1, keepdims=True)
    return wei_TT @ x_BTC  # (T, T) @ (B, T, C) -> (B, T, C)


def causal_mean_softmax(x_BTC: jax.Array) -> jax.Array:
    """The same average via softmax: affinities start at zero, the future is set to -inf."""
    chex.assert_rank(x_BTC, 3)
    T = x_BTC.shape[1]
    wei_TT = jnp.where(causal_mask(T), jnp.zeros((T, T), x_BTC.dtype), -jnp.inf)
    wei_TT = jax.nn.softmax(wei_TT, axis=-1)
    return wei_TT @ x_BTC


def attention_weights(q: jax.Array, k: jax.Array, *, causal: bool = True,
                      offset: int | jax.Array | None = None) -> jax.Array:
    """softmax(q @ k^T * head_size**-0.5) over keys, with the future masked when `causal`.

    q: (..., T, head_size), k: (..., S, head_size) -> (..., T, S); `offset` is `causal_mask`'s. The
    softmax runs in float32 so that bfloat16 inputs do not lose the normalisation.
    """
    chex.assert_equal_shape_suffix([q, k], 1)
    chex.assert_equal(q.ndim, k.ndim)
    head_size = q.shape[-1]
    # float32 accumulation: what bf16 mixed precision means, and on CPUs with bf16 units the fast GEMM
    scores = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=jnp.float32) * head_size**-0.5
    if causal:
        scores = jnp.where(causal_mask(q.shape[-2], k.shape[-2], offset=offset), scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    dropout_rate: float = 0.0,
    key: jax.Array | None = None,
    offset: int | jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention: `attention_weights(q, k) @ v`.

    q: (..., T, hs), k: (..., S, hs), v: (..., S, hv) -> (..., T, hv). With `dropout_rate > 0` a
    `key` must be given (training); without one the weights are used as they are (evaluation).
    `offset`: the position of the first query, when the keys are a cache (`causal_mask`).
    """
    chex.assert_equal_shape_prefix([k, v], k.ndim - 1)
    wei = attention_weights(q, k, causal=causal, offset=offset)
    wei = dropout(wei, dropout_rate, key)
    y = jnp.einsum("...ts,...sd->...td", wei.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return y.astype(v.dtype)


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x**2) + eps) over the last axis, with no weights; computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


ROTARY_BASE = 10000.0


def rotary(x_TD: jax.Array, positions_T: jax.Array, base: float = ROTARY_BASE) -> jax.Array:
    """Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half layout (GPT-NeoX, Llama).

    Channel i of the first half and channel i of the second half form a pair, turned by the angle
    positions * base**(-2i / D): (a, b) -> (a cos - b sin, b cos + a sin). x: (..., T, D) with D even,
    positions: (T,) -> x's shape and dtype; the angles and the rotation are computed in float32.
    """
    D = x_TD.shape[-1]
    inv_freq = base ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # (D/2,)
    angles_TD2 = jnp.asarray(positions_T, jnp.float32)[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(angles_TD2), jnp.sin(angles_TD2)
    x = x_TD.astype(jnp.float32)
    if target.platform() == "tpu":  # the same numbers, laid out for a TPU (`_rotate_half`)
        return (x * jnp.tile(cos, 2) + _rotate_half(x) * jnp.tile(sin, 2)).astype(x_TD.dtype)
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x_TD.dtype)


def _rotate_half(x_TD: jax.Array) -> jax.Array:
    """(a, b) -> (-b, a) on the last axis, as a product with a signed permutation (exact at HIGHEST precision).

    On a TPU, splitting a 64-wide head into halves lays each 32-wide half out padded to the 128 lanes of a vector
    register; the product keeps the head whole. In a v5e program of shakespeare_char_speedrun_gpu (bf16) it cuts the
    evaluation's bytes from 6.02 to 4.36 GB and the training step's from 25.41 to 23.24 (`bench_targets.py`, with
    `flash_dropout_tpu`); on an H100 it adds bytes (training step 20.9 -> 24.0 GB), so only TPU programs take it.
    """
    D, half = x_TD.shape[-1], x_TD.shape[-1] // 2
    i = jnp.arange(half)
    signed_permutation_DD = jnp.zeros((D, D), x_TD.dtype).at[half + i, i].set(-1).at[i, half + i].set(1)
    return jnp.matmul(x_TD, signed_permutation_DD, precision=jax.lax.Precision.HIGHEST)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "reference")


def dot_product_attention(
    q_BHTD: jax.Array,
    k_BHSD: jax.Array,
    v_BHSD: jax.Array,
    *,
    impl: str = "auto",
    dropout_rate: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Causal attention by `impl` (GPTConfig.attention_impl) -> (B, H, T, D).

    'reference' is `attention` above. 'auto' is, by the devices the program is compiled for (`jaxgpt.target`, not
    the host): on a TPU `flash_dropout_tpu`'s kernels (sequences in 128-token blocks, heads that tile 128 lanes;
    else in 16-bit JAX's Pallas flash kernel); on a GPU cuDNN's flash kernel in a 16-bit program; XLA's otherwise.
    With attention dropout (`dropout_rate > 0` and a key) XLA's, cuDNN's and JAX's Pallas kernels do not apply
    nanoGPT's dropout to the weights: 'auto' runs jaxgpt's kernels (`flash_dropout` on a GPU, `flash_dropout_tpu`
    on a TPU), and where they do not fit, 'auto' and 'xla' take the reference path ('cudnn' with dropout is
    refused by GPTConfig).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    platform = target.platform()
    half = q_BHTD.dtype in (jnp.bfloat16, jnp.float16)
    dropping = dropout_rate > 0.0 and key is not None
    if impl == "auto" and platform == "tpu":
        y_BHTD = _tpu_flash_dropout(q_BHTD, k_BHSD, v_BHSD, dropout_rate if dropping else 0.0, key)
        if y_BHTD is not None:
            return y_BHTD
    if impl == "reference" or (impl in ("auto", "xla") and dropping):
        if impl == "auto" and platform == "gpu":
            y_BHTD = _gpu_flash_dropout(q_BHTD, k_BHSD, v_BHSD, dropout_rate, key)
            if y_BHTD is not None:
                return y_BHTD
        return attention(q_BHTD, k_BHSD, v_BHSD, causal=True, dropout_rate=dropout_rate, key=key)
    if impl == "auto" and platform == "tpu" and half and _tpu_flash_fits(q_BHTD, k_BHSD):
        y_BHTD = per_batch_shard(_tpu_flash_attention, q_BHTD, k_BHSD, v_BHSD)
        if y_BHTD is not None:
            return y_BHTD
    if impl == "auto":
        impl = "cudnn" if platform == "gpu" and half else "xla"
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU, but the program runs on {platform!r}: "
            "use model.attention_impl='auto' or 'xla'"
        )
    # dot_product_attention takes (B, T, N, H); its softmax runs in float32 for 16-bit inputs.
    to_btnh = lambda t: jnp.swapaxes(t, -3, -2)  # noqa: E731
    y_BTHD = jax.nn.dot_product_attention(
        to_btnh(q_BHTD), to_btnh(k_BHSD), to_btnh(v_BHSD), is_causal=True, implementation=impl
    )
    return to_btnh(y_BTHD)


_TPU_BLOCK = 128  # the Pallas kernel's default tile along the sequence


def _tpu_flash_fits(q_BHTD: jax.Array, k_BHSD: jax.Array) -> bool:
    T, S = q_BHTD.shape[-2], k_BHSD.shape[-2]
    return q_BHTD.ndim == 4 and T == S and T % _TPU_BLOCK == 0


def _tpu_flash_attention(q_BHTD: jax.Array, k_BHSD: jax.Array, v_BHSD: jax.Array,
                         first_row: jax.Array | int) -> jax.Array:
    """JAX's Pallas flash attention for TPUs: the (T, S) scores stay in the chip's fast memory, block by block. It
    reads (B, H, T, D), each head's rows padded to 128 lanes: 'auto' takes it for the heads `flash_dropout_tpu`
    does not take (48 or 96 wide, say)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    del first_row  # no dropout: where a shard sits in the batch does not matter

    return flash_attention(q_BHTD, k_BHSD, v_BHSD, causal=True, sm_scale=q_BHTD.shape[-1] ** -0.5)


def _gpu_flash_dropout(q_BHTD: jax.Array, k_BHSD: jax.Array, v_BHSD: jax.Array, rate: float,
                       key: jax.Array) -> jax.Array | None:
    """jaxgpt's fused causal attention with dropout for NVIDIA GPUs (`jaxgpt.flash_dropout`); None where Triton
    does not compile for the GPU (older than Ampere, or not known), its blocks do not fit the shapes, or the batch
    does not split evenly over the mesh."""
    from jaxgpt import flash_dropout  # Pallas: imported only for the GPU programs that use it

    if q_BHTD.ndim != 4:  # the lecture's per-head modules: (B, T, D)
        return None
    capability = target.gpu_compute_capability()
    if capability is None or capability < flash_dropout.MIN_COMPUTE_CAPABILITY:
        return None
    to_bthd = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731 - the kernels read the model's (B, T, H, D) layout
    q_BTHD, k_BSHD, v_BSHD = to_bthd(q_BHTD), to_bthd(k_BHSD), to_bthd(v_BHSD)
    if not flash_dropout.fits(q_BTHD, k_BSHD):
        return None

    def flash(q, k, v, first_row):
        return flash_dropout.attention(q, k, v, rate=rate, key=key, first_row=first_row)

    y_BTHD = per_batch_shard(flash, q_BTHD, k_BSHD, v_BSHD)
    return None if y_BTHD is None else to_bthd(y_BTHD)


def _tpu_flash_dropout(q_BHTD: jax.Array, k_BHSD: jax.Array, v_BHSD: jax.Array, rate: float,
                       key: jax.Array | None) -> jax.Array | None:
    """jaxgpt's fused causal attention for TPUs (`jaxgpt.flash_dropout_tpu`), with dropout `rate` (0: none, no key
    needed), on the heads side by side (B, T, C); None where its blocks do not fit the shapes or the batch does not
    split evenly over the mesh."""
    from jaxgpt import flash_dropout_tpu  # Pallas: imported only for the TPU programs that use it

    if q_BHTD.ndim != 4:  # the lecture's per-head modules: (B, T, D)
        return None
    B, H, T, D = q_BHTD.shape
    to_btc = lambda t: jnp.swapaxes(t, 1, 2).reshape(B, t.shape[2], H * D)  # noqa: E731 - the model's own layout
    q_BTC, k_BSC, v_BSC = to_btc(q_BHTD), to_btc(k_BHSD), to_btc(v_BHSD)
    if not flash_dropout_tpu.fits(q_BTC, k_BSC, H):
        return None

    def flash(q, k, v, first_row):
        return flash_dropout_tpu.attention(q, k, v, n_head=H, rate=rate, key=key, first_row=first_row)

    y_BTC = per_batch_shard(flash, q_BTC, k_BSC, v_BSC)
    return None if y_BTC is None else jnp.swapaxes(y_BTC.reshape(B, T, H, D), 1, 2)


def per_batch_shard(kernel: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array | None:
    """`kernel(q, k, v, first_row)` on each shard of the batch; None when the batch does not split evenly.

    A Pallas kernel is not split by XLA's partitioner, so on a mesh it runs per shard of the batch (`shard_map`
    over the mesh axes the batch is split on: attention never mixes batch rows); `first_row` is the batch row a
    shard starts at."""
    mesh = jax.typeof(q).sharding.mesh
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, 0)
    if q.shape[0] % mesh.size:
        return None
    axes = tuple(mesh.axis_names)
    rows = q.shape[0] // mesh.size

    def per_shard(q, k, v):
        return kernel(q, k, v, jax.lax.axis_index(axes) * rows)

    spec = jax.sharding.PartitionSpec(axes)  # the batch over every axis: data x fsdp
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        q, k, v)
