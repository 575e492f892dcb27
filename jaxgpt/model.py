"""The GPT of the lecture and of nanoGPT as Flax NNX modules.

Names follow nanoGPT (`wte`, `wpe`, `h`, `ln_1`, `attn`, `c_attn`, `c_proj`, `ln_2`, `mlp`, `c_fc`,
`ln_f`, `lm_head`) so checkpoints map one to one; each class says which lecture object it is.
Modules hold parameters only. Randomness (dropout) arrives as an explicit `key` argument: `key=None`
means evaluation (no dropout), so the same module is a pure function of (params, inputs, key).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.attention import attention, dropout

ATTENTION_IMPLS = ("xla", "cudnn", "reference")

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU, as torch's nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's original approximation
    "relu": jax.nn.relu,  # the lecture's gpt.py
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters. Field names are nanoGPT's, so `GPTConfig(**ckpt['model_args'])` works."""

    block_size: int = 1024  # maximum context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers (nanoGPT's `bias`)
    activation: str = "gelu"  # 'gelu' (exact) | 'gelu_tanh' | 'relu'
    tie_embeddings: bool = True  # lm_head shares wte's matrix (nanoGPT, GPT-2)
    pos_encoding: str = "learned"  # 'learned' (wpe table) | 'sinusoidal' (the Transformer paper)
    attention: str = "fused"  # 'fused' (nanoGPT's one c_attn) | 'heads' (the lecture's list of Head)
    norm_position: str = "pre"  # 'pre' (GPT-2) | 'post' (the Transformer paper's Add & Norm)
    ln_eps: float = 1e-5
    dtype: str = "float32"  # computation dtype ('bfloat16' for mixed precision)
    param_dtype: str = "float32"
    attention_impl: str = "xla"  # 'xla' | 'cudnn' (flash attention on GPU) | 'reference' (the lecture's functions)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, ~1/3 more FLOPs)
    scan_layers: bool = False  # one compiled block scanned over stacked layer params (compile time flat in depth)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        choices = {
            "activation": tuple(ACTIVATIONS),
            "pos_encoding": ("learned", "sinusoidal"),
            "attention": ("fused", "heads"),
            "norm_position": ("pre", "post"),
            "attention_impl": ATTENTION_IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"model.{name} is not a dtype: {getattr(self, name)!r}") from None
        if self.attention_impl == "cudnn":
            # cuDNN's fused kernel has no dropout on the attention weights and runs only in 16-bit.
            if self.dropout > 0:
                raise ValueError(
                    f"model.attention_impl='cudnn' has no attention dropout but model.dropout={self.dropout}: "
                    "set model.dropout=0 or model.attention_impl='xla'"
                )
            if jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
                raise ValueError(
                    f"model.attention_impl='cudnn' needs model.dtype 'bfloat16' or 'float16', got {self.dtype!r}"
                )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n independent keys, or n Nones when there is no randomness (evaluation)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def _dot_f32_acc(a: jax.Array, b: jax.Array, dimension_numbers=None) -> jax.Array:
    """`lax.dot_general` accumulating in float32, cast back to the operands' dtype (default: a @ b,
    contracting a's last axis with b's first).

    The same as the plain dot for float32. For bfloat16 it is what mixed precision means, and XLA's
    CPU backend runs bf16 x bf16 -> f32 GEMMs on the CPU's bf16 units (about 1.8x float32 on an
    AVX512-BF16 CPU), while bf16 x bf16 -> bf16 takes a slower path than float32.
    """
    dimension_numbers = dimension_numbers or (((a.ndim - 1,), (0,)), ((), ()))
    out = jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(a, b))


@jax.custom_vjp
def _matmul_cpu(x_NK: jax.Array, w_KM: jax.Array) -> jax.Array:
    return _dot_f32_acc(x_NK, w_KM)


def _matmul_cpu_fwd(x_NK, w_KM):
    return _dot_f32_acc(x_NK, w_KM), (x_NK, w_KM)


