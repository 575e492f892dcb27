"""The modern-GPT switches of `GPTConfig`: each against its formula, then all together through decoding, scanned
layers, remat and a resumed training run."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig, checkpoint, data, decode, optim, sampling, target, training
from jaxgpt import config as config_lib
from jaxgpt.attention import attention, rms_norm, rotary
from jaxgpt.gpt_config import ACTIVATIONS
from jaxgpt.layout import stack_layers, unstack_layers
from jaxgpt.model import count_params, loss_fn
from tests.test_training import tiny_config, tiny_text

SMALL = dict(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32)
# Every switch on (the untied head too); the softcap low enough to bend the logits of randomized weights.
ALL = dict(pos_encoding="rotary", qk_norm=True, activation="relu2", norm="rmsnorm", zero_init_proj=True,
           logit_softcap=5.0, tie_embeddings=False)


def _tokens(B=2, T=10, V=37, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def randomized(model: GPT, std: float = 0.4, seed: int = 1) -> GPT:
    """`model` with every parameter drawn from N(0, std²): zero-initialised projections and small weights would
    leave the attention nearly uniform and the equalities below untested."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return model


# ------------------------------------------------------------------------------------------ each switch


def rotary_written_out(x_TD: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE, pair by pair: channels i and i + D/2 turned by positions[t] * base**(-2i/D)."""
    T, D = x_TD.shape
    out = np.empty((T, D))
    for t in range(T):
        for i in range(D // 2):
            theta = positions[t] * base ** (-2 * i / D)
            a, b = float(x_TD[t, i]), float(x_TD[t, i + D // 2])
            out[t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[t, i + D // 2] = b * math.cos(theta) + a * math.sin(theta)
    return out


def test_rotary_is_the_rotation_written_out():
    x = np.asarray(jax.random.normal(jax.random.key(0), (7, 8)))
    positions = np.array([0, 1, 2, 5, 17, 63, 100])
    np.testing.assert_allclose(rotary(jnp.asarray(x), jnp.asarray(positions)), rotary_written_out(x, positions),
                               atol=1e-4)
    np.testing.assert_array_equal(rotary(jnp.asarray(x), jnp.zeros(7, jnp.int32)), x)  # position 0: no turn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_laid_out_for_a_tpu_gives_the_same_numbers(dtype):
    """A TPU program turns the halves by a signed-permutation product (`attention._rotate_half`): bit for bit the
    same as splitting them, here on the CPU with the TPU's choice made (`target.compiling_for`)."""
    x = jax.random.normal(jax.random.key(1), (2, 3, 11, 64)).astype(dtype)
    positions = jnp.arange(5, 16)
    with target.compiling_for("tpu"):  # a fresh function each: a compiled program is cached by its function
        on_tpu = jax.jit(lambda x, p: rotary(x, p))(x, positions)
    elsewhere = jax.jit(lambda x, p: rotary(x, p))(x, positions)
    np.testing.assert_array_equal(np.asarray(on_tpu, np.float32), np.asarray(elsewhere, np.float32))


def test_rotary_scores_depend_only_on_the_distance():
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 16))

    def score(m: int, n: int) -> float:
        return float((rotary(q, jnp.array([m])) @ rotary(k, jnp.array([n])).T)[0, 0])

    for m, n in [(3, 1), (9, 9), (2, 12)]:
        for shift in (5, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 1) - score(3, 1)) > 1e-2  # the distance does change it


def test_rms_norm_gives_unit_rms_rows_by_its_formula():
    x = 3.0 * jax.random.normal(jax.random.key(2), (4, 5, 8)) + 1.0
    y = np.asarray(rms_norm(x, 1e-5))
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(np.sqrt((y.astype(np.float64) ** 2).mean(-1)), 1.0, atol=1e-5)
    assert rms_norm(x.astype(jnp.bfloat16), 1e-5).dtype == jnp.bfloat16


@pytest.mark.parametrize("qk_norm", [False, True])
def test_heads_and_fused_attention_rotate_and_normalise_q_and_k(qk_norm):
    """The lecture's Head and nanoGPT's CausalSelfAttention against attention(rotary(norm(q)), rotary(norm(k)), v)."""
    config = GPTConfig(**SMALL, pos_encoding="rotary", qk_norm=qk_norm)
    x = jax.random.normal(jax.random.key(3), (2, 9, 32))
    positions = jnp.arange(9)
    prep = (lambda t: rotary(rms_norm(t, config.ln_eps), positions)) if qk_norm else (lambda t: rotary(t, positions))

    head = randomized(GPT(dataclasses.replace(config, attention="heads"), rngs=nnx.Rngs(0))).h[0].attn.heads[0]
    want = attention(prep(head.query(x)), prep(head.key(x)), head.value(x), causal=True)
    np.testing.assert_allclose(head(x), want, atol=1e-5)

    attn = randomized(GPT(config, rngs=nnx.Rngs(0))).h[0].attn
    q, k, v = (t.reshape(2, 9, 4, 8).transpose(0, 2, 1, 3) for t in jnp.split(attn.c_attn(x), 3, axis=-1))
    y = attention(prep(q), prep(k), v, causal=True).transpose(0, 2, 1, 3).reshape(2, 9, 32)
    np.testing.assert_allclose(attn(x), attn.c_proj(y), atol=1e-5)


