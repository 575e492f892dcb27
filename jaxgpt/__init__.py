"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as pure JAX functions and Flax NNX modules."""

from jaxgpt.convert import (
    from_torch_state_dict,
    load_gpt2_pretrained,
    load_init_from,
    load_nanogpt_checkpoint,
    save_nanogpt_checkpoint,
    to_torch_state_dict,
)
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
from jaxgpt.tokenizer import CharTokenizer, HFTokenizer, TiktokenTokenizer, load_tokenizer, tokenizer_from_dict

__all__ = [
    "GPT",
    "MLP",
    "BigramLanguageModel",
    "Block",
    "CausalSelfAttention",
    "CharTokenizer",
    "GPTConfig",
    "HFTokenizer",
    "Head",
    "MultiHeadAttention",
    "TiktokenTokenizer",
    "from_torch_state_dict",
    "load_gpt2_pretrained",
    "load_init_from",
    "load_nanogpt_checkpoint",
    "load_tokenizer",
    "generate",
    "generate_stream",
    "loss_fn",
    "save_nanogpt_checkpoint",
    "to_torch_state_dict",
    "tokenizer_from_dict",
]
__version__ = "0.1.0"
