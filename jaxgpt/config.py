"""Training configuration: an ml_collections `ConfigDict` checked once, then turned into a model.

A config holds nanoGPT's top-level names (`batch_size`, `max_iters`, `learning_rate`, ...), the model's
hyper-parameters under `model.` (every `GPTConfig` field plus `model.name`: 'gpt' | 'bigram'), the data's
under `data.` and the device mesh's under `mesh.`. `base_config()` has every key with a default; the files in
`configs/` change what they need. `validate` turns a bad value into one `ConfigError` line that names the key
and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from functools import partial
from typing import Any

import jax
import ml_collections
from flax import nnx
from ml_collections import config_dict

from jaxgpt import optim
from jaxgpt.initializers import build_drawing_once
from jaxgpt.model import GPT, BigramLanguageModel, GPTConfig


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message is one line naming the key."""


MODEL_NAMES = ("gpt", "bigram")
MATMUL_PRECISIONS = ("", "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config can hold, with nanoGPT's defaults (train.py's globals)."""
    c = ml_collections.ConfigDict()
    # I/O
    c.out_dir = "out"
    c.eval_interval = 2000
    c.log_interval = 1
    c.eval_iters = 200
    c.eval_only = False
    c.always_save_checkpoint = True  # also save 'latest' at evals where val did not improve
    c.resume = False  # nanoGPT's init_from='resume'
    c.init_from = ""  # '' (scratch) | 'nanogpt:PATH' (a nanoGPT out_dir or ckpt.pt) | 'gpt2:PATH' (a local HF folder)
    c.overwrite = False  # allow starting afresh in an out_dir that already holds a run
    # out_dir/jaxgpt.lock holds the pid and host of the run using out_dir, and a second run refuses. A lock left by
    # a dead process of this host is taken over by itself; True takes over any lock (another host's): only if dead
    c.take_over_lock = False
    c.seed = 1337
    c.progress = True  # the tqdm bar
    c.plot = True  # out_dir/loss.png at each evaluation
    c.sample_tokens = 500  # characters of generated text printed at the end (0: none)
    c.compile_cache = True  # keep compiled programs in $JAXGPT_CACHE/xla: reruns and resumes start faster
    # optimisation
    c.batch_size = 12
    c.grad_accum_steps = 1  # nanoGPT's gradient_accumulation_steps
    c.max_iters = 600000
    c.learning_rate = 6e-4
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0  # 0 disables clipping
    c.decay_lr = True
    c.warmup_iters = 2000
    c.lr_decay_iters = 600000
    c.min_lr = 6e-5
    # 'adamw' (nanoGPT) | 'muon': Muon for the blocks' weight matrices, the AdamW above for the rest (jaxgpt.optim)
    c.optimizer = "adamw"
    c.muon_learning_rate = 0.02  # Muon's peak learning rate (Keller Jordan's Muon); same warmup and decay as AdamW's
    c.muon_momentum = 0.95
    c.muon_nesterov = True
    c.muon_ns_steps = 5  # Newton-Schulz iterations per update
    c.muon_weight_decay = 0.0  # decoupled, times Muon's learning rate (optax.contrib.muon's default)
    c.steps_per_call = 1  # optimizer steps per compiled call (a lax.scan); >1 removes per-step dispatch cost
    c.skip_nonfinite = False  # a step with a NaN/inf loss or gradient: False stops the run, True skips the update
    # float32 matmuls: '' keeps JAX's default, which favours speed (TF32 tensor cores on NVIDIA Ampere and newer
    # GPUs, bfloat16 passes on TPUs, full float32 on CPUs); 'highest' computes them in full float32 everywhere
    c.matmul_precision = ""
    # model (GPTConfig fields + the model's name)
    m = ml_collections.ConfigDict()
    m.name = "gpt"
    for field in dataclasses.fields(GPTConfig):
        m[field.name] = field.default
    m.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's vocabulary size
    c.model = m
    # data
    d = ml_collections.ConfigDict()
    d.path = ""  # a text file or a nanoGPT data directory; '' is tiny Shakespeare: $JAXGPT_SHAKESPEARE, else downloaded
    d.train_fraction = 0.9
    d.on_device = True  # keep the token array on the accelerator and draw batches inside the step
    c.data = d
    # devices: a ('data', 'fsdp') mesh over all of them (jaxgpt.sharding); the batch is split over both axes
    mh = ml_collections.ConfigDict()
    mh.data = -1  # data-parallel size; -1: all devices left after fsdp
    mh.fsdp = 1  # >1 also splits parameters and optimizer state over this many devices (FSDP)
    mh.cpu_devices = 0  # >0: JAX's CPU backend as this many devices (data parallel over cores); 0: JAX's default
    c.mesh = mh
    return c


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Imports a `configs/*.py` file and returns its `get_config()`."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location("_jaxgpt_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def unknown_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """A one-line message when `dotted` (e.g. 'model.nlayer') is not a key of `config`, else None."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean '{'.'.join(filter(None, [prefix, close[0]]))}'?)" if close else ""
            return f"unknown config key '{dotted}'{hint}"
        node = node[part]
    return None


def _check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{name}'{hint}")
        ref = reference[key]
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key '{name}' must be a group of keys, got {value!r}")
            _check_keys(value, ref, prefix=f"{name}.")
            continue
        expected = type(ref) if ref is not None else None
        if expected is None or value is None:
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise ConfigError(f"config key '{name}' must be {expected.__name__}, got {type(value).__name__} {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` (one line naming the key) for unknown keys, wrong types and bad values."""
    _check_keys(config, base_config())
    positive = ["batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "log_interval",
                "steps_per_call"]
    for name in positive:
        if config[name] < 1:
            raise ConfigError(f"config key '{name}' must be >= 1, got {config[name]}")
    non_negative = ["warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr", "sample_tokens"]
    for name in non_negative:
        if config[name] < 0:
            raise ConfigError(f"config key '{name}' must be >= 0, got {config[name]}")
    if not config.learning_rate > 0:
        raise ConfigError(f"config key 'learning_rate' must be > 0, got {config.learning_rate}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= config[name] < 1.0:
            raise ConfigError(f"config key '{name}' must be in [0, 1), got {config[name]}")
    if config.optimizer not in optim.OPTIMIZERS:
        raise ConfigError(f"config key 'optimizer' must be one of {optim.OPTIMIZERS}, got {config.optimizer!r}")
    if not config.muon_learning_rate > 0:
        raise ConfigError(f"config key 'muon_learning_rate' must be > 0, got {config.muon_learning_rate}")
    if not 0.0 <= config.muon_momentum < 1.0:
        raise ConfigError(f"config key 'muon_momentum' must be in [0, 1), got {config.muon_momentum}")
    if config.muon_ns_steps < 1:
        raise ConfigError(f"config key 'muon_ns_steps' must be >= 1, got {config.muon_ns_steps}")
    if config.muon_weight_decay < 0:
        raise ConfigError(f"config key 'muon_weight_decay' must be >= 0, got {config.muon_weight_decay}")
    if not 0.0 < config.data.train_fraction < 1.0:
        raise ConfigError(f"config key 'data.train_fraction' must be in (0, 1), got {config.data.train_fraction}")
    if not config.out_dir:
        raise ConfigError("config key 'out_dir' must not be empty")
    if config.matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(f"config key 'matmul_precision' must be one of {MATMUL_PRECISIONS}, "
                          f"got {config.matmul_precision!r}")
    if config.model.name not in MODEL_NAMES:
        raise ConfigError(f"config key 'model.name' must be one of {MODEL_NAMES}, got {config.model.name!r}")
    if config.mesh.fsdp < 1:
        raise ConfigError(f"config key 'mesh.fsdp' must be >= 1, got {config.mesh.fsdp}")
    if config.mesh.cpu_devices < 0:
        raise ConfigError(f"config key 'mesh.cpu_devices' must be >= 0 (0: JAX's default), "
                          f"got {config.mesh.cpu_devices}")
    if config.mesh.data < 1 and config.mesh.data != -1:
        raise ConfigError(f"config key 'mesh.data' must be >= 1 or -1 (all remaining devices), got {config.mesh.data}")
    if config.model.vocab_size is not None and config.model.vocab_size < 1:
        raise ConfigError(f"config key 'model.vocab_size' must be >= 1, got {config.model.vocab_size}")
    try:
        gpt_config(config, vocab_size=config.model.vocab_size or 1)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# The model fields that say what a trained model is; with init_from or resume they come from its checkpoint.
ARCH_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "activation", "tie_embeddings",
               "pos_encoding", "attention", "norm_position", "ln_eps", "norm", "qk_norm", "zero_init_proj",
               "logit_softcap", "param_dtype")
# The others (dropout, dtype, attention_impl, remat, scan_layers) say how to compute and stay the config's.
COMPUTE_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ARCH_FIELDS)