def test_rotary_model_has_no_position_table():
    model = GPT(GPTConfig(**SMALL, pos_encoding="rotary"), rngs=nnx.Rngs(0))
    assert model.wpe is None
    learned = GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0))
    assert model.num_params(non_embedding=False) == learned.num_params(non_embedding=False) - 16 * 32


def test_relu2_is_relu_squared_in_the_mlp():
    x = jnp.linspace(-3, 3, 61)
    np.testing.assert_array_equal(ACTIVATIONS["relu2"](x), np.maximum(np.asarray(x), 0) ** 2)
    mlp = randomized(GPT(GPTConfig(**SMALL, activation="relu2"), rngs=nnx.Rngs(0))).h[0].mlp
    h = jax.random.normal(jax.random.key(4), (2, 5, 32))
    np.testing.assert_allclose(mlp(h), mlp.c_proj(jnp.maximum(mlp.c_fc(h), 0) ** 2), rtol=1e-6)


def test_rmsnorm_replaces_every_layernorm_and_has_no_weights():
    model = GPT(GPTConfig(**SMALL, norm="rmsnorm", ln_eps=1e-3), rngs=nnx.Rngs(0))
    x = 2.0 * jax.random.normal(jax.random.key(5), (2, 5, 32)) + 0.5
    xn = np.asarray(x, np.float64)
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-3)
    for norm in (model.h[0].ln_1, model.h[1].ln_2, model.ln_f):
        np.testing.assert_allclose(norm(x), want, rtol=1e-5)
        assert count_params(nnx.state(norm, nnx.Param)) == 0
    layernorm = GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0))
    assert model.num_params() == layernorm.num_params() - (2 * 2 + 1) * 2 * 32  # weight and bias of 5 norms


@pytest.mark.parametrize("attention_kind", ["fused", "heads"])
def test_zero_init_proj_starts_every_block_as_the_identity(attention_kind):
    model = GPT(GPTConfig(**SMALL, attention=attention_kind, zero_init_proj=True), rngs=nnx.Rngs(0))
    for block in model.h:
        assert not np.any(block.attn.c_proj.kernel[...]) and not np.any(block.mlp.c_proj.kernel[...])
        assert np.any(block.mlp.c_fc.kernel[...])  # only the projections into the residual stream
    idx = _tokens()
    np.testing.assert_array_equal(model(idx), model.head(model.embed(idx)))


def test_logit_softcap_bounds_the_logits_by_its_formula():
    cap = 0.05
    capped = randomized(GPT(GPTConfig(**SMALL, logit_softcap=cap), rngs=nnx.Rngs(0)))
    plain = randomized(GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0)))
    idx = _tokens()
    raw, logits = np.asarray(plain(idx), np.float64), capped(idx)
    assert logits.dtype == jnp.float32 and np.abs(raw).max() > 10 * cap  # the cap bends these logits
    np.testing.assert_allclose(logits, cap * np.tanh(raw / cap), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(logits)).max() <= cap


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(n_embd=36, n_head=4, pos_encoding="rotary"), "must be even"),
        (dict(logit_softcap=-1.0), "logit_softcap"),
        (dict(logit_softcap=float("nan")), "logit_softcap"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(activation="swish"), "model.activation"),
    ],
)
def test_bad_switch_values_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **bad})


@pytest.mark.parametrize("switch", [dict(qk_norm=True), dict(norm="rmsnorm"), dict(logit_softcap=30.0),
                                    dict(pos_encoding="rotary"), dict(activation="relu2")])
def test_a_nanogpt_checkpoint_refuses_what_nanogpt_cannot_express(tmp_path, switch):
    from jaxgpt.convert import save_nanogpt_checkpoint

    model = GPT(GPTConfig(**SMALL, **switch), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="nanoGPT's model cannot express") as e:
        save_nanogpt_checkpoint(model, tmp_path)
    assert "\n" not in str(e.value)