def _matmul_cpu_bwd(residuals, g_NM):
    # The weight gradient contracts over batch·time, the major axis of both x and g. Left to autodiff
    # (x^T g), XLA's CPU backend transposes the activations x and g inside the fusions that produce them,
    # reading every input with a stride: a third of a small model's step. Computing g^T x instead and
    # transposing that weight-sized result leaves the activations in their natural layout. Same products
    # and sums as autodiff's.
    x_NK, w_KM = residuals
    K, M = w_KM.shape
    dw_MK = _dot_f32_acc(g_NM.reshape(-1, M), x_NK.reshape(-1, K), (((0,), (0,)), ((), ())))
    dx_NK = _dot_f32_acc(g_NM, w_KM.T)
    return dx_NK.astype(x_NK.dtype), dw_MK.T.astype(w_KM.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """nnx.Linear's dot: `lax.dot_general`, with a backward laid out for XLA's CPU GEMMs on the CPU.

    About 1.7x faster training steps on a 2-core CPU for nanoGPT's CPU shape (benchmarks/RESULTS.md); GPUs and
    TPUs take transposed GEMM operands natively, so they keep the plain dot, and so do several (simulated)
    CPU devices, where the sharded plain dot is what GPUs and TPUs run.
    """
    plain = (
        jax.default_backend() != "cpu"
        or jax.device_count() > 1
        or rhs.ndim != 2
        or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ()))
        or preferred_element_type is not None
        or kwargs.get("out_sharding") is not None
    )
    if plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    return _matmul_cpu(lhs, rhs)


def _linear(config: GPTConfig, n_in: int, n_out: int, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=config.bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros,
        dot_general=_dense_dot_general,
        rngs=rngs,
    )


def _residual_std(config: GPTConfig) -> float:
    """nanoGPT's special init for projections into the residual stream (GPT-2 paper)."""
    return 0.02 / math.sqrt(2 * config.n_layer)


def _layer_norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] like torch, not E[x^2] - mean^2.
    return nnx.LayerNorm(
        config.n_embd,
        epsilon=config.ln_eps,
        use_bias=config.bias,
        use_fast_variance=False,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        rngs=rngs,
    )


