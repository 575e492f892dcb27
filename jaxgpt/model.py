"""The models of the lecture, in its order, as Flax NNX modules.

    BigramLanguageModel   each token reads the logits of the next one from a table row
    Head                  one head of causal self-attention (the ladder's `attention` on learned q, k, v)
    MultiHeadAttention    heads side by side, concatenated, projected
    CausalSelfAttention   nanoGPT's fused form of the same: one matmul makes every head's q, k, v
    MLP                   the lecture's FeedForward: expand 4x, non-linearity, project back
    Block                 communication (attention) then computation (MLP), each with a residual
    GPT                   embeddings, a stack of Blocks, a final LayerNorm and the language-model head

Their hyper-parameters are a `GPTConfig` (jaxgpt.gpt_config, importable from here too): nanoGPT's model by default,
with switches for a modern GPT's parts (rotary positions, qk_norm, ReLU², RMSNorm, zero-initialised projections,
soft-capped logits, an untied head).

Names of parameters follow nanoGPT (`wte`, `wpe`, `h`, `ln_1`, `attn`, `c_attn`, `c_proj`, `ln_2`,
`mlp`, `c_fc`, `ln_f`, `lm_head`) so checkpoints map one to one. Modules hold parameters only;
randomness (dropout) arrives as an explicit `key` argument, `key=None` meaning evaluation, so a module is
a pure function of (params, inputs, key).

`__call__` is the forward pass of training and of the lecture's `generate`: tokens (or activations) in,
logits (or activations) out. Decoding with a key/value cache (`jaxgpt.kv_cache`) is a method of its own,
`decode(x, cache, pos) -> (out, cache)`, on every module that attends or holds modules that do (Head,
MultiHeadAttention, CausalSelfAttention, Block, GPT; the bigram model's cache is empty); `init_cache` makes
the empty cache it takes. `jaxgpt.decode` builds its compiled sampling loops on these two methods.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import kv_cache
from jaxgpt.attention import attention, dot_product_attention, rms_norm, rotary
from jaxgpt.cpu_matmul import dense_dot_general
from jaxgpt.dropout import dropout
from jaxgpt.gpt_config import ACTIVATIONS, GPTConfig
from jaxgpt.initializers import normal
from jaxgpt.layout import stack_blocks

# --------------------------------------------------------------------------------------------------
# The first rung: a bigram model
# --------------------------------------------------------------------------------------------------


class BigramLanguageModel(nnx.Module):
    """The lecture's first model: each token reads the logits of the next one from a table row."""

    def __init__(self, vocab_size: int, block_size: int = 8, *, rngs: nnx.Rngs):
        # torch's nn.Embedding default init, N(0, 1), as in the lecture.
        self.token_embedding_table = nnx.Embed(
            vocab_size, vocab_size, embedding_init=normal(1.0), rngs=rngs
        )
        self.block_size = block_size  # only bounds the context that `generate` keeps

    @property
    def vocab_size(self) -> int:
        return self.token_embedding_table.num_embeddings

    def __call__(self, idx_BT: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(idx_BT, 2)
        return self.token_embedding_table(idx_BT).astype(jnp.float32)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (the table; with no position embeddings, `non_embedding` leaves it whole)."""
        del non_embedding
        return count_params(nnx.state(self, nnx.Param))

    def init_cache(self, batch_size: int) -> tuple:
        """Nothing to cache: each token's logits depend on that token alone."""
        return ()

    def decode(self, idx_BT: jax.Array, cache: tuple, pos: int | jax.Array) -> tuple[jax.Array, tuple]:
        """The forward pass, under the decoding interface of `GPT.decode`: -> (logits (B, T, V), cache)."""
        return self(idx_BT), cache


def loss_fn(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy of next-token prediction, computed in float32 (F.cross_entropy)."""
    chex.assert_equal_shape_prefix([logits_BTV, targets_BT], targets_BT.ndim)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    return losses.mean()


# --------------------------------------------------------------------------------------------------
# Layers shared by the transformer's modules
# --------------------------------------------------------------------------------------------------


def _linear(config: GPTConfig, n_in: int, n_out: int, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=config.bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=normal(std) if std else nnx.initializers.zeros,
        bias_init=nnx.initializers.zeros,
        dot_general=dense_dot_general,
        rngs=rngs,
    )


def _residual_std(config: GPTConfig) -> float:
    """nanoGPT's special init for projections into the residual stream (GPT-2 paper); 0 with `zero_init_proj`,
    so that each block starts as the identity (modded-nanogpt)."""
    return 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)


def _layer_norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
    dtypes = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
    if config.norm == "rmsnorm":  # x / sqrt(mean(x^2) + eps): no mean, no weights
        return nnx.RMSNorm(config.n_embd, epsilon=config.ln_eps, use_scale=False, rngs=rngs, **dtypes)
    # use_fast_variance=False: E[(x - mean)^2] like torch, not E[x^2] - mean^2.
    return nnx.LayerNorm(config.n_embd, epsilon=config.ln_eps, use_bias=config.bias, use_fast_variance=False,
                         rngs=rngs, **dtypes)


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n independent keys, or n Nones when there is no randomness (evaluation)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def sinusoidal_positions(T: int, C: int) -> jax.Array:
    """The Transformer paper's fixed encoding: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(.)."""
    pos = np.arange(T, dtype=np.float64)[:, None]
    div = np.power(10000.0, np.arange(0, C, 2, dtype=np.float64) / C)
    pe = np.zeros((T, C), dtype=np.float64)
    pe[:, 0::2] = np.sin(pos / div)
    pe[:, 1::2] = np.cos(pos / div)[:, : C // 2]
    return jnp.asarray(pe, dtype=jnp.float32)


def _position_qk(config: GPTConfig, q: jax.Array, k: jax.Array, positions_T: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Queries and keys (..., T, head_size) at `positions`: RMS-normalised (`qk_norm`), then rotated (rotary)."""
    if config.qk_norm:
        q, k = rms_norm(q, config.ln_eps), rms_norm(k, config.ln_eps)
    if config.pos_encoding == "rotary":
        q, k = rotary(q, positions_T), rotary(k, positions_T)
    return q, k


# --------------------------------------------------------------------------------------------------
# Attention: one head, many heads, the fused form
# --------------------------------------------------------------------------------------------------


class Head(nnx.Module):
    """One head of causal self-attention: the lecture's `Head` (key, query, value projections)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.key = _linear(config, config.n_embd, config.head_size, rngs)
        self.query = _linear(config, config.n_embd, config.head_size, rngs)
        self.value = _linear(config, config.n_embd, config.head_size, rngs)
        self.dropout_rate = config.dropout
        self.config = config

    def _qk(self, x_BTC: jax.Array, start: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        return _position_qk(self.config, self.query(x_BTC), self.key(x_BTC), start + jnp.arange(x_BTC.shape[1]))

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        q_BTD, k_BTD = self._qk(x_BTC, 0)
        return attention(q_BTD, k_BTD, self.value(x_BTC), causal=True, dropout_rate=self.dropout_rate, key=key)

    def init_cache(self, batch_size: int, block_size: int, dtype: jnp.dtype
                   ) -> kv_cache.LayerCache:
        """This head's empty cache: (batch_size, block_size, head_size) keys and values."""
        return kv_cache.init_cache(batch_size, block_size, self.key.out_features, dtype)

    def decode(self, x_BTC: jax.Array, cache: kv_cache.LayerCache, pos: int | jax.Array
               ) -> tuple[jax.Array, kv_cache.LayerCache]:
        """The tokens of x sit at positions pos..: adds their keys and values to the cache, attends -> (y, cache)."""
        return kv_cache.attend(cache, *self._qk(x_BTC, pos), self.value(x_BTC), pos)


class MultiHeadAttention(nnx.Module):
    """The lecture's `MultiHeadAttention`: heads side by side, concatenated, then projected."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.heads = nnx.List([Head(config, rngs=rngs) for _ in range(config.n_head)])
        self.c_proj = _linear(config, config.n_embd, config.n_embd, rngs, std=_residual_std(config))
        self.dropout_rate = config.dropout

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        *head_keys, proj_key = _split(key, len(self.heads) + 1)
        out_BTC = jnp.concatenate([h(x_BTC, key=k) for h, k in zip(self.heads, head_keys)], axis=-1)
        return dropout(self.c_proj(out_BTC), self.dropout_rate, proj_key)

    def init_cache(self, batch_size: int, block_size: int, dtype: jnp.dtype
                   ) -> tuple[kv_cache.LayerCache, ...]:
        """One cache per head."""
        return tuple(h.init_cache(batch_size, block_size, dtype) for h in self.heads)

    def decode(self, x_BTC: jax.Array, cache: tuple[kv_cache.LayerCache, ...], pos: int | jax.Array
               ) -> tuple[jax.Array, tuple[kv_cache.LayerCache, ...]]:
        """Each head decodes with its own cache; their outputs are concatenated and projected -> (y, cache)."""
        outs, cache = zip(*(h.decode(x_BTC, c, pos) for h, c in zip(self.heads, cache)))
        return self.c_proj(jnp.concatenate(outs, axis=-1)), tuple(cache)


class CausalSelfAttention(nnx.Module):
    """nanoGPT's fused form: one matmul makes q, k and v for all heads at once."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.c_attn = _linear(config, config.n_embd, 3 * config.n_embd, rngs)
        self.c_proj = _linear(config, config.n_embd, config.n_embd, rngs, std=_residual_std(config))
        self.n_head = config.n_head
        self.dropout_rate = config.dropout
        self.attention_impl = config.attention_impl
        self.config = config

    def _heads(self, x_BTC: jax.Array, start: int | jax.Array = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v of every head, each (B, n_head, T, head_size), the tokens at positions start, start + 1, ..."""
        B, T, C = x_BTC.shape
        q, k, v = jnp.split(self.c_attn(x_BTC), 3, axis=-1)
        to_heads = lambda t: t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3)  # noqa: E731
        return *_position_qk(self.config, to_heads(q), to_heads(k), start + jnp.arange(T)), to_heads(v)

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        B, T, C = x_BTC.shape
        att_key, proj_key = _split(key, 2)
        q_BHTD, k_BHTD, v_BHTD = self._heads(x_BTC)
        y_BHTD = dot_product_attention(q_BHTD, k_BHTD, v_BHTD, impl=self.attention_impl,
                                       dropout_rate=self.dropout_rate, key=att_key)
        y_BTC = y_BHTD.transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble the heads side by side
        return dropout(self.c_proj(y_BTC), self.dropout_rate, proj_key)

    def init_cache(self, batch_size: int, block_size: int, dtype: jnp.dtype
                   ) -> kv_cache.LayerCache:
        """One cache for all heads, batch and heads on its leading axis (why: `jaxgpt.kv_cache`)."""
        head_size = self.c_proj.in_features // self.n_head
        return kv_cache.init_cache(batch_size * self.n_head, block_size, head_size, dtype)

    def decode(self, x_BTC: jax.Array, cache: kv_cache.LayerCache, pos: int | jax.Array
               ) -> tuple[jax.Array, kv_cache.LayerCache]:
        """The tokens of x sit at positions pos..: adds their keys and values to the cache, attends -> (y, cache)."""
        B, T, C = x_BTC.shape
        H, D = self.n_head, C // self.n_head
        to_rows = lambda t: t.reshape(B * H, T, D)  # noqa: E731 - (B, H, T, D) -> (B * H, T, D)
        y_NTD, cache = kv_cache.attend(cache, *map(to_rows, self._heads(x_BTC, pos)), pos)
        y_BTC = y_NTD.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.c_proj(y_BTC), cache


# --------------------------------------------------------------------------------------------------
# Computation, and the Block that joins both
# --------------------------------------------------------------------------------------------------


class MLP(nnx.Module):
    """The lecture's `FeedForward`: expand 4x, non-linearity, project back."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.c_fc = _linear(config, config.n_embd, 4 * config.n_embd, rngs)
        self.c_proj = _linear(config, 4 * config.n_embd, config.n_embd, rngs, std=_residual_std(config))
        self.activation = config.activation
        self.dropout_rate = config.dropout

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        h_BT4C = ACTIVATIONS[self.activation](self.c_fc(x_BTC))
        return dropout(self.c_proj(h_BT4C), self.dropout_rate, key)


class Block(nnx.Module):
    """Communication (attention) then computation (MLP), each with a residual connection.

    Pre-LN (GPT-2, the lecture) normalises each branch's input; post-LN (the Transformer paper's
    "Add & Norm") normalises after each residual sum. `decode` is the same with the attention's `decode`.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        attn_cls = CausalSelfAttention if config.attention == "fused" else MultiHeadAttention
        self.attn = attn_cls(config, rngs=rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.norm_position = config.norm_position

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        attn_key, mlp_key = _split(key, 2)
        return self._residuals(x_BTC, lambda h_BTC: (self.attn(h_BTC, key=attn_key), None), mlp_key)[0]

    def init_cache(self, batch_size: int, block_size: int, dtype: jnp.dtype):
        """The attention's empty cache."""
        return self.attn.init_cache(batch_size, block_size, dtype)

    def decode(self, x_BTC: jax.Array, cache, pos: int | jax.Array) -> tuple[jax.Array, object]:
        """The tokens of x sit at positions pos..: the block with the attention's `decode` -> (x, cache)."""
        return self._residuals(x_BTC, lambda h_BTC: self.attn.decode(h_BTC, cache, pos), None)

    def _residuals(self, x_BTC: jax.Array, communicate, mlp_key: jax.Array | None) -> tuple[jax.Array, object]:
        """Both residual branches; `communicate(h) -> (y, extra)` is the attention. Returns (x, extra)."""
        if self.norm_position == "pre":
            a_BTC, extra = communicate(self.ln_1(x_BTC))
            x_BTC = x_BTC + a_BTC
            x_BTC = x_BTC + self.mlp(self.ln_2(x_BTC), key=mlp_key)
        else:
            a_BTC, extra = communicate(x_BTC)
            x_BTC = self.ln_1(x_BTC + a_BTC)
            x_BTC = self.ln_2(x_BTC + self.mlp(x_BTC, key=mlp_key))
        return x_BTC, extra


# --------------------------------------------------------------------------------------------------
# The GPT
# --------------------------------------------------------------------------------------------------


class GPT(nnx.Module):
    """Token + position embeddings, a stack of Blocks, a final LayerNorm and the language-model head."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        init = normal(0.02)
        # The lecture's token_embedding_table and position_embedding_table.
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=init, rngs=rngs, **dtypes)
        if config.pos_encoding == "learned":
            self.wpe = nnx.Embed(config.block_size, config.n_embd, embedding_init=init, rngs=rngs, **dtypes)
        else:
            self.wpe = None
        blocks = [Block(config, rngs=rngs) for _ in range(config.n_layer)]  # the lecture's blocks
        # scan_layers: one Block whose parameters carry a leading n_layer axis (the same draws as unstacked).
        self.h = stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
        self.ln_f = _layer_norm(config, rngs)
        if config.tie_embeddings:
            self.lm_head = None  # logits come from wte.attend: one matrix for input and output
        else:
            self.lm_head = nnx.Linear(
                config.n_embd, config.vocab_size, use_bias=False, kernel_init=init, rngs=rngs, **dtypes
            )

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _check_length(self, idx_BT: jax.Array) -> None:
        chex.assert_rank(idx_BT, 2)
        if idx_BT.shape[1] > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {idx_BT.shape[1]}: the model's block_size is "
                             f"{self.config.block_size}")

    def __call__(self, idx_BT: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """idx (B, T) int token ids -> logits (B, T, vocab_size). `key` enables dropout."""
        self._check_length(idx_BT)
        drop_key, *block_keys = _split(key, self.config.n_layer + 1)
        x_BTC = dropout(self.embed(idx_BT), self.config.dropout, drop_key)
        logits_BTV = self.head(self.blocks(x_BTC, block_keys))
        chex.assert_shape(logits_BTV, (*idx_BT.shape, self.config.vocab_size))
        return logits_BTV

    def decode(self, idx_BT: jax.Array, cache: tuple, pos: int | jax.Array) -> tuple[jax.Array, tuple]:
        """Decoding with a key/value cache (`init_cache`): the tokens idx (B, T) sit at positions pos .. pos+T-1
        (below block_size); every layer attends to the keys and values cached before them and caches theirs.

        Returns (logits (B, T, vocab_size), cache): the logits of a full forward over the whole sequence so far.
        """
        self._check_length(idx_BT)
        x_BTC = self.embed(idx_BT, start=pos)
        new_cache = []
        for block, layer_cache in zip(self._layers(), cache):
            x_BTC, layer_cache = block.decode(x_BTC, layer_cache, pos)
            new_cache.append(layer_cache)
        return self.head(x_BTC), tuple(new_cache)

    def _layers(self) -> list[Block]:
        """The n_layer Blocks one by one; with `scan_layers`, each a view of its slice of the stacked parameters."""
        if not self.config.scan_layers:
            return list(self.h)
        graphdef, stacked = nnx.split(self.h)
        return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], stacked)) for i in range(self.config.n_layer)]

    def embed(self, idx_BT: jax.Array, *, start: int | jax.Array = 0) -> jax.Array:
        """Token embeddings plus the embeddings of positions start, start + 1, ..."""
        T = idx_BT.shape[1]
        tok_emb_BTC = self.wte(idx_BT)
        if self.config.pos_encoding == "rotary":  # positions enter in the attention, by rotating q and k
            return tok_emb_BTC
        if self.wpe is not None:
            pos_emb_TC = self.wpe(start + jnp.arange(T))
        else:
            table = sinusoidal_positions(self.config.block_size, self.config.n_embd)
            pos_emb_TC = jax.lax.dynamic_slice_in_dim(table, start, T).astype(tok_emb_BTC.dtype)
        return tok_emb_BTC + pos_emb_TC

    def blocks(self, x_BTC: jax.Array, block_keys: list[jax.Array | None]) -> jax.Array:
        """Runs the residual stream through the n_layer Blocks: a Python loop, or a `lax.scan` when
        `scan_layers`; each block under `jax.checkpoint` when `remat`."""
        if not (self.config.scan_layers or self.config.remat):
            for block, block_key in zip(self.h, block_keys):
                x_BTC = block(x_BTC, key=block_key)
            return x_BTC

        def block_fn(graphdef, state, x_BTC, block_key):
            return nnx.merge(graphdef, state)(x_BTC, key=block_key)

        if self.config.remat:
            block_fn = jax.checkpoint(block_fn, static_argnums=(0,))
        if not self.config.scan_layers:
            for block, block_key in zip(self.h, block_keys):
                x_BTC = block_fn(*nnx.split(block), x_BTC, block_key)
            return x_BTC
        graphdef, stacked = nnx.split(self.h)
        keys = None if block_keys[0] is None else jnp.stack(block_keys)

        def body(x_BTC, layer):
            state, block_key = layer
            return block_fn(graphdef, state, x_BTC, block_key), None

        x_BTC, _ = jax.lax.scan(body, x_BTC, (stacked, keys))
        return x_BTC

    def head(self, x_BTC: jax.Array) -> jax.Array:
        """Final LayerNorm and projection to vocabulary logits (float32), soft-capped when `logit_softcap` > 0."""
        x_BTC = self.ln_f(x_BTC)
        logits_BTV = (self.wte.attend(x_BTC) if self.lm_head is None else self.lm_head(x_BTC)).astype(jnp.float32)
        cap = self.config.logit_softcap
        return cap * jnp.tanh(logits_BTV / cap) if cap else logits_BTV

    def init_cache(self, batch_size: int) -> tuple:
        """An empty key/value cache for `decode`: one per layer, for `batch_size` sequences of up to block_size
        tokens, in the computation dtype."""
        c = self.config
        block = self.h if c.scan_layers else self.h[0]  # every layer's cache has the same shapes
        return tuple(block.init_cache(batch_size, c.block_size, jnp.dtype(c.dtype))
                     for _ in range(c.n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; as nanoGPT, position embeddings are not counted when `non_embedding`."""
        n = count_params(nnx.state(self, nnx.Param))
        if non_embedding and self.wpe is not None:
            n -= self.wpe.embedding.size
        return n


def count_params(params) -> int:
    """The number of scalars in a tree of parameters (an nnx.State or any pytree of arrays)."""
    return int(sum(p.size for p in jax.tree.leaves(params)))
