"""The NNX modules: shapes, nanoGPT's init, causality through gradients, jit equivalence, errors."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import GPT, BigramLanguageModel, GPTConfig, loss_fn
from jaxgpt.cpu_matmul import dense_dot_general
from jaxgpt.layout import stack_layers, unstack_layers, with_layout
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
    # Small init: the prediction is near uniform, so the loss against targets independent of the input is
    # near ln(vocab_size). (Targets equal to the input would not do: with tied embeddings the logit of the
    # input token itself is |e|^2 > 0, which lowers that loss.)
    targets = _tokens(seed=1)
    assert abs(float(loss_fn(logits, targets)) - math.log(37)) < 0.1


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


# --------------------------------------------------------------------------------------------------
# Scale: attention implementations, mixed precision, remat, scanned layers
# --------------------------------------------------------------------------------------------------


def _loss_and_grads(model, idx, key=None):
    graphdef, params = nnx.split(model)

    def f(params):
        logits = nnx.merge(graphdef, params)(idx[:, :-1], key=key)
        return loss_fn(logits, idx[:, 1:])

    return jax.jit(jax.value_and_grad(f))(params)  # one compile: far faster than eager on CPU


@pytest.mark.parametrize("attention", ["fused", "heads"])
def test_xla_attention_matches_reference(attention):
    ref = GPT(GPTConfig(**SMALL, attention=attention, attention_impl="reference"), rngs=nnx.Rngs(0))
    xla = GPT(GPTConfig(**SMALL, attention=attention, attention_impl="xla"), rngs=nnx.Rngs(0))
    idx = _tokens(T=12)
    (l_ref, g_ref), (l_xla, g_xla) = _loss_and_grads(ref, idx), _loss_and_grads(xla, idx)
    np.testing.assert_allclose(l_xla, l_ref, rtol=1e-6)
    chex.assert_trees_all_close(g_xla, g_ref, atol=1e-6)


def test_xla_attention_with_dropout_takes_the_reference_path():
    # dot_product_attention has no dropout: with a key, 'xla' must drop attention weights like 'reference'.
    ref = GPT(GPTConfig(**SMALL, dropout=0.3, attention_impl="reference"), rngs=nnx.Rngs(0))
    xla = GPT(GPTConfig(**SMALL, dropout=0.3, attention_impl="xla"), rngs=nnx.Rngs(0))
    idx, key = _tokens(), jax.random.key(5)
    np.testing.assert_allclose(xla(idx, key=key), ref(idx, key=key), atol=1e-6)
    assert not np.allclose(xla(idx, key=key), xla(idx), atol=1e-3)  # dropout did act


def test_impossible_attention_settings_are_clear_errors():
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        GPTConfig(**SMALL, attention_impl="flash")
    with pytest.raises(ValueError, match="no attention dropout"):
        GPTConfig(**SMALL, attention_impl="cudnn", dtype="bfloat16", dropout=0.1)
    with pytest.raises(ValueError, match="needs model.dtype"):
        GPTConfig(**SMALL, attention_impl="cudnn")
    model = GPT(GPTConfig(**SMALL, attention_impl="cudnn", dtype="bfloat16"), rngs=nnx.Rngs(0))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            model(_tokens())


def test_bfloat16_compute_keeps_float32_params_and_a_close_loss():
    config = dict(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64)
    fp32 = GPT(GPTConfig(**config), rngs=nnx.Rngs(0))
    bf16 = GPT(GPTConfig(**config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    idx = _tokens(B=4, T=33, V=65)
    logits = bf16(idx[:, :-1])
    assert logits.dtype == jnp.float32  # the loss sees float32 logits
    (l32, _), (l16, g16) = _loss_and_grads(fp32, idx), _loss_and_grads(bf16, idx)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # optimizer state stays float32
    # bf16 has an 8-bit mantissa (relative error ~4e-3 per op): the mean loss moves by far less than 1 %.
    assert abs(float(l16) - float(l32)) < 5e-3 * float(l32)
    assert not np.array_equal(np.asarray(l16), np.asarray(l32))  # the computation did change precision


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_dense_layer_matches_autodiff_of_a_float32_accumulating_dot(dtype):
    # On one CPU device nnx.Linear's dot is a custom VJP ((g^T x)^T weight gradient, float32 accumulation
    # for bf16). Value and gradients must be those of plain autodiff through the same dot.
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 16)).astype(dtype)
    w = jax.random.normal(kw, (16, 8)).astype(dtype)
    g = jax.random.normal(kg, (3, 5, 8)).astype(dtype)
    dims = (((2,), (0,)), ((), ()))

    def reference(x, w):
        return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(dtype)

    # The custom VJP is for CPU devices (one or several) only; on a GPU or TPU the plain dot is what runs.
    jaxpr = str(jax.make_jaxpr(lambda x, w: dense_dot_general(x, w, dims))(x, w))
    assert ("custom_vjp_call" in jaxpr) == (jax.default_backend() == "cpu")
    y, vjp = jax.vjp(lambda x, w: dense_dot_general(x, w, dims), x, w)
    y_ref, vjp_ref = jax.vjp(reference, x, w)
    assert y.dtype == jnp.dtype(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **tol)
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.dtype == want.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


@pytest.mark.parametrize("flags", [dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)])
def test_scan_and_remat_give_the_same_logits_and_gradients(flags):
    config = GPTConfig(**{**SMALL, "n_layer": 3}, dropout=0.1)
    plain = GPT(config, rngs=nnx.Rngs(0))
    other = GPT(dataclasses.replace(config, **flags), rngs=nnx.Rngs(1))  # other weights, then plain's copied in
    scan = flags.get("scan_layers", False)
    nnx.update(other, stack_layers(nnx.state(plain)) if scan else nnx.state(plain))
    idx, key = _tokens(T=12), jax.random.key(3)
    np.testing.assert_allclose(other(idx), plain(idx), atol=1e-6)
    (l_p, g_p), (l_o, g_o) = _loss_and_grads(plain, idx, key), _loss_and_grads(other, idx, key)
    np.testing.assert_allclose(l_o, l_p, rtol=1e-6)  # dropout keys are split the same way
    if scan:
        g_o = unstack_layers(g_o)
    chex.assert_trees_all_close(g_o, g_p, atol=1e-6)


def test_layouts_round_trip_and_convert_to_torch_names():
    from jaxgpt.convert import from_torch_state_dict, to_torch_state_dict

    config = GPTConfig(**SMALL, scan_layers=True)
    scanned = GPT(config, rngs=nnx.Rngs(0))
    assert nnx.state(scanned, nnx.Param)["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
    unscanned = with_layout(scanned, False)
    assert not unscanned.config.scan_layers and len(unscanned.h) == 2
    chex.assert_trees_all_equal(stack_layers(nnx.state(unscanned)), nnx.state(scanned))
    sd = to_torch_state_dict(scanned)
    assert "transformer.h.1.attn.c_attn.weight" in sd
    chex.assert_trees_all_equal(sd, to_torch_state_dict(unscanned))
    back = from_torch_state_dict(config, sd)
    assert back.config.scan_layers
    chex.assert_trees_all_equal(nnx.state(back), nnx.state(scanned))
    with pytest.raises(ValueError, match="stacked already"):
        stack_layers(nnx.state(scanned))


@pytest.mark.parametrize("extra", [{}, {"attention": "heads"}, {"scan_layers": True}, {"norm_position": "post"}])
def test_decode_in_steps_gives_the_forward_logits(extra):
    """`decode` is the forward pass cut into pieces: a prompt at position 0, then one token at a time, each piece's
    logits those of the full sequence; every layout decodes, and the forward pass returns logits only."""
    model = GPT(GPTConfig(**SMALL, **extra), rngs=nnx.Rngs(0))
    idx = _tokens(T=SMALL["block_size"])
    full = model(idx)
    assert isinstance(full, jax.Array)
    cache = model.init_cache(2)
    assert len(cache) == SMALL["n_layer"]
    logits, cache = model.decode(idx[:, :6], cache, 0)
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for pos in range(6, SMALL["block_size"]):
        logits, cache = model.decode(idx[:, pos : pos + 1], cache, pos)
        np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=1e-5)


def test_the_bigram_model_decodes_with_an_empty_cache():
    model = BigramLanguageModel(37, rngs=nnx.Rngs(0))
    idx = _tokens(T=5)
    logits, cache = model.decode(idx, model.init_cache(2), 3)
    np.testing.assert_array_equal(logits, model(idx))
    assert cache == () and (model.vocab_size, model.block_size) == (37, 8)
