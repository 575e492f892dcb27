"""GPT-2 in the Hugging Face layout (config.json + model.safetensors / pytorch_model.bin), from a local folder."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxgpt.convert.torch_names import BUFFER_NAME, from_torch_state_dict, import_torch, to_numpy
from jaxgpt.model import GPT, GPTConfig
from jaxgpt.safe_pickle import UnsafePickleError, load_torch_checkpoint

_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# GPT-2's Conv1D layers store (in, out), the layout of an NNX kernel; nanoGPT's Linear stores (out, in).
_HF_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def gpt2_config_from_hf(hf_config: Mapping, **overrides) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 `config.json` (a dict); raises on what jaxgpt cannot express."""
    if hf_config.get("model_type") != "gpt2":
        raise ValueError(
            f"config.json has model_type={hf_config.get('model_type')!r}: only GPT-2 ('gpt2') folders load"
        )
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions") if k not in hf_config]
    if missing:
        raise ValueError(f"config.json lacks GPT-2 fields {missing}")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not one of {sorted(_HF_ACTIVATIONS)}")
    n_embd = hf_config["n_embd"]
    if hf_config.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"n_inner={hf_config['n_inner']} but jaxgpt's MLP is 4 * n_embd = {4 * n_embd} wide")
    if not hf_config.get("scale_attn_weights", True) or hf_config.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("only GPT-2's standard 1/sqrt(head_size) attention scaling is supported")
    fields = dict(
        block_size=hf_config["n_positions"],
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=n_embd,
        dropout=0.0,  # inference by default; pass dropout=... to fine-tune
        bias=True,
        activation=_HF_ACTIVATIONS[act],
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        ln_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
    )
    fields.update(overrides)
    return GPTConfig(**fields)


def _read_hf_weights(folder: Path) -> dict[str, np.ndarray]:
    try:
        return _read_hf_weight_files(folder)
    except (UnsafePickleError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' and torch's errors for a garbled file, in one line
        reason = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{folder}: cannot read the GPT-2 weights ({type(e).__name__}: {reason})") from None


def _read_hf_weight_files(folder: Path) -> dict[str, np.ndarray]:
    if (folder / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        from safetensors.numpy import load_file

        index = json.loads((folder / "model.safetensors.index.json").read_text())
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    if (folder / "pytorch_model.bin").is_file():
        import_torch()  # the install hint, before the file is touched
        path = folder / "pytorch_model.bin"
        state_dict = load_torch_checkpoint(path)  # weights only: a pickled global is refused, never run
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
        return dict(state_dict)
    raise FileNotFoundError(f"{folder} has none of the GPT-2 weight files {list(_HF_WEIGHT_FILES)}")


def hf_gpt2_to_nanogpt(state_dict: Mapping) -> dict:
    """Renames a Hugging Face GPT-2 state dict to nanoGPT's names and layouts (lazy transposes).

    Old checkpoints (the hub's `gpt2` pytorch_model.bin) lack the `transformer.` prefix; the `attn.bias`
    and `attn.masked_bias` buffers are dropped.
    """
    out = {}
    for name, value in state_dict.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if BUFFER_NAME.match(name):
            continue
        if _HF_CONV1D.search(name):
            value = to_numpy(value).T  # a view: from_torch_state_dict transposes it back
        out[name] = value
    return out


def load_gpt2_pretrained(local_dir: str | os.PathLike, **config_overrides) -> GPT:
    """A `GPT` holding the weights of a local Hugging Face GPT-2 folder.

    Reads `config.json` and `model.safetensors` (sharded or not) or `pytorch_model.bin`; never downloads.
    GPT-2 is tanh-GELU, biased, tied, pre-LN with learned positions. `config_overrides` set GPTConfig
    fields: `dropout`, `dtype`, or a smaller `block_size` (the position table is cropped, as nanoGPT's
    `crop_block_size`).
    """
    folder = Path(local_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give a local GPT-2 folder (config.json + weights)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, not JSON
        raise ValueError(f"{folder / 'config.json'} is not a JSON file ({e})") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{folder / 'config.json'} holds a JSON {type(hf_config).__name__}, not a config object")
    n_positions = hf_config.get("n_positions")
    config = gpt2_config_from_hf(hf_config, **config_overrides)
    state_dict = hf_gpt2_to_nanogpt(_read_hf_weights(folder))
    if n_positions is not None and config.block_size < n_positions and "transformer.wpe.weight" in state_dict:
        state_dict["transformer.wpe.weight"] = to_numpy(state_dict["transformer.wpe.weight"])[: config.block_size]
    elif n_positions is not None and config.block_size > n_positions:
        raise ValueError(f"block_size={config.block_size} exceeds the model's {n_positions} positions")
    return from_torch_state_dict(config, state_dict)
