"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as pure JAX functions and Flax NNX modules.

The names below are imported on first use (`jaxgpt.GPT`, `jaxgpt.data.get_batch`), so `import jaxgpt`
costs nothing and importing one module of the package loads only what that module needs.

Sampling: `jaxgpt.generate` / `generate_stream` / `prepare_generate` are the compiled key/value-cache sampler
(`jaxgpt.decode`), the one to use; `jaxgpt.sampling.generate` is the lecture's loop, the readable reference that
draws the same tokens (its rules for the next token, `sample_next` and `filter_logits`, are exported too).
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "GPT": "model", "MLP": "model", "BigramLanguageModel": "model", "Block": "model",
    "CausalSelfAttention": "model", "GPTConfig": "model", "Head": "model", "MultiHeadAttention": "model",
    "loss_fn": "model",
    "generate": "decode", "generate_stream": "decode", "prepare_generate": "decode",
    "filter_logits": "sampling", "sample_next": "sampling",
    "CharTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "TiktokenTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer", "tokenizer_from_dict": "tokenizer",
    "InitFromError": "convert", "from_torch_state_dict": "convert", "load_gpt2_pretrained": "convert",
    "load_init_from": "convert",
    "load_nanogpt_checkpoint": "convert", "save_nanogpt_checkpoint": "convert", "to_torch_state_dict": "convert",
}
_SUBMODULES = frozenset({
    "attention", "checkpoint", "config", "config_help", "convert", "cpu_matmul", "data", "data_meta", "decode",
    "dropout", "gpt_config", "host_feed", "initializers", "kv_cache", "layout", "mfu", "model", "optim", "plotting",
    "prepare", "run_dir", "safe_pickle", "sampling", "sharding", "target", "tokenizer", "train_loop", "train_step",
    "training",
})

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxgpt.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxgpt.{name}")
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
