"""nanoGPT's checkpoint file, `ckpt.pt`: load one into jaxgpt (with its meta.pkl vocabulary), and write one that
nanoGPT's own sample.py and train.py (init_from='resume') load. Reading never runs code from the file
(`jaxgpt.safe_pickle`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.convert.torch_names import from_torch_state_dict, import_torch, to_torch_state_dict, torch_named
from jaxgpt.model import GPT, GPTConfig
from jaxgpt.safe_pickle import UnsafePickleError, load_torch_checkpoint

# The keys of nanoGPT's `model_args`; its GPTConfig takes exactly these, so a checkpoint meant for
# nanoGPT must carry no others.
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# The architecture nanoGPT's model.py implements, in jaxgpt's terms.
_NANOGPT_ARCH = dict(
    activation="gelu", tie_embeddings=True, pos_encoding="learned", attention="fused", norm_position="pre", ln_eps=1e-5,
    norm="layernorm", qk_norm=False, logit_softcap=0.0,
)
_JAXGPT_CONFIG_KEY = "jaxgpt_config"  # extra top-level key: the full GPTConfig, for non-nanoGPT variants
NANOGPT_DEFAULT_BEST_VAL_LOSS = 1e9  # nanoGPT's train.py starts from this


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
    import_torch()  # the install hint, before the file is touched
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
        "best_val_loss": float(checkpoint.get("best_val_loss", NANOGPT_DEFAULT_BEST_VAL_LOSS)),
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
        return [n for n in torch_named(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))), config)]
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    suffixes = ["weight", "bias"] if config.bias else ["weight"]
    for i in range(config.n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{module}.{s}" for s in suffixes]
    names += [f"transformer.ln_f.{s}" for s in suffixes]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    return names


def _to_torch(torch, value) -> object:
    value = np.asarray(value)
    if value.dtype == jnp.bfloat16:  # numpy has no bfloat16 of its own: go through float32 (exact)
        return torch.from_numpy(np.ascontiguousarray(value.astype(np.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(value).copy())


def adam_state(opt_state) -> optax.ScaleByAdamState | None:
    """AdamW's moments (`mu`, `nu`, `count`) in an optax state: what a `ckpt.pt` keeps as torch's; None without."""
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
    params = torch_named(model, model.config)
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
    adam = adam_state(optimizer) if optimizer is not None else None
    if adam is not None:
        mu, nu = torch_named(adam.mu, model.config), torch_named(adam.nu, model.config)
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
    best_val_loss: float = NANOGPT_DEFAULT_BEST_VAL_LOSS,
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
    torch = import_torch()
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
