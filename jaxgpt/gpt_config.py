"""The model's hyper-parameters, `GPTConfig`, checked when made; `jaxgpt.model` builds the modules from one.

Field names are nanoGPT's, so `GPTConfig(**ckpt['model_args'])` works. `ACTIVATIONS` names the non-linearities
a config may choose.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.attention import ATTENTION_IMPLS

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU, as torch's nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's original approximation
    "relu": jax.nn.relu,  # the lecture's gpt.py
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # ReLU squared (Primer; modded-nanogpt's speedruns)
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
    activation: str = "gelu"  # 'gelu' (exact) | 'gelu_tanh' | 'relu' | 'relu2' (relu(x)**2)
    tie_embeddings: bool = True  # lm_head shares wte's matrix (nanoGPT, GPT-2)
    # 'learned' (wpe table) | 'sinusoidal' (the Transformer paper) | 'rotary' (RoPE: q and k rotated by position)
    pos_encoding: str = "learned"
    attention: str = "fused"  # 'fused' (nanoGPT's one c_attn) | 'heads' (the lecture's list of Head)
    norm_position: str = "pre"  # 'pre' (GPT-2) | 'post' (the Transformer paper's Add & Norm)
    ln_eps: float = 1e-5  # the epsilon of every LayerNorm or RMSNorm, qk_norm's included
    norm: str = "layernorm"  # 'layernorm' (nanoGPT) | 'rmsnorm' (x / rms(x), no weights) for ln_1, ln_2, ln_f
    qk_norm: bool = False  # RMSNorm (no weights) on each head's queries and keys before the scores
    zero_init_proj: bool = False  # the residual projections (attention's and MLP's c_proj) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), in float32; 0: off
    dtype: str = "float32"  # computation dtype ('bfloat16' for mixed precision)
    param_dtype: str = "float32"
    # 'auto' (cuDNN's flash attention in a 16-bit GPU program, else XLA's) | 'xla' | 'cudnn' | 'reference' (the ladder)
    attention_impl: str = "auto"
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more FLOPs)
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
            "pos_encoding": ("learned", "sinusoidal", "rotary"),
            "norm": ("layernorm", "rmsnorm"),
            "attention": ("fused", "heads"),
            "norm_position": ("pre", "post"),
            "attention_impl": ATTENTION_IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos_encoding == "rotary" and self.head_size % 2:
            raise ValueError(f"model.pos_encoding='rotary' rotates pairs of channels: the head size "
                             f"n_embd // n_head = {self.head_size} must be even")
        if not 0.0 <= self.logit_softcap < float("inf"):
            raise ValueError(f"model.logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
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
                    "set model.dropout=0, or model.attention_impl='auto' (a fused kernel with dropout on GPUs)"
                )
            if jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
                raise ValueError(
                    f"model.attention_impl='cudnn' needs model.dtype 'bfloat16' or 'float16', got {self.dtype!r}"
                )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head
