"""Config files, overrides and validation: every bad key or value is one ConfigError line naming it."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import pytest

from jaxgpt import config as config_lib
from jaxgpt.model import GPT, BigramLanguageModel, GPTConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare_char_cpu", "shakespeare_char_speedrun",
                                  "shakespeare_char_speedrun_gpu", "lecture", "bigram"])
def test_shipped_configs_are_valid(name):
    c = config_lib.load_config_file(CONFIGS / f"{name}.py")
    config_lib.validate(c)
    assert c.model.name in config_lib.MODEL_NAMES


# The recipes the shipped configs promise, in jaxgpt's key names. Each is a spec written down once from
# its source, so a config that drifts from the recipe it is named after fails here.
# nanoGPT's config/train_shakespeare_char.py, with train.py's defaults it relies on (AdamW, clip, bias).
NANOGPT_SHAKESPEARE_CHAR = {
    "eval_interval": 250, "eval_iters": 200, "log_interval": 10, "always_save_checkpoint": False,
    "grad_accum_steps": 1, "batch_size": 64, "model.block_size": 256, "model.n_layer": 6, "model.n_head": 6,
    "model.n_embd": 384, "model.dropout": 0.2, "learning_rate": 1e-3, "max_iters": 5000, "lr_decay_iters": 5000,
    "min_lr": 1e-4, "beta2": 0.99, "warmup_iters": 100,
    "weight_decay": 0.1, "beta1": 0.9, "grad_clip": 1.0, "decay_lr": True, "model.bias": False,
}
RECIPES = {
    "shakespeare_char": NANOGPT_SHAKESPEARE_CHAR,
    # nanoGPT's README, "I only have a macbook": train_shakespeare_char.py with these command-line overrides.
    "shakespeare_char_cpu": NANOGPT_SHAKESPEARE_CHAR | {
        "eval_iters": 20, "log_interval": 1, "model.block_size": 64, "batch_size": 12, "model.n_layer": 4,
        "model.n_head": 4, "model.n_embd": 128, "max_iters": 2000, "lr_decay_iters": 2000, "model.dropout": 0.0,
    },
    # The lecture's gpt.py: its hyper-parameters, torch.optim.AdamW(lr=3e-4) with torch's defaults, no clip,
    # ReLU, a list of heads, an lm_head of its own.
    "lecture": {
        "batch_size": 64, "model.block_size": 256, "max_iters": 5000, "eval_interval": 500, "learning_rate": 3e-4,
        "eval_iters": 200, "model.n_embd": 384, "model.n_head": 6, "model.n_layer": 6, "model.dropout": 0.2,
        "decay_lr": False, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "grad_clip": 0.0,
        "model.activation": "relu", "model.attention": "heads", "model.tie_embeddings": False,
    },
    # The lecture's bigram.py: its hyper-parameters and torch.optim.AdamW(lr=1e-2) with torch's defaults.
    "bigram": {
        "model.name": "bigram", "batch_size": 32, "model.block_size": 8, "max_iters": 3000, "eval_interval": 300,
        "learning_rate": 1e-2, "eval_iters": 200, "decay_lr": False, "weight_decay": 0.01, "beta1": 0.9,
        "beta2": 0.999, "grad_clip": 0.0,
    },
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_configs_hold_the_recipes_they_are_named_after(name):
    c = config_lib.load_config_file(CONFIGS / f"{name}.py")
    got = {key: functools.reduce(lambda node, k: node[k], key.split("."), c) for key in RECIPES[name]}
    assert got == RECIPES[name]


@pytest.mark.parametrize("base, speedrun, gpu", [("shakespeare_char_cpu", "shakespeare_char_speedrun", False),
                                               ("shakespeare_char", "shakespeare_char_speedrun_gpu", True)])
def test_a_speedrun_is_its_recipe_with_the_modern_switches_and_fewer_steps(base, speedrun, gpu):
    old, fast = (config_lib.load_config_file(CONFIGS / f"{n}.py") for n in (base, speedrun))
    switches = {"pos_encoding": "rotary", "qk_norm": True, "activation": "relu2", "norm": "rmsnorm",
                "zero_init_proj": True, "logit_softcap": 15.0} | ({"tie_embeddings": False} if gpu else {})
    assert {k: fast.model[k] for k in switches} == switches
    assert {k: v for k, v in fast.model.items() if k not in switches} == {
        k: v for k, v in old.model.items() if k not in switches}  # the same model's size and layout
    assert fast.batch_size == old.batch_size and fast.optimizer == ("muon" if gpu else "adamw")
    assert fast.max_iters <= old.max_iters / 2 and fast.lr_decay_iters == fast.max_iters
    model = config_lib.build_model(fast, 65, 0)
    assert model.wpe is None and model.config.norm == "rmsnorm"


def test_the_gpu_speedrun_starts_near_a_uniform_guess():
    """Its untied head keeps the first loss near ln(65): tied, each token's own logit would start at 0.02 * 384."""
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.model import loss_fn

    c = config_lib.load_config_file(CONFIGS / "shakespeare_char_speedrun_gpu.py")
    c.model.block_size, c.model.n_layer = 32, 2  # the width, the one that matters here, stays 384
    model = config_lib.build_model(c, 65, 0)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 65, (4, 33)), jnp.int32)
    assert abs(float(loss_fn(model(x[:, :-1]), x[:, 1:])) - np.log(65)) < 0.3


