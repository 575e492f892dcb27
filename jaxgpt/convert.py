"""Conversion between jaxgpt's NNX state and nanoGPT-style PyTorch state dicts.

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

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.layout import unstack_layers, with_layout
from jaxgpt.model import GPT, GPTConfig
from jaxgpt.safe_pickle import UnsafePickleError, load_torch_checkpoint

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def torch_name(path: tuple) -> tuple[str, bool]:
    """The torch state-dict name of an NNX parameter path, and whether the value is transposed."""
    *modules, leaf = (str(p) for p in path)
    name = ".".join([*modules, _LEAF_NAMES[leaf]])
    if modules[0] != "lm_head":
        name = "transformer." + name
    return name, leaf == "kernel"


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def strip_prefix(state_dict: Mapping) -> dict:
    """Removes torch.compile's `_orig_mod.` prefix from the keys, as nanoGPT's loader does."""
    prefix = "_orig_mod."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def from_torch_state_dict(config: GPTConfig, state_dict: Mapping) -> GPT:
    """Builds a `GPT` for `config` holding the weights of a nanoGPT-style state dict.

    Accepts torch tensors or numpy arrays. A missing tensor, a tensor of the wrong shape or an
    unexpected parameter raises a `ValueError` naming it (and both shapes).
    """
    state_dict = strip_prefix(state_dict)
    if config.scan_layers:  # torch names are per layer: convert unstacked, then stack
        return with_layout(from_torch_state_dict(dataclasses.replace(config, scan_layers=False), state_dict), True)
    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    used = set()
    leaves = []
    for path, variable in nnx.to_flat_state(params):
        name, transpose = torch_name(path)
        expected = tuple(variable.shape[::-1] if transpose else variable.shape)
        if name not in state_dict:
            raise ValueError(f"state dict has no tensor {name!r} (expected shape {expected})")
        value = _to_numpy(state_dict[name])
        if value.shape != expected:
            raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)} but the model expects {expected}")
        value = value.T if transpose else value
        # jnp.array copies: a zero-copy view of a torch tensor would change when torch trains in place.
        leaves.append((path, variable.replace(jnp.array(value, dtype=variable.dtype))))
        used.add(name)
    if config.tie_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(k for k in state_dict if k not in used and not _BUFFER.match(k))
    if unexpected:
        raise ValueError(f"state dict has parameters the model does not: {unexpected[:5]} (check the config)")
    params = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, params, rest)


def to_torch_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """nanoGPT-style state dict (numpy arrays) of `model`; tied models also carry `lm_head.weight`."""
    out: dict[str, np.ndarray] = {}
    model = with_layout(model, scan_layers=False)  # torch names are per layer
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = torch_name(path)
        value = np.asarray(variable[...])
        out[name] = np.ascontiguousarray(value.T) if transpose else value
    if model.config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


# --------------------------------------------------------------------------------------------------
# nanoGPT checkpoints (ckpt.pt)
# --------------------------------------------------------------------------------------------------

# The keys of nanoGPT's `model_args`; its GPTConfig takes exactly these, so a checkpoint meant for
# nanoGPT must carry no others.
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# The architecture nanoGPT's model.py implements, in jaxgpt's terms.
_NANOGPT_ARCH = dict(
    activation="gelu", tie_embeddings=True, pos_encoding="learned", attention="fused", norm_position="pre", ln_eps=1e-5
)
_JAXGPT_CONFIG_KEY = "jaxgpt_config"  # extra top-level key: the full GPTConfig, for non-nanoGPT variants
_NANOGPT_DEFAULT_BEST_VAL_LOSS = 1e9  # nanoGPT's train.py starts from this


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading or writing PyTorch checkpoints needs torch: pip install 'jaxgpt[interop]'") from None
    return torch


def _resolve_ckpt(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no nanoGPT checkpoint at {path}: give nanoGPT's out_dir or the path of its ckpt.pt")
    return path


def _config_from_model_args(model_args: Mapping, extra: Mapping | None) -> GPTConfig:
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    args = dict(extra) if extra is not None else dict(model_args)
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"checkpoint model_args has keys jaxgpt's GPTConfig does not know: {unknown}")
    return GPTConfig(**args)


def find_nanogpt_meta(ckpt_path: str | os.PathLike, config: Mapping | None = None) -> Path | None:
    """Where the char vocabulary (`meta.pkl`) of a nanoGPT run is, or None.

    Looked for next to ckpt.pt, then as `data/<dataset>/meta.pkl` (nanoGPT's layout, `dataset` from the
    checkpoint's config) relative to the checkpoint's folder, its parent (nanoGPT's repository root when
    out_dir sits inside it) and the current directory.
    """
    ckpt_dir = Path(ckpt_path).parent
    candidates = [ckpt_dir / "meta.pkl"]
    dataset = (config or {}).get("dataset") if isinstance(config, Mapping) else None
    if dataset:
        for root in (ckpt_dir, ckpt_dir.parent, Path.cwd()):
            candidates.append(root / "data" / str(dataset) / "meta.pkl")
    return next((c for c in candidates if c.is_file()), None)


def load_nanogpt_checkpoint(
    path: str | os.PathLike, *, meta_path: str | os.PathLike | None = None, **config_overrides
) -> tuple[GPT, object | None, dict]:
    """Loads a nanoGPT `ckpt.pt` (or the out_dir holding it) as a jaxgpt `GPT`.

    Returns `(model, tokenizer, info)`: the tokenizer comes from the run's `meta.pkl` when one is found
    (see `find_nanogpt_meta`, or pass `meta_path`) and is None otherwise — nanoGPT then means GPT-2's BPE,
    `jaxgpt.tokenizer.load_tokenizer('gpt2')`. `info` holds `iter_num`, `best_val_loss`, `config` (nanoGPT's
    training config dict), `model_args`, `meta_path` and `optimizer` (the torch optimizer state, if any).
    `config_overrides` replace GPTConfig fields (e.g. `dropout=0.1` to fine-tune, `dtype='bfloat16'`).
    The state dict may carry torch.compile's `_orig_mod.` prefix and the `attn.bias` mask buffers.
    """
    _import_torch()  # the install hint, before the file is touched
    ckpt_path = _resolve_ckpt(path)
    try:
        # weights_only=True: nanoGPT's config dict is plain values; a pickled global in a downloaded file is refused.
        checkpoint = load_torch_checkpoint(ckpt_path)
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"{ckpt_path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{ckpt_path} holds a {type(checkpoint).__name__}, not nanoGPT's checkpoint dict")
    missing = [k for k in ("model_args", "model") if k not in checkpoint]
    if missing:
        raise ValueError(
            f"{ckpt_path} is not a nanoGPT checkpoint: it has no {missing} (keys: {sorted(checkpoint)[:8]})"
        )
    config = _config_from_model_args(checkpoint["model_args"], checkpoint.get(_JAXGPT_CONFIG_KEY))
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    model = from_torch_state_dict(config, checkpoint["model"])
    train_config = checkpoint.get("config") or {}
    meta = Path(meta_path) if meta_path is not None else find_nanogpt_meta(ckpt_path, train_config)
    tokenizer = None
    if meta is not None:
        from jaxgpt.tokenizer import tokenizer_from_meta

        tokenizer = tokenizer_from_meta(meta)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"{meta} has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}: wrong meta.pkl?"
            )
    info = {
        "iter_num": int(checkpoint.get("iter_num", 0)),
        "best_val_loss": float(checkpoint.get("best_val_loss", _NANOGPT_DEFAULT_BEST_VAL_LOSS)),
        "config": dict(train_config),
        "model_args": dict(checkpoint["model_args"]),
        "meta_path": meta,
        "optimizer": checkpoint.get("optimizer"),
        "path": ckpt_path,
    }
    return model, tokenizer, info


def nanogpt_param_names(config: GPTConfig) -> list[str]:
    """The parameter names in the order of nanoGPT's `named_parameters()` (a tied lm_head counted once).

    That order numbers the parameters in a torch optimizer state dict. Variants nanoGPT lacks (per-head
    attention, sinusoidal positions) fall back to jaxgpt's own order.
    """
    if config.attention != "fused" or config.pos_encoding != "learned":
        return [n for n in _torch_named(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))), config)]
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    suffixes = ["weight", "bias"] if config.bias else ["weight"]
    for i in range(config.n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{module}.{s}" for s in suffixes]
    names += [f"transformer.ln_f.{s}" for s in suffixes]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    return names


def _torch_named(tree, config: GPTConfig) -> dict[str, np.ndarray]:
    """Any parameter-shaped tree (a model, or Adam moments) as torch-named, torch-laid-out arrays."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    if config.scan_layers and "h" in state and not any(isinstance(k, int) for k in state["h"].keys()):
        state = unstack_layers(state)
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        name, transpose = torch_name(path)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        if isinstance(value, jax.ShapeDtypeStruct):
            out[name] = value
            continue
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(value.T) if transpose else value
    return out


def _to_torch(torch, value) -> object:
    value = np.asarray(value)
    if value.dtype == jnp.bfloat16:  # numpy has no bfloat16 of its own: go through float32 (exact)
        return torch.from_numpy(np.ascontiguousarray(value.astype(np.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(value).copy())


def _adam_state(opt_state) -> optax.ScaleByAdamState | None:
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return found[0] if found else None


def _torch_optimizer_state(torch, model: GPT, optimizer, config: Mapping) -> dict:
    """A torch AdamW state dict in nanoGPT's two parameter groups (decay: ndim >= 2, no decay: the rest).

    With an Optax state holding Adam moments (`optax.ScaleByAdamState`), the moments and step count go in
    as torch's `exp_avg`, `exp_avg_sq` and `step`; without one the state is empty, so nanoGPT resumes
    with fresh moments. Hyper-parameters come from nanoGPT's config keys when given.
    """
    names = nanogpt_param_names(model.config)
    params = _torch_named(model, model.config)
    decay = [n for n in names if params[n].ndim >= 2]
    nodecay = [n for n in names if params[n].ndim < 2]
    placeholders = {n: torch.nn.Parameter(torch.empty(0)) for n in names}
    opt = torch.optim.AdamW(
        [
            {"params": [placeholders[n] for n in decay], "weight_decay": float(config.get("weight_decay", 0.1))},
            {"params": [placeholders[n] for n in nodecay], "weight_decay": 0.0},
        ],
        lr=float(config.get("learning_rate", 6e-4)),
        betas=(float(config.get("beta1", 0.9)), float(config.get("beta2", 0.95))),
    )
    state = opt.state_dict()
    adam = _adam_state(optimizer) if optimizer is not None else None
    if adam is not None:
        mu, nu = _torch_named(adam.mu, model.config), _torch_named(adam.nu, model.config)
        step = float(np.asarray(adam.count))
        for index, name in enumerate(decay + nodecay):  # torch numbers parameters group by group
            state["state"][index] = {
                "step": torch.tensor(step),
                "exp_avg": _to_torch(torch, mu[name]),
                "exp_avg_sq": _to_torch(torch, nu[name]),
            }
    elif optimizer is not None:
        raise ValueError("optimizer must be a torch optimizer state dict or an Optax state with Adam moments")
    return state


def save_nanogpt_checkpoint(
    model: GPT,
    path: str | os.PathLike,
    *,
    iter_num: int = 0,
    best_val_loss: float = _NANOGPT_DEFAULT_BEST_VAL_LOSS,
    config: Mapping | None = None,
    optimizer=None,
    allow_non_nanogpt: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes `model` as a nanoGPT `ckpt.pt` (`path` is a file, or a folder to hold ckpt.pt).

    The file has nanoGPT's keys: `model_args` (only nanoGPT's GPTConfig fields), `model` (torch tensors
    in nanoGPT's names, both `transformer.wte.weight` and the tied `lm_head.weight` sharing storage, no
    `attn.bias` buffers — torch >= 2.0 nanoGPT has none and loads strictly), `optimizer`, `iter_num`,
    `best_val_loss` and `config` (nanoGPT's training config; give `dataset` so its sample.py finds
    meta.pkl). So nanoGPT's sample.py (and train.py with init_from='resume') load it.

    `optimizer`: None, a torch optimizer state dict (written as is), or an Optax state holding Adam
    moments (converted to torch AdamW's, in nanoGPT's two parameter groups).
    Architectures nanoGPT cannot express (ReLU, untied, post-LN...) raise unless `allow_non_nanogpt`;
    then the full GPTConfig goes in an extra `jaxgpt_config` key that jaxgpt reads back.
    """
    torch = _import_torch()
    cfg = model.config
    foreign = {k: getattr(cfg, k) for k, v in _NANOGPT_ARCH.items() if getattr(cfg, k) != v}
    if foreign and not allow_non_nanogpt:
        raise ValueError(
            f"nanoGPT's model cannot express {foreign}: pass allow_non_nanogpt=True to write a ckpt.pt "
            "that only jaxgpt reads correctly"
        )
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / "ckpt.pt"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    arrays = to_torch_state_dict(model)
    order = [*nanogpt_param_names(cfg), *sorted(arrays)]  # nanoGPT's order first, for a familiar listing
    model_sd = {name: _to_torch(torch, arrays[name]) for name in dict.fromkeys(order) if name in arrays}
    if cfg.tie_embeddings:
        model_sd["lm_head.weight"] = model_sd["transformer.wte.weight"]  # one storage, as nanoGPT's tying
    if isinstance(optimizer, Mapping) and "param_groups" in optimizer:
        optimizer_sd = dict(optimizer)
    else:
        optimizer_sd = _torch_optimizer_state(torch, model, optimizer, config)
    checkpoint = {
        "model": model_sd,
        "optimizer": optimizer_sd,
        "model_args": {k: getattr(cfg, k) for k in NANOGPT_MODEL_ARGS},
        "iter_num": int(iter_num),
        "best_val_loss": float(best_val_loss),
        "config": config,
    }
    if foreign or (cfg.dtype, cfg.param_dtype) != ("float32", "float32"):
        checkpoint[_JAXGPT_CONFIG_KEY] = dataclasses.asdict(cfg)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)  # never leave a half-written ckpt.pt behind
    return path


# --------------------------------------------------------------------------------------------------
# GPT-2 in the Hugging Face layout (config.json + model.safetensors / pytorch_model.bin)
# --------------------------------------------------------------------------------------------------

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
        torch = _import_torch()
        return dict(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True))
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
        if _BUFFER.match(name):
            continue
        if _HF_CONV1D.search(name):
            value = _to_numpy(value).T  # a view: from_torch_state_dict transposes it back
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
    hf_config = json.loads((folder / "config.json").read_text())
    n_positions = hf_config.get("n_positions")
    config = gpt2_config_from_hf(hf_config, **config_overrides)
    state_dict = hf_gpt2_to_nanogpt(_read_hf_weights(folder))
    if n_positions is not None and config.block_size < n_positions and "transformer.wpe.weight" in state_dict:
        state_dict["transformer.wpe.weight"] = _to_numpy(state_dict["transformer.wpe.weight"])[: config.block_size]
    elif n_positions is not None and config.block_size > n_positions:
        raise ValueError(f"block_size={config.block_size} exceeds the model's {n_positions} positions")
    return from_torch_state_dict(config, state_dict)


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
