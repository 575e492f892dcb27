"""jaxgpt computes the same numbers as the PyTorch reference: logits, loss, gradients, training; and
`load_init_from` fails with one error type."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxgpt
from jaxgpt import optim
from jaxgpt.convert import InitFromError, load_init_from, torch_name
from tests.reference.torch_gpt import GPT as TorchGPT
from tests.reference.torch_gpt import TorchGPTConfig, train_steps

pytestmark = pytest.mark.usefixtures("torch_highest")  # these tests compare with PyTorch

BASE = dict(block_size=16, vocab_size=37, n_head=4, n_embd=32)
CONFIGS = {
    "nanogpt": dict(n_layer=2),
    "no-bias-untied-relu": dict(n_layer=1, bias=False, tie_embeddings=False, activation="relu"),
    "lecture-heads": dict(n_layer=3, attention="heads", activation="relu", tie_embeddings=False),
    "post-ln-sinusoidal": dict(n_layer=2, norm_position="post", pos_encoding="sinusoidal", activation="gelu_tanh"),
    "heads-no-bias": dict(n_layer=1, attention="heads", bias=False),
    "heads-untied-gelu": dict(n_layer=2, attention="heads", tie_embeddings=False),
}


def _pair(name: str, seed: int = 0):
    kwargs = {**BASE, **CONFIGS[name]}
    torch.manual_seed(seed)
    torch_model = TorchGPT(TorchGPTConfig(**kwargs))
    model = jaxgpt.from_torch_state_dict(jaxgpt.GPTConfig(**kwargs), torch_model.state_dict())
    return torch_model, model


def _batch(B=3, T=11, seed=0):  # T < block_size on purpose
    rng = np.random.default_rng(seed)
    return rng.integers(0, BASE["vocab_size"], (B, T)), rng.integers(0, BASE["vocab_size"], (B, T))


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_torch(name):
    torch_model, model = _pair(name)
    x, y = _batch()
    t_logits, t_loss = torch_model(torch.tensor(x), torch.tensor(y))
    logits = model(jnp.asarray(x))
    assert _rel_err(logits, t_logits.detach().numpy()) <= 1e-5
    # 1e-6 relative to the loss: at a loss near 3.6 one float32 ulp is 2.4e-7, and each framework's
    # log-sum-exp and mean reductions (in their own orders) are a few ulps off the float64 value.
    loss = float(jaxgpt.loss_fn(logits, jnp.asarray(y)))
    assert abs(loss - t_loss.item()) <= 1e-6 * max(1.0, abs(t_loss.item()))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_gradient_equals_torch_autograd(name):
    torch_model, model = _pair(name, seed=1)
    x, y = _batch(seed=1)
    _, t_loss = torch_model(torch.tensor(x), torch.tensor(y))
    t_loss.backward()
    t_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}

    grads = nnx.grad(lambda m: jaxgpt.loss_fn(m(jnp.asarray(x)), jnp.asarray(y)))(model)
    flat = list(nnx.to_flat_state(grads))
    assert len(flat) == len(t_grads)  # named_parameters lists a tied matrix once, as jaxgpt holds it
    for path, g in flat:
        tname, transpose = torch_name(path)
        if tname not in t_grads:  # tied: torch names the shared matrix lm_head.weight
            tname = "lm_head.weight"
        g = np.asarray(g[...])
        if tname.endswith("key.bias"):
            # A key bias adds q.b to a whole row of scores; softmax ignores that, so the exact
            # gradient is zero and both frameworks return rounding noise around it.
            assert np.abs(g).max() < 1e-9 and np.abs(t_grads[tname]).max() < 1e-9
            continue
        assert _rel_err(g.T if transpose else g, t_grads[tname]) <= 1e-5, tname


def test_to_torch_state_dict_round_trips_into_torch():
    torch_model, model = _pair("lecture-heads")
    state_dict = jaxgpt.to_torch_state_dict(model)
    fresh = TorchGPT(TorchGPTConfig(**BASE, **CONFIGS["lecture-heads"]))
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    for name, tensor in torch_model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), tensor.numpy())


def test_converter_errors_name_the_tensor():
    torch_model, _ = _pair("nanogpt")
    config = jaxgpt.GPTConfig(**BASE, **CONFIGS["nanogpt"])
    state_dict = dict(torch_model.state_dict())
    missing = {k: v for k, v in state_dict.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(ValueError, match=r"no tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        jaxgpt.from_torch_state_dict(config, missing)
    wrong = {**state_dict, "transformer.ln_f.weight": torch.zeros(31)}
    message = r"'transformer\.ln_f\.weight' has shape \(31,\) but the model expects \(32,\)"
    with pytest.raises(ValueError, match=message):
        jaxgpt.from_torch_state_dict(config, wrong)
    extra = {**state_dict, "transformer.h.2.ln_1.weight": torch.zeros(32)}
    with pytest.raises(ValueError, match="parameters the model does not"):
        jaxgpt.from_torch_state_dict(config, extra)


def test_numpy_arrays_and_compile_prefix_are_accepted():
    torch_model, model = _pair("nanogpt")
    as_numpy = {"_orig_mod." + k: v.numpy() for k, v in torch_model.state_dict().items()}
    again = jaxgpt.from_torch_state_dict(model.config, as_numpy)
    x, _ = _batch()
    np.testing.assert_array_equal(again(jnp.asarray(x)), model(jnp.asarray(x)))


# GELU models: with ReLU a pre-activation within rounding of 0 can take the other side of the kink in
# one framework, and Adam's normalised update turns that into a visible difference after a few steps.
@pytest.mark.parametrize("name", ["nanogpt", "heads-untied-gelu"])
def test_twenty_adamw_steps_equal_torch(name):
    recipe = dict(learning_rate=1e-3, warmup_iters=5, lr_decay_iters=20, min_lr=1e-4)
    weight_decay, betas, grad_clip, steps = 0.1, (0.9, 0.99), 1.0, 20
    torch_model, model = _pair(name, seed=2)
    initial = jaxgpt.to_torch_state_dict(model)
    batches = [_batch(B=4, T=16, seed=100 + i) for i in range(steps)]
    t_losses = train_steps(
        torch_model,
        [(torch.tensor(x), torch.tensor(y)) for x, y in batches],
        steps=steps,
        weight_decay=weight_decay,
        betas=betas,
        grad_clip=grad_clip,
        **recipe,
    )

    tx = optim.adamw(
        optim.lr_schedule(**recipe),
        weight_decay=weight_decay,
        beta1=betas[0],
        beta2=betas[1],
        grad_clip=grad_clip,
    )
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_of(p):
            return jaxgpt.loss_fn(nnx.merge(graphdef, p)(x), y)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for x, y in batches:
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(loss))
    np.testing.assert_allclose(losses, t_losses, atol=1e-5)

    trained = jaxgpt.to_torch_state_dict(nnx.merge(graphdef, params))
    moved = 0.0
    for tname, tensor in torch_model.state_dict().items():
        if tname in trained:
            np.testing.assert_allclose(trained[tname], tensor.numpy(), atol=1e-5, err_msg=tname)
            moved = max(moved, float(np.abs(trained[tname] - initial[tname]).max()))
    assert moved > 5e-3  # the steps really changed the weights, far beyond the tolerance


def test_every_failure_of_load_init_from_is_one_init_from_error_naming_the_spec(tmp_path):
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "ckpt.pt").write_bytes(b"not a checkpoint")
    cases = {
        "resume": "is not 'nanogpt:PATH', 'gpt2:PATH' or 'hf:PATH'",
        f"nanogpt:{tmp_path / 'nowhere'}": "no nanoGPT checkpoint at",
        f"nanogpt:{tmp_path / 'garbled'}": "is not a readable PyTorch checkpoint",
        f"gpt2:{tmp_path}": "has no config.json",
    }
    for spec, reason in cases.items():
        with pytest.raises(InitFromError) as e:
            load_init_from(spec)
        assert e.value.spec == spec and reason in e.value.reason, e.value
        assert str(e.value) == f"init_from {spec!r}: {e.value.reason}" and "\n" not in str(e.value)
        assert isinstance(e.value, ValueError)  # what callers that predate it catch