def test_build_model_follows_model_name():
    c = config_lib.base_config()
    c.model.update(n_layer=1, n_head=2, n_embd=8, block_size=4)
    assert isinstance(config_lib.build_model(c, 10, 0), GPT)
    c.model.name = "bigram"
    bigram = config_lib.build_model(c, 10, 0)
    assert isinstance(bigram, BigramLanguageModel) and bigram.block_size == 4
    assert config_lib.gpt_config(c, 10).vocab_size == 10


@pytest.mark.parametrize("name", ["gpt", "bigram"])
def test_model_shape_is_the_built_model_with_nothing_drawn(name):
    """What the training step compiles from while the weights are drawn: build_model's structure and shapes."""
    from flax import nnx

    c = config_lib.base_config()
    c.model.update(name=name, n_layer=2, n_head=2, n_embd=8, block_size=4)
    shape_def, shapes = nnx.split(config_lib.model_shape(c, 10))
    built_def, built = nnx.split(config_lib.build_model(c, 10, c.seed))
    assert shape_def == built_def
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)] == [(x.shape, x.dtype) for x in jax.tree.leaves(built)]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("model.n_head", 5, "not divisible"),
        ("model.block_size", 0, "model.block_size must be a positive integer"),
        ("model.n_layer", -1, "model.n_layer"),
        ("batch_size", 0, "'batch_size' must be >= 1"),
        ("max_iters", -5, "'max_iters'"),
        ("learning_rate", 0.0, "'learning_rate' must be > 0"),
        ("beta2", 1.0, "'beta2'"),
        ("data.train_fraction", 1.5, "'data.train_fraction'"),
        ("model.name", "rnn", "'model.name' must be one of"),
        ("model.activation", "tanh", "model.activation must be one of"),
        ("grad_accum_steps", 0, "'grad_accum_steps'"),
        ("out_dir", "", "'out_dir'"),
        ("mesh.fsdp", 0, "'mesh.fsdp' must be >= 1"),
        ("mesh.data", 0, r"'mesh.data' must be >= 1 or -1"),
        ("mesh.data", -2, r"'mesh.data' must be >= 1 or -1"),
        ("mesh.cpu_devices", -1, r"'mesh.cpu_devices' must be >= 0"),
    ],
)
def test_invalid_values_name_the_key(key, value, match):
    c = config_lib.base_config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match) as info:
        config_lib.validate(c)
    assert "\n" not in str(info.value)


