"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as pure JAX functions and Flax NNX modules."""

import importlib

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

# Submodules reachable as attributes (`jaxgpt.data.get_batch`), each imported on first use so that
# `import jaxgpt` does not pay for all of them.
_SUBMODULES = frozenset({
    "attention", "checkpoint", "config", "convert", "data", "mfu", "model", "optim", "plotting", "prepare",
    "sampling", "sharding", "tokenizer", "training",
})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxgpt.{name}")
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
