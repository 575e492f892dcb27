"""The NNX modules: shapes, nanoGPT's init, causality through gradients, jit equivalence, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import GPT, BigramLanguageModel, GPTConfig, loss_fn
from jaxgpt.model import sinusoidal_positions

SMALL = dict(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32)


def _tokens(B=2, T=10, V=37, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"attention": "heads"},
        {"bias": False, "tie_embeddings": False},
        {"norm_position": "post", "pos_encoding": "sinusoidal", "activation": "relu"},
    ],
)
def test_logits_shape_and_initial_loss(extra):
    model = GPT(GPTConfig(**SMALL, **extra), rngs=nnx.Rngs(0))
    idx = _tokens()
    logits = model(idx)
    chex.assert_shape(logits, (2, 10, 37))
    chex.assert_tree_all_finite(logits)
    # Small init: the prediction is near uniform, so the loss is near ln(vocab_size).
    assert abs(float(loss_fn(logits, idx)) - math.log(37)) < 0.1


def test_nanogpt_init_statistics():
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config, rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(model.wte.embedding[...])) - 0.02) < 1e-3
    assert abs(float(jnp.std(model.h[0].attn.c_attn.kernel[...])) - 0.02) < 1e-3
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.h:
        assert abs(float(jnp.std(block.attn.c_proj.kernel[...])) - residual_std) < 1e-3
        assert abs(float(jnp.std(block.mlp.c_proj.kernel[...])) - residual_std) < 1e-3
        assert float(jnp.abs(block.mlp.c_fc.bias[...]).max()) == 0.0
        np.testing.assert_array_equal(block.ln_1.scale[...], 1.0)


def test_tied_model_has_no_separate_head():
    tied = GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0))
    untied = GPT(GPTConfig(**SMALL, tie_embeddings=False), rngs=nnx.Rngs(0))
    assert tied.lm_head is None
    assert untied.num_params() - tied.num_params() == 37 * 32


def _logits_from_embeddings(model: GPT, x_BTC: jax.Array) -> jax.Array:
    for block in model.h:
        x_BTC = block(x_BTC)
    return model.head(x_BTC)


@pytest.mark.parametrize("attention", ["fused", "heads"])
def test_causality_through_gradients(attention):
    model = GPT(GPTConfig(**SMALL, attention=attention), rngs=nnx.Rngs(1))
    x_BTC = model.embed(_tokens(B=1, T=12))
    for t in (0, 5, 11):
        grad = jax.grad(lambda x, t=t: _logits_from_embeddings(model, x)[0, t].sum())(x_BTC)
        assert float(jnp.abs(grad[0, t + 1 :]).max(initial=0.0)) == 0.0, f"position {t} sees the future"
        assert float(jnp.abs(grad[0, : t + 1]).min()) > 0.0 or t == 0
        assert float(jnp.abs(grad[0, t]).max()) > 0.0


class JitEquivalenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_logits_with_and_without_jit(self):
        model = GPT(GPTConfig(**SMALL, dropout=0.1), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def forward(params, idx, key):
            return nnx.merge(graphdef, params)(idx, key=key)

        idx = _tokens()
        eager = model(idx, key=jax.random.key(7))
        np.testing.assert_allclose(self.variant(forward)(params, idx, jax.random.key(7)), eager, atol=1e-5)


def test_dropout_only_with_a_key():
    model = GPT(GPTConfig(**SMALL, dropout=0.2), rngs=nnx.Rngs(0))
    idx = _tokens()
    np.testing.assert_array_equal(model(idx), model(idx))
    a, b = model(idx, key=jax.random.key(1)), model(idx, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, model(idx))
    assert not np.allclose(a, model(idx, key=jax.random.key(2)))


def test_longer_than_block_size_is_a_clear_error():
    model = GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_size is 16"):
        model(_tokens(T=17))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_embd": 30}, "not divisible"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"n_layer": -1}, "n_layer must be a positive integer"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"dtype": "float33"}, "not a dtype"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **bad})


def test_nanogpt_model_args_are_accepted():
    model_args = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False, vocab_size=65, dropout=0.2)
    config = GPTConfig(**model_args)
    assert (config.activation, config.tie_embeddings, config.ln_eps) == ("gelu", True, 1e-5)


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(10, 6)
    assert pe[3, 0] == pytest.approx(math.sin(3.0))
    assert pe[3, 1] == pytest.approx(math.cos(3.0))
    assert pe[7, 4] == pytest.approx(math.sin(7 / 10000 ** (4 / 6)), rel=1e-5)


def test_bigram_model():
    model = BigramLanguageModel(65, rngs=nnx.Rngs(1337))
    idx = _tokens(B=4, T=8, V=65)
    logits = model(idx)
    chex.assert_shape(logits, (4, 8, 65))
    # Row t of the logits is the table row of token idx[t]: a bigram ignores all context.
    np.testing.assert_array_equal(logits[0, 3], model.token_embedding_table.embedding[...][idx[0, 3]])
    # N(0, 1) init as the lecture's nn.Embedding: the initial loss is well above ln(65) (4.88 there).
    assert float(loss_fn(logits, idx)) > math.log(65)
