"""nanoGPT's optimiser recipe: the schedule, the decay mask, clipping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig, optim
from tests.reference.torch_gpt import get_lr as torch_get_lr

RECIPE = dict(learning_rate=1e-3, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4)


@pytest.mark.parametrize("it", [0, 1, 50, 99, 100, 101, 2500, 4999, 5000, 5001, 9000])
def test_get_lr_equals_nanogpt(it):
    assert float(optim.get_lr(it, **RECIPE)) == pytest.approx(torch_get_lr(it, **RECIPE), rel=1e-6)


def test_schedule_is_jit_able_and_constant_without_decay():
    schedule = jax.jit(optim.lr_schedule(**RECIPE))
    assert float(schedule(jnp.asarray(2500))) == pytest.approx(torch_get_lr(2500, **RECIPE), rel=1e-6)
    assert float(optim.lr_schedule(3e-4, decay_lr=False)(123)) == pytest.approx(3e-4)


def test_decay_mask_is_two_or_more_dims():
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8), rngs=nnx.Rngs(0))
    mask = optim.decay_mask(nnx.state(model, nnx.Param))
    decayed = {".".join(map(str, p)) for p, v in nnx.to_flat_state(mask) if v[...]}
    assert decayed == {
        "wte.embedding",
        "wpe.embedding",
        "h.0.attn.c_attn.kernel",
        "h.0.attn.c_proj.kernel",
        "h.0.mlp.c_fc.kernel",
        "h.0.mlp.c_proj.kernel",
    }


def test_biases_are_not_decayed_but_weights_are():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = optim.adamw(1.0, weight_decay=0.5, grad_clip=0.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 0.5)  # decoupled decay: w - lr * wd * w
    np.testing.assert_allclose(new["b"], 1.0)


def _second_update(grad_clip: float, grads: dict) -> dict:
    """jaxgpt's AdamW update for `grads` after a small first gradient.

    Adam's first update is the gradient's sign whatever its size; the second shows whether it was clipped.
    """
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}
    tx = optim.adamw(1e-2, weight_decay=0.1, beta2=0.99, grad_clip=grad_clip)
    state = tx.init(params)
    first = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)  # global norm 0.3: never clipped
    _, state = tx.update(first, state, params)
    updates, _ = tx.update(grads, state, params)
    return updates


def test_grad_clip_scales_a_large_gradient_to_the_clip_norm():
    grads = {"w": jnp.arange(6.0).reshape(2, 3) * 10.0 - 20.0, "b": jnp.array([30.0, -4.0, 7.0])}
    norm = float(np.sqrt(sum(float(jnp.sum(g**2)) for g in grads.values())))
    assert norm > 1.0
    unit = jax.tree.map(lambda g: g / norm, grads)  # the same direction at global norm 1
    clipped, expected = _second_update(1.0, grads), _second_update(1.0, unit)
    chex.assert_trees_all_close(clipped, expected, rtol=1e-5)
    unclipped = _second_update(0.0, grads)  # grad_clip=0: no clipping, the large gradient moves Adam differently
    assert float(jnp.max(jnp.abs(unclipped["w"] - clipped["w"]))) > 1e-4
    chex.assert_trees_all_close(_second_update(0.0, unit), expected, rtol=1e-5)  # below the clip nothing changes
    chex.assert_trees_all_close(_second_update(2.0 * norm, grads), unclipped, rtol=1e-5)  # a clip above the norm


@pytest.mark.parametrize("scale", [0.01, 0.1, 0.3, 7.0, 1e4])  # global norms ~0.05 to ~5e4
def test_clip_is_pytorchs_clip_grad_norm(scale):
    """nanoGPT clips with torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (norm + 1e-6)), in place."""
    import torch

    rng = np.random.default_rng(0)
    grads = {name: rng.normal(size=shape).astype(np.float32) * scale for name, shape in (("w", (4, 5)), ("b", (5,)))}
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    tensors = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    clipped, _ = optim.clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
    for t, name in zip(tensors, grads):
        np.testing.assert_allclose(np.asarray(clipped[name]), t.grad.numpy(), rtol=1e-6, atol=0)
    if norm < 1.0 - 1e-5:  # below the clip norm the gradients pass unchanged, bit for bit
        for name in grads:
            np.testing.assert_array_equal(np.asarray(clipped[name]), grads[name])


def test_decay_mask_is_the_same_for_scanned_layers():
    from jaxgpt.layout import stack_layers
    from jaxgpt.model import GPT, GPTConfig

    config = GPTConfig(block_size=8, vocab_size=11, n_layer=3, n_head=2, n_embd=8)
    params = nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
    mask = optim.decay_mask(params)
    stacked_mask = optim.decay_mask(stack_layers(params))
    assert bool(mask["h"][0]["attn"]["c_attn"]["kernel"][...]) and not bool(mask["h"][0]["ln_1"]["scale"][...])
    assert bool(stacked_mask["h"]["attn"]["c_attn"]["kernel"][...])  # (L, C, 3C): a matrix per layer
    assert not bool(stacked_mask["h"]["attn"]["c_attn"]["bias"][...])  # (L, 3C): a bias per layer
    assert not bool(stacked_mask["h"]["ln_1"]["scale"][...])
    assert bool(stacked_mask["wte"]["embedding"][...]) and not bool(stacked_mask["ln_f"]["scale"][...])