def test_unknown_keys_and_wrong_types():
    c = config_lib.base_config()
    c.unlock()
    c.model.nlayer = 3
    with pytest.raises(config_lib.ConfigError, match=r"'model.nlayer' \(did you mean 'model.n_layer'"):
        config_lib.validate(c)
    assert "model.nlayer" in config_lib.unknown_key(config_lib.base_config(), "model.nlayer")
    assert config_lib.unknown_key(config_lib.base_config(), "model.n_layer") is None
    c = config_lib.base_config()
    c.unlock()
    del c["batch_size"]
    c.batch_size = "12"  # the wrong type, as a config file could set it
    with pytest.raises(config_lib.ConfigError, match="'batch_size' must be int, got str"):
        config_lib.validate(c)


def test_mesh_sizes_fill_in_minus_one_and_must_match_the_devices():
    from jaxgpt.sharding import mesh_sizes

    c = config_lib.base_config()
    assert (c.mesh.data, c.mesh.fsdp) == (-1, 1)  # every device data-parallel by default
    assert mesh_sizes(c.mesh.data, c.mesh.fsdp, 8) == (8, 1)
    assert mesh_sizes(-1, 4, 8) == (2, 4)
    assert mesh_sizes(2, -1, 8) == (2, 4)
    assert mesh_sizes(2, 4, 8) == (2, 4)
    with pytest.raises(ValueError, match=r"'mesh.data'=2 x 'mesh.fsdp'=4 = 8 devices, but there are 4"):
        mesh_sizes(2, 4, 4)
    with pytest.raises(ValueError, match="'mesh.fsdp'=3 does not divide the 8 devices"):
        mesh_sizes(-1, 3, 8)
    c = config_lib.base_config()
    c.unlock()
    del c.mesh["data"]
    c.mesh.data = 2.0
    with pytest.raises(config_lib.ConfigError, match="'mesh.data' must be int, got float"):
        config_lib.validate(c)


def test_gpt2_124m_config_is_valid_and_has_124m_parameters():
    """Built abstractly (nnx.eval_shape): shapes only, nothing allocated."""
    from flax import nnx

    c = config_lib.load_config_file(CONFIGS / "gpt2_124m.py")
    config_lib.validate(c)
    assert (c.mesh.data, c.mesh.fsdp) == (-1, 1)
    model = config_lib.model_shape(c, c.model.vocab_size)
    state = nnx.state(model, nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    n = sum(x.size for x in jax.tree.leaves(state))
    assert c.model.vocab_size == 50304 and c.model.tie_embeddings
    assert 123.6e6 <= n <= 124.5e6, n
    assert model.num_params() == 123_587_328  # without the position table, as nanoGPT reports


def test_dict_round_trip_keeps_every_value():
    c = config_lib.load_config_file(CONFIGS / "lecture.py")
    back = config_lib.from_dict(config_lib.to_dict(c))
    assert back.to_dict() == c.to_dict()


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load_config_file("configs/nope.py")


def test_matmul_precision_is_an_explicit_choice():
    c = config_lib.base_config()
    assert c.matmul_precision == ""  # JAX's default, stated in the config
    for ok in config_lib.MATMUL_PRECISIONS:
        c.matmul_precision = ok
        config_lib.validate(c)
    c.matmul_precision = "fast"
    with pytest.raises(config_lib.ConfigError, match="'matmul_precision' must be one of"):
        config_lib.validate(c)


def test_every_config_key_has_one_line_of_help():
    from jaxgpt.config_help import KEY_HELP, describe, leaf_keys

    keys = leaf_keys(config_lib.base_config())
    assert set(keys) == set(KEY_HELP)
    assert all(text and "\n" not in text for text in KEY_HELP.values())
    listed = describe(config_lib.base_config()).splitlines()
    assert len(listed) == len(keys) and "  --config.max_iters=600000" in listed[listed.index(next(
        line for line in listed if "max_iters" in line))]


def test_every_model_field_is_architecture_or_computation():
    """A GPTConfig field is either what a trained model is (taken from its checkpoint) or how to compute it (the
    config's own), never both, never neither."""
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    assert set(config_lib.ARCH_FIELDS) | set(config_lib.COMPUTE_FIELDS) == set(fields)
    assert not set(config_lib.ARCH_FIELDS) & set(config_lib.COMPUTE_FIELDS)
    assert set(config_lib.COMPUTE_FIELDS) == {"dropout", "dtype", "attention_impl", "remat", "scan_layers"}