def test_zero_init_proj_is_no_obstacle_to_a_nanogpt_checkpoint(tmp_path):
    from jaxgpt.convert import load_nanogpt_checkpoint, save_nanogpt_checkpoint

    model = GPT(GPTConfig(**SMALL, zero_init_proj=True), rngs=nnx.Rngs(0))  # only the initial weights differ
    back, _, _ = load_nanogpt_checkpoint(save_nanogpt_checkpoint(model, tmp_path))
    chex.assert_trees_all_equal(nnx.state(back, nnx.Param), nnx.state(model, nnx.Param))


# ------------------------------------------------------------------------------------------ all together


@pytest.mark.parametrize("extra", [{}, {"attention": "heads"}, {"scan_layers": True}])
def test_all_switches_decode_in_steps_gives_the_forward_logits(extra):
    model = randomized(GPT(GPTConfig(**SMALL, **ALL, **extra), rngs=nnx.Rngs(0)))
    idx = _tokens(T=SMALL["block_size"])
    full = model(idx)
    logits, cache = model.decode(idx[:, :6], model.init_cache(2), 0)
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for pos in range(6, SMALL["block_size"]):
        logits, cache = model.decode(idx[:, pos : pos + 1], cache, pos)
        np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=1e-5)


@pytest.mark.parametrize("attention_kind", ["fused", "heads"])
def test_all_switches_fast_sampler_equals_the_lecture_loop_past_context(attention_kind):
    config = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, attention=attention_kind, **ALL)
    model = randomized(GPT(config, rngs=nnx.Rngs(0)))
    prompt = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1]], np.int32)
    n = 16 + 7  # cached steps, then the sliding window
    fast = decode.generate(model, prompt, n, key=jax.random.key(0), temperature=0)
    lecture = sampling.generate(model, prompt, n, key=jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(fast, lecture)
    assert len(np.unique(fast[:, 9:])) > 2  # varied text, so the equality tests something


def _loss_and_grads(model, idx, key):
    graphdef, params = nnx.split(model)

    def f(p):
        return loss_fn(nnx.merge(graphdef, p)(idx[:, :-1], key=key), idx[:, 1:])

    return jax.value_and_grad(f)(params)


@pytest.mark.parametrize("flags", [dict(scan_layers=True), dict(remat=True)])
def test_all_switches_scan_and_remat_give_the_same_loss_and_gradients(flags):
    config = GPTConfig(**{**SMALL, "n_layer": 3}, **ALL, dropout=0.1)
    plain = randomized(GPT(config, rngs=nnx.Rngs(0)), std=0.2)
    other = GPT(dataclasses.replace(config, **flags), rngs=nnx.Rngs(1))
    scan = flags.get("scan_layers", False)
    nnx.update(other, stack_layers(nnx.state(plain)) if scan else nnx.state(plain))
    idx, key = _tokens(T=13), jax.random.key(3)
    (l_p, g_p), (l_o, g_o) = _loss_and_grads(plain, idx, key), _loss_and_grads(other, idx, key)
    np.testing.assert_allclose(l_o, l_p, rtol=1e-6)
    chex.assert_trees_all_close(unstack_layers(g_o) if scan else g_o, g_p, atol=1e-6)
    assert float(jnp.abs(g_p["h"][0]["attn"]["c_attn"]["kernel"][...]).max()) > 0  # the gradients reach the blocks


def test_all_switches_training_resumes_bit_exact(tmp_path, shakespeare_path):
    """8 steps in one run equal 4 steps + resume + 4 steps, bit for bit, with every switch on."""
    text_path = tiny_text(tmp_path, shakespeare_path)
    switches = {f"model.{k}": v for k, v in ALL.items()}

    def cfg(out, **kw):
        return tiny_config(text_path, out, **switches, **kw)

    one, two = tmp_path / "one", tmp_path / "two"
    training.train(cfg(one))
    training.train(cfg(two, max_iters=4))
    training.train(cfg(two, resume=True))

    def state(out):
        c = checkpoint.Checkpointer(out)
        graphdef, params = nnx.split(config_lib.build_model(cfg(out), data.load_dataset(text_path).vocab_size, 0))
        opt_state = optim.make_optimizer(cfg(out)).init(params)
        restored = c.restore("latest", params=params, opt_state=opt_state, key=jax.random.PRNGKey(0))
        c.close()
        return restored

    s1, s2 = state(one), state(two)
    assert int(s1["train"]["step"]) == int(s2["train"]["step"]) == 8
    chex.assert_trees_all_equal((s1["params"], s1["opt_state"]), (s2["params"], s2["opt_state"]))
    losses = [[r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for out in (one, two)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