def sinusoidal_positions(T: int, C: int) -> jax.Array:
    """The Transformer paper's fixed encoding: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(.)."""
    pos = np.arange(T, dtype=np.float64)[:, None]
    div = np.power(10000.0, np.arange(0, C, 2, dtype=np.float64) / C)
    pe = np.zeros((T, C), dtype=np.float64)
    pe[:, 0::2] = np.sin(pos / div)
    pe[:, 1::2] = np.cos(pos / div)[:, : C // 2]
    return jnp.asarray(pe, dtype=jnp.float32)


def attend(
    q_BHTD: jax.Array,
    k_BHSD: jax.Array,
    v_BHSD: jax.Array,
    *,
    impl: str = "xla",
    dropout_rate: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Causal attention by `impl` (GPTConfig.attention_impl) -> (B, H, T, D).

    'reference' is the lecture's `attention` (explicit mask, float32 softmax, dropout on the weights).
    'xla' and 'cudnn' call `jax.nn.dot_product_attention`, which has no dropout: when attention dropout
    is active (training with `dropout_rate > 0` and a key), 'xla' takes the reference path, so the
    dropout nanoGPT applies to the weights still happens; 'cudnn' with dropout is refused by GPTConfig.
    """
    if impl == "reference" or (impl == "xla" and dropout_rate > 0.0 and key is not None):
        return attention(q_BHTD, k_BHSD, v_BHSD, causal=True, dropout_rate=dropout_rate, key=key)
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on {jax.default_backend()!r}: "
            "use model.attention_impl='xla'"
        )
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    # dot_product_attention takes (B, T, N, H); its softmax runs in float32 for 16-bit inputs.
    to_btnh = lambda t: jnp.swapaxes(t, -3, -2)  # noqa: E731
    y_BTHD = jax.nn.dot_product_attention(
        to_btnh(q_BHTD), to_btnh(k_BHSD), to_btnh(v_BHSD), is_causal=True, implementation=impl
    )
    return to_btnh(y_BTHD)


class Head(nnx.Module):
    """One head of causal self-attention: the lecture's `Head` (key, query, value projections)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.key = _linear(config, config.n_embd, config.head_size, rngs)
        self.query = _linear(config, config.n_embd, config.head_size, rngs)
        self.value = _linear(config, config.n_embd, config.head_size, rngs)
        self.dropout_rate = config.dropout
        self.attention_impl = config.attention_impl

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        k_BTD, q_BTD, v_BTD = self.key(x_BTC), self.query(x_BTC), self.value(x_BTC)
        one_head = lambda t: t[:, None]  # noqa: E731  (B, T, D) -> (B, 1, T, D)
        y_B1TD = attend(
            one_head(q_BTD),
            one_head(k_BTD),
            one_head(v_BTD),
            impl=self.attention_impl,
            dropout_rate=self.dropout_rate,
            key=key,
        )
        return y_B1TD[:, 0]


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


class CausalSelfAttention(nnx.Module):
    """nanoGPT's fused form: one matmul makes q, k and v for all heads at once."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.c_attn = _linear(config, config.n_embd, 3 * config.n_embd, rngs)
        self.c_proj = _linear(config, config.n_embd, config.n_embd, rngs, std=_residual_std(config))
        self.n_head = config.n_head
        self.dropout_rate = config.dropout
        self.attention_impl = config.attention_impl

    def qkv(self, x_BTC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projects x to queries, keys and values split into heads: three (B, H, T, head_size)."""
        B, T, C = x_BTC.shape
        qkv_BT3C = self.c_attn(x_BTC)
        q, k, v = jnp.split(qkv_BT3C, 3, axis=-1)
        to_heads = lambda t: t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3)  # noqa: E731
        return to_heads(q), to_heads(k), to_heads(v)

    def project(self, y_BHTD: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Re-assembles the heads side by side and projects back into the residual stream."""
        B, H, T, D = y_BHTD.shape
        y_BTC = y_BHTD.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        return dropout(self.c_proj(y_BTC), self.dropout_rate, key)

    def __call__(self, x_BTC: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        att_key, proj_key = _split(key, 2)
        q_BHTD, k_BHTD, v_BHTD = self.qkv(x_BTC)
        y_BHTD = attend(q_BHTD, k_BHTD, v_BHTD, impl=self.attention_impl, dropout_rate=self.dropout_rate, key=att_key)
        return self.project(y_BHTD, key=proj_key)


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
    "Add & Norm") normalises after each residual sum.
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
        if self.norm_position == "pre":
            x_BTC = x_BTC + self.attn(self.ln_1(x_BTC), key=attn_key)
            x_BTC = x_BTC + self.mlp(self.ln_2(x_BTC), key=mlp_key)
        else:
            x_BTC = self.ln_1(x_BTC + self.attn(x_BTC, key=attn_key))
            x_BTC = self.ln_2(x_BTC + self.mlp(x_BTC, key=mlp_key))
        return x_BTC


class GPT(nnx.Module):
    """Token + position embeddings, a stack of Blocks, a final LayerNorm and the language-model head."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        init = nnx.initializers.normal(0.02)
        # The lecture's token_embedding_table and position_embedding_table.
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=init, rngs=rngs, **dtypes)
        if config.pos_encoding == "learned":
            self.wpe = nnx.Embed(config.block_size, config.n_embd, embedding_init=init, rngs=rngs, **dtypes)
        else:
            self.wpe = None
        blocks = [Block(config, rngs=rngs) for _ in range(config.n_layer)]  # the lecture's blocks
        # scan_layers: one Block whose parameters carry a leading n_layer axis (the same draws as unstacked).
        self.h = _stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
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

    @classmethod
    def from_pretrained(cls, local_dir: str, **config_overrides) -> GPT:
        """GPT-2 weights from a local Hugging Face folder (config.json + model.safetensors or pytorch_model.bin).

        See `jaxgpt.convert.load_gpt2_pretrained`; nothing is downloaded.
        """
        from jaxgpt.convert import load_gpt2_pretrained  # convert imports this module

        return load_gpt2_pretrained(local_dir, **config_overrides)

    def embed(self, idx_BT: jax.Array, *, start: int | jax.Array = 0) -> jax.Array:
        """Token embeddings plus the embeddings of positions start, start + 1, ..."""
        T = idx_BT.shape[1]
        tok_emb_BTC = self.wte(idx_BT)
        if self.wpe is not None:
            pos_emb_TC = self.wpe(start + jnp.arange(T))
        else:
            table = sinusoidal_positions(self.config.block_size, self.config.n_embd)
            pos_emb_TC = jax.lax.dynamic_slice_in_dim(table, start, T).astype(tok_emb_BTC.dtype)
        return tok_emb_BTC + pos_emb_TC

    def head(self, x_BTC: jax.Array) -> jax.Array:
        """Final LayerNorm and projection to vocabulary logits (float32)."""
        x_BTC = self.ln_f(x_BTC)
        logits_BTV = self.wte.attend(x_BTC) if self.lm_head is None else self.lm_head(x_BTC)
        return logits_BTV.astype(jnp.float32)

    def __call__(self, idx_BT: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """idx (B, T) int token ids -> logits (B, T, vocab_size). `key` enables dropout."""
        chex.assert_rank(idx_BT, 2)
        B, T = idx_BT.shape
        if T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {T}: the model's block_size is {self.config.block_size}"
            )
        drop_key, *block_keys = _split(key, self.config.n_layer + 1)
        x_BTC = dropout(self.embed(idx_BT), self.config.dropout, drop_key)
        x_BTC = self.blocks(x_BTC, block_keys)
        logits_BTV = self.head(x_BTC)
        chex.assert_shape(logits_BTV, (B, T, self.config.vocab_size))
        return logits_BTV

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

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; as nanoGPT, position embeddings are not counted when `non_embedding`."""
        n = sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
        if non_embedding and self.wpe is not None:
            n -= self.wpe.embedding.size
        return int(n)


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block holding the parameters of `blocks` stacked along a new leading layer axis."""
    graphdef, *states = (nnx.split(blocks[0])[0], *(nnx.state(b) for b in blocks))
    return nnx.merge(graphdef, jax.tree.map(lambda *layers: jnp.stack(layers), *states))


def _raw(state) -> dict:
    """The nested dicts inside an nnx.State (its sub-states are plain dicts), or a plain mapping's copy."""
    return dict(state.raw_mapping) if isinstance(state, nnx.State) else dict(state)


def stack_layers(state: nnx.State) -> nnx.State:
    """A GPT state with per-layer blocks (`h.0`, `h.1`, ...) -> the `scan_layers` form (`h` stacked).

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
    """The `scan_layers` form (`h` stacked along axis 0) -> per-layer blocks `h.0`, `h.1`, ..., as
    `jaxgpt.convert` and unscanned models expect."""
    raw = _raw(state)
    stacked = raw["h"]
    if any(isinstance(k, int) for k in stacked.keys()):
        raise ValueError("unstack_layers expects stacked blocks under 'h': it holds per-layer blocks already")
    n_layer = jax.tree.leaves(stacked)[0].shape[0]
    raw["h"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layer)}
    return nnx.State(raw)


def with_layout(model: GPT, scan_layers: bool) -> GPT:
    """The same weights in the other parameter layout: a new GPT with `config.scan_layers` set."""
    if model.config.scan_layers == scan_layers:
        return model
    config = dataclasses.replace(model.config, scan_layers=scan_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    state = nnx.state(model)
    return nnx.merge(graphdef, stack_layers(state) if scan_layers else unstack_layers(state))


class BigramLanguageModel(nnx.Module):
    """The lecture's first model: each token reads the logits of the next one from a table row."""

    def __init__(self, vocab_size: int, block_size: int = 8, *, rngs: nnx.Rngs):
        # torch's nn.Embedding default init, N(0, 1), as in the lecture.
        self.token_embedding_table = nnx.Embed(
            vocab_size, vocab_size, embedding_init=nnx.initializers.normal(1.0), rngs=rngs
        )
        self.block_size = block_size  # only bounds the context that `generate` keeps

    def __call__(self, idx_BT: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(idx_BT, 2)
        return self.token_embedding_table(idx_BT).astype(jnp.float32)


def loss_fn(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy of next-token prediction, computed in float32 (F.cross_entropy)."""
    chex.assert_equal_shape_prefix([logits_BTV, targets_BT], targets_BT.ndim)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    return losses.mean()