def with_model_arch(config: ml_collections.ConfigDict, model: Any) -> ml_collections.ConfigDict:
    """A new config whose `model.<ARCH_FIELDS>` are those of `model` (a GPTConfig, a mapping or a ConfigDict)."""
    new = config.copy_and_resolve_references()
    for k in ARCH_FIELDS:
        new.model[k] = model[k] if isinstance(model, (dict, ml_collections.ConfigDict)) else getattr(model, k)
    return new


def gpt_config(config: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
    """The `GPTConfig` of `config.model`, with `vocab_size` filled in (GPTConfig checks the values)."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    kwargs = {k: v for k, v in config.model.items() if k in fields}
    kwargs["vocab_size"] = vocab_size
    return GPTConfig(**kwargs)


def build_model(config: ml_collections.ConfigDict, vocab_size: int,
                seed: int | jax.Array) -> GPT | BigramLanguageModel:
    """A freshly initialised model of `config.model.name` for a vocabulary of `vocab_size`, drawn from `seed` (an
    int, or its key `jax.random.PRNGKey(seed)`).

    All the initial weights come from one random draw in one compiled program (which the compilation cache
    keeps): `initializers.build_drawing_once`, seconds sooner on a CPU than a draw per parameter.
    """
    key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(seed)
    return build_drawing_once(partial(_construct, config, vocab_size), key)


def model_shape(config: ml_collections.ConfigDict, vocab_size: int) -> GPT | BigramLanguageModel:
    """The model `build_model` makes, its arrays `jax.ShapeDtypeStruct`s: the shapes, with nothing drawn or
    compiled (a program can compile from them while the weights are drawn)."""
    return nnx.eval_shape(lambda: _construct(config, vocab_size, nnx.Rngs(config.seed)))


def _construct(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> GPT | BigramLanguageModel:
    cfg = gpt_config(config, vocab_size)
    if config.model.name == "bigram":
        return BigramLanguageModel(cfg.vocab_size, cfg.block_size, rngs=rngs)
    return GPT(cfg, rngs=rngs)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON-able dicts (for checkpoints and metrics)."""
    return config.to_dict()


def from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a config saved by `to_dict`, on top of `base_config()` so later-added keys get defaults."""
    c = base_config()
    c.update_from_flattened_dict(_flatten(d))
    return c


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
