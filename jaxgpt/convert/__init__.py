"""Conversion between jaxgpt's NNX state and PyTorch-side formats, one module per format:

    torch_names   nanoGPT-style state dicts <-> NNX state (the parameter-name mapping)
    nanogpt       nanoGPT's ckpt.pt, read and written
    gpt2          a local Hugging Face GPT-2 folder

and `load_init_from`, which picks one for train.py / sample.py's `init_from`.

`torch_names` holds the name mapping; nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

from jaxgpt.convert.gpt2 import gpt2_config_from_hf, hf_gpt2_to_nanogpt, load_gpt2_pretrained
from jaxgpt.convert.nanogpt import (
    NANOGPT_DEFAULT_BEST_VAL_LOSS,
    NANOGPT_MODEL_ARGS,
    find_nanogpt_meta,
    load_nanogpt_checkpoint,
    nanogpt_param_names,
    save_nanogpt_checkpoint,
)
from jaxgpt.convert.torch_names import from_torch_state_dict, strip_prefix, to_torch_state_dict, torch_name
from jaxgpt.model import GPT

__all__ = ["NANOGPT_DEFAULT_BEST_VAL_LOSS", "NANOGPT_MODEL_ARGS", "InitFromError", "find_nanogpt_meta",
           "from_torch_state_dict", "gpt2_config_from_hf", "hf_gpt2_to_nanogpt", "load_gpt2_pretrained",
           "load_init_from", "load_nanogpt_checkpoint", "nanogpt_param_names", "save_nanogpt_checkpoint",
           "strip_prefix", "to_torch_state_dict", "torch_name"]


class InitFromError(ValueError):
    """An `init_from` spec that could not be read, for any reason (a bad spec, a missing or unreadable file, a
    refused pickle, a missing package): one line naming the spec. `spec` is the spec and `reason` the cause, so
    a command line can phrase it with its own option name; the original exception is the `__cause__`."""

    def __init__(self, spec: str, reason: str):
        self.spec, self.reason = spec, reason
        super().__init__(f"init_from {spec!r}: {reason}")


def load_init_from(spec: str, **config_overrides) -> tuple[GPT, object | None, dict]:
    """`(model, tokenizer_or_None, info)` for an `init_from` string of train.py / sample.py.

    - 'nanogpt:PATH': a nanoGPT out_dir or ckpt.pt (`load_nanogpt_checkpoint`; info as there);
    - 'gpt2:PATH' / 'hf:PATH': a local Hugging Face GPT-2 folder (`load_gpt2_pretrained`), with its
      tokenizer.json when the folder has one; info is {'iter_num': 0, 'best_val_loss': 1e9, 'source': PATH}.
    `config_overrides` set GPTConfig fields (dropout to fine-tune, a smaller block_size for GPT-2).
    Every failure to read it (OSError, ValueError, ImportError) is raised as one `InitFromError`.
    """
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in ("nanogpt", "gpt2", "hf"):
        raise InitFromError(spec, "it is not 'nanogpt:PATH', 'gpt2:PATH' or 'hf:PATH'")
    try:
        return _load(kind, path, config_overrides)
    except (OSError, ValueError, ImportError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InitFromError(spec, " ".join(lines) or type(e).__name__) from e


def _load(kind: str, path: str, config_overrides: dict) -> tuple[GPT, object | None, dict]:
    if kind == "nanogpt":
        return load_nanogpt_checkpoint(path, **config_overrides)
    model = load_gpt2_pretrained(path, **config_overrides)
    tokenizer = None
    if (Path(path) / "tokenizer.json").is_file():
        from jaxgpt.tokenizer import HFTokenizer

        tokenizer = HFTokenizer.from_file(Path(path) / "tokenizer.json")
    return model, tokenizer, {"iter_num": 0, "best_val_loss": NANOGPT_DEFAULT_BEST_VAL_LOSS, "source": path}
