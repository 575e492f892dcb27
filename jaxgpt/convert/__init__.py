"""Conversion between jaxgpt's NNX state and PyTorch-side formats, one module per format:

    torch_names   nanoGPT-style state dicts <-> NNX state (the name mapping below)
    nanogpt       nanoGPT's ckpt.pt, read and written
    gpt2          a local Hugging Face GPT-2 folder

and `load_init_from`, which picks one for train.py / sample.py's `init_from`.

The mapping is mechanical because the module names are nanoGPT's:

    NNX path                       torch name                             value
    wte/embedding                  transformer.wte.weight                 as is
    h/0/attn/c_attn/kernel         transformer.h.0.attn.c_attn.weight     transposed ((in, out) vs (out, in))
    h/0/ln_1/scale                 transformer.h.0.ln_1.weight            as is
    lm_head/kernel                 lm_head.weight                         transposed

Non-parameter buffers of nanoGPT (the causal mask `attn.bias`, `attn.masked_bias`) are ignored, as is
torch.compile's `_orig_mod.` prefix. With tied embeddings the torch dict carries the shared matrix
twice (`transformer.wte.weight` and `lm_head.weight`); jaxgpt holds it once.
"""

from __future__ import annotations

from pathlib import Path

from jaxgpt.convert.gpt2 import gpt2_config_from_hf, hf_gpt2_to_nanogpt, load_gpt2_pretrained
from jaxgpt.convert.nanogpt import (
    _NANOGPT_DEFAULT_BEST_VAL_LOSS,
    NANOGPT_MODEL_ARGS,
    find_nanogpt_meta,
    load_nanogpt_checkpoint,
    nanogpt_param_names,
    save_nanogpt_checkpoint,
)
from jaxgpt.convert.torch_names import from_torch_state_dict, strip_prefix, to_torch_state_dict, torch_name
from jaxgpt.model import GPT

__all__ = ["NANOGPT_MODEL_ARGS", "find_nanogpt_meta", "from_torch_state_dict", "gpt2_config_from_hf",
           "hf_gpt2_to_nanogpt", "load_gpt2_pretrained", "load_init_from", "load_nanogpt_checkpoint",
           "nanogpt_param_names", "save_nanogpt_checkpoint", "strip_prefix", "to_torch_state_dict", "torch_name"]


def load_init_from(spec: str, **config_overrides) -> tuple[GPT, object | None, dict]:
    """`(model, tokenizer_or_None, info)` for an `init_from` string of train.py / sample.py.

    - 'nanogpt:PATH': a nanoGPT out_dir or ckpt.pt (`load_nanogpt_checkpoint`; info as there);
    - 'gpt2:PATH' / 'hf:PATH': a local Hugging Face GPT-2 folder (`load_gpt2_pretrained`), with its
      tokenizer.json when the folder has one; info is {'iter_num': 0, 'source': PATH}.
    `config_overrides` set GPTConfig fields (dropout to fine-tune, a smaller block_size for GPT-2).
    """
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in ("nanogpt", "gpt2", "hf"):
        raise ValueError(f"init_from {spec!r} is not 'nanogpt:PATH', 'gpt2:PATH' or 'hf:PATH'")
    if kind == "nanogpt":
        return load_nanogpt_checkpoint(path, **config_overrides)
    model = load_gpt2_pretrained(path, **config_overrides)
    tokenizer = None
    if (Path(path) / "tokenizer.json").is_file():
        from jaxgpt.tokenizer import HFTokenizer

        tokenizer = HFTokenizer.from_file(Path(path) / "tokenizer.json")
    return model, tokenizer, {"iter_num": 0, "best_val_loss": _NANOGPT_DEFAULT_BEST_VAL_LOSS, "source": path}
