"""Config files, overrides and validation: every bad key or value is one ConfigError line naming it."""

from __future__ import annotations

import pathlib

import jax
import pytest

from jaxgpt import config as config_lib
from jaxgpt.model import GPT, BigramLanguageModel

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare_char_cpu", "lecture", "bigram"])
def test_shipped_configs_are_valid(name):
    c = config_lib.load_config_file(CONFIGS / f"{name}.py")
    config_lib.validate(c)
    assert c.model.name in config_lib.MODEL_NAMES


def test_shipped_configs_hold_the_recipes():
    sc = config_lib.load_config_file(CONFIGS / "shakespeare_char.py")
    assert (sc.model.n_layer, sc.model.n_head, sc.model.n_embd, sc.model.block_size) == (6, 6, 384, 256)
    assert (sc.batch_size, sc.model.dropout, sc.learning_rate, sc.min_lr, sc.max_iters) == (64, 0.2, 1e-3, 1e-4, 5000)
    assert (sc.warmup_iters, sc.beta2, sc.weight_decay, sc.grad_clip, sc.eval_interval, sc.eval_iters) == (
        100, 0.99, 0.1, 1.0, 250, 200)
    cpu = config_lib.load_config_file(CONFIGS / "shakespeare_char_cpu.py")
    assert (cpu.model.n_layer, cpu.model.n_head, cpu.model.n_embd, cpu.model.block_size) == (4, 4, 128, 64)
    assert (cpu.batch_size, cpu.max_iters, cpu.lr_decay_iters, cpu.model.dropout, cpu.eval_iters) == (12, 2000, 2000,
                                                                                                       0.0, 20)
    lec = config_lib.load_config_file(CONFIGS / "lecture.py")
    assert (lec.model.activation, lec.model.attention, lec.model.tie_embeddings) == ("relu", "heads", False)
    assert (lec.learning_rate, lec.decay_lr, lec.max_iters, lec.eval_interval) == (3e-4, False, 5000, 500)
    big = config_lib.load_config_file(CONFIGS / "bigram.py")
    assert (big.model.name, big.model.block_size, big.batch_size, big.learning_rate, big.max_iters) == (
        "bigram", 8, 32, 1e-2, 3000)


def test_build_model_follows_model_name():
    c = config_lib.base_config()
    c.model.update(n_layer=1, n_head=2, n_embd=8, block_size=4)
    from flax import nnx

    assert isinstance(config_lib.build_model(c, 10, nnx.Rngs(0)), GPT)
    c.model.name = "bigram"
    bigram = config_lib.build_model(c, 10, nnx.Rngs(0))
    assert isinstance(bigram, BigramLanguageModel) and bigram.block_size == 4
    assert config_lib.gpt_config(c, 10).vocab_size == 10


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
    model = nnx.eval_shape(lambda: config_lib.build_model(c, c.model.vocab_size, nnx.Rngs(0)))
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
