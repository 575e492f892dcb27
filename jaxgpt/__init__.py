"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as pure JAX functions and Flax NNX modules."""

from jaxgpt.convert import from_torch_state_dict, to_torch_state_dict
from jaxgpt.model import (
    GPT,
    MLP,
    BigramLanguageModel,
    Block,
    CausalSelfAttention,
    GPTConfig,
    Head,
    MultiHeadAttention,
    loss_fn,
)
from jaxgpt.sampling import generate, generate_stream
from jaxgpt.tokenizer import CharTokenizer

__all__ = [
    "GPT",
    "MLP",
    "BigramLanguageModel",
    "Block",
    "CausalSelfAttention",
    "CharTokenizer",
    "GPTConfig",
    "Head",
    "MultiHeadAttention",
    "from_torch_state_dict",
    "generate",
    "generate_stream",
    "loss_fn",
    "to_torch_state_dict",
]
__version__ = "0.1.0"
