"""nanoGPT's optimiser recipe: the schedule, the decay mask, clipping; and Muon beside it."""

import json

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig, checkpoint, data, optim, run_dir, training
from jaxgpt import config as config_lib
from jaxgpt.layout import stack_layers
from tests.reference.torch_gpt import get_lr as torch_get_lr
from tests.test_training import tiny_config, tiny_text

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


# ------------------------------------------------------------------------------------------------------------ Muon


def _gpt_params(n_layer: int = 2, **kw) -> nnx.State:
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=n_layer, n_head=2, n_embd=8, **kw)
    return nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param)


def _muon_config(**overrides):
    c = config_lib.base_config()
    c.optimizer = "muon"
    c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters = 1e-2, 1e-3, 2, 6
    c.muon_learning_rate, c.muon_momentum, c.muon_weight_decay = 0.05, 0.9, 0.01
    for key, value in overrides.items():
        c[key] = value
    return c


def _flat(tree) -> dict[str, np.ndarray]:
    """A params-shaped tree (an nnx.State or nested dicts) as {'h.0.attn.c_attn.kernel': array, ...}."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


BLOCK_MATRICES = ("attn.c_attn.kernel", "attn.c_proj.kernel", "mlp.c_fc.kernel", "mlp.c_proj.kernel")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(scan_layers):
    params = _gpt_params(scan_layers=scan_layers)
    labels = _flat(optim.muon_labels(params))
    blocks = ["h"] if scan_layers else ["h.0", "h.1"]
    assert {k for k, v in labels.items() if v == "muon"} == {f"{b}.{m}" for b in blocks for m in BLOCK_MATRICES}
    adamw = {k for k, v in labels.items() if v == "adamw"}
    assert {"wte.embedding", "wpe.embedding", "ln_f.scale", "ln_f.bias", f"{blocks[0]}.ln_1.scale",
            f"{blocks[0]}.attn.c_attn.bias"} <= adamw  # a stacked bias (n_layer, 3C) is 2-D, and still AdamW's
    assert len(adamw) + sum(v == "muon" for v in labels.values()) == len(labels)


def test_muon_takes_the_lectures_head_matrices_but_not_the_output_layer():
    labels = _flat(optim.muon_labels(_gpt_params(n_layer=1, attention="heads", tie_embeddings=False)))
    muon = {k for k, v in labels.items() if v == "muon"}
    heads = {f"h.0.attn.heads.{i}.{w}.kernel" for i in range(2) for w in ("key", "query", "value")}
    assert muon == heads | {"h.0.attn.c_proj.kernel", "h.0.mlp.c_fc.kernel", "h.0.mlp.c_proj.kernel"}
    assert labels["lm_head.kernel"] == "adamw"


def test_muon_state_starts_as_zeros():
    """The training loop makes the first optimizer state as zeros from its shapes, without calling `init`."""
    state = optim.make_optimizer(_muon_config()).init(_gpt_params())
    assert jax.tree.leaves(state) and all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state))


def _updates_by_hand(config, params: dict, grads_list: list[dict], jit: bool) -> list[dict]:
    """Optax's own transformations on the same leaves: `optax.contrib.muon` on the blocks' kernels (a leading layer
    axis a batch), `optax.adamw` with nanoGPT's decay on the rest, after the global-norm clip over all. `jit`:
    each update compiled, as the training step compiles (XLA fuses Newton-Schulz's float32 products its own way)."""
    is_muon = {k: k.startswith("h.") and k.endswith(".kernel") for k in params}
    decays = {k: k.endswith((".kernel", ".embedding")) for k in params}
    adamw_lr = optim.schedule_from_config(config)
    ratio = config.muon_learning_rate / config.learning_rate
    muon_tx = optax.contrib.muon(
        lambda count: adamw_lr(count) * ratio, ns_steps=config.muon_ns_steps, beta=config.muon_momentum,
        weight_decay=config.muon_weight_decay, nesterov=config.muon_nesterov,
        muon_weight_dimension_numbers=lambda p: jax.tree.map(
            lambda x: optax.contrib.MuonDimensionNumbers(x.ndim - 2, x.ndim - 1), p))
    adamw_tx = optax.adamw(adamw_lr, b1=config.beta1, b2=config.beta2, eps=1e-8, weight_decay=config.weight_decay,
                           mask={k: decays[k] for k in params if not is_muon[k]})
    clip = optim.clip_by_global_norm(config.grad_clip)
    part = lambda tree, muon: {k: v for k, v in tree.items() if is_muon[k] == muon}  # noqa: E731
    states = muon_tx.init(part(params, True)), adamw_tx.init(part(params, False))
    updates = [jax.jit(tx.update) if jit else tx.update for tx in (muon_tx, adamw_tx)]
    out = []
    for grads in grads_list:
        grads, _ = clip.update(grads, optax.EmptyState())
        (m, muon_state), (a, adamw_state) = (update(part(grads, muon), state, part(params, muon))
                                             for update, state, muon in zip(updates, states, (True, False)))
        states = muon_state, adamw_state
        out.append(m | a)
    return out


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_update_is_optaxs_own(scan_layers, traced):
    """Three updates (warm-up and decay, the first clipped) of `make_optimizer` equal Optax's transformations
    applied by hand to the same leaves: uncompiled, and compiled with the numbers as the program's arguments (as the
    training step has them) beside Optax's compiled."""
    config = _muon_config()
    params = _gpt_params(scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    grads_list = [jax.tree.map(lambda p, s=scale: jnp.asarray(rng.normal(size=p.shape) * s, p.dtype), params)
                  for scale in (1.0, 0.02, 0.05)]  # global norms ~15 (clipped), then under 1
    if traced:
        update = jax.jit(lambda g, s, p, n: optim.make_optimizer(config, n).update(g, s, p))
        numbers = optim.recipe_numbers(config)
        assert set(optim.MUON_NUMBERS) <= set(numbers)
    else:
        tx = optim.make_optimizer(config)
        update = lambda g, s, p, n: tx.update(g, s, p)  # noqa: E731
        numbers = None
    state = optim.make_optimizer(config).init(params)
    expected = _updates_by_hand(config, _flat(params), [_flat(g) for g in grads_list], jit=traced)
    for grads, want in zip(grads_list, expected):
        got, state = update(grads, state, params, numbers)
        got = _flat(got)
        assert got.keys() == want.keys()
        for k in got:
            # Newton-Schulz's five quintic steps round apart wherever the two sides' matmuls differ: compiled, two
            # programs (1.3e-6 of the leaf's largest entry seen with XLA's default CPU code generator, 1.0e-5 with
            # the tests' settings, tests/conftest.py); uncompiled, jaxgpt's one batched chain per matrix shape
            # against Optax's chain per matrix, equal on some CPUs and 1.4e-8 apart on entries ~1e-2 on others
            # (AMD EPYC, 2026-12-07). So within 3e-5 of the leaf's largest entry, where entries near zero differ by
            # more than 1e-6 of themselves; a wrong coefficient or learning rate moves them by 1e-2 of it or more.
            atol = 3e-5 * np.abs(want[k]).max()
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=atol, err_msg=k)


def test_muon_on_stacked_layers_is_muon_on_each_layer():
    config = _muon_config()
    params = _gpt_params(n_layer=3)
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape), p.dtype), params)
    tx = optim.make_optimizer(config)
    per_layer, _ = tx.update(grads, tx.init(params), params)
    stacked, _ = tx.update(stack_layers(grads), tx.init(stack_layers(params)), stack_layers(params))
    want, got = _flat(stack_layers(per_layer)), _flat(stacked)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-9, err_msg=k)


def _dot_products(jaxpr) -> int:
    """dot_general equations of a jaxpr, those of its sub-jaxprs (loops, vmaps, calls) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _dot_products(sub)
    return n


def test_muon_orthogonalises_same_shaped_matrices_in_one_chain():
    """One batched Newton-Schulz chain per matrix shape, however many blocks: the products do not grow with depth
    (each block adds four matrices of the four shapes it already has)."""
    tx = optim.make_optimizer(_muon_config())

    def products(n_layer: int) -> int:
        params = _gpt_params(n_layer=n_layer)
        return _dot_products(jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr)

    assert products(1) == products(3) > 0


@pytest.mark.parametrize("key, value", [("optimizer", "sgd"), ("muon_learning_rate", 0.0), ("muon_momentum", 1.0),
                                        ("muon_ns_steps", 0), ("muon_weight_decay", -0.1)])
def test_bad_muon_settings_are_one_config_error(key, value):
    c = config_lib.base_config()
    c[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
        config_lib.validate(c)


def test_training_with_muon_lowers_the_loss_and_resumes_bit_exact(tmp_path, shakespeare_path):
    """8 Muon steps straight equal 4 steps + resume + 4 steps, bit for bit, and lower the loss; a resume that
    switches the optimizer stops with one line instead of restoring the wrong state. Scanned layers: each block
    kernel a stack of two matrices through the loop and the checkpoints."""
    text_path = tiny_text(tmp_path, shakespeare_path)
    muon = {"optimizer": "muon", "muon_learning_rate": 0.05, "model.n_layer": 2, "model.scan_layers": True}
    one, two = tmp_path / "one", tmp_path / "two"
    training.train(tiny_config(text_path, one, **muon))
    training.train(tiny_config(text_path, two, max_iters=4, **muon))
    training.train(tiny_config(text_path, two, resume=True, **muon))

    def state(out):
        c = checkpoint.Checkpointer(out)
        cfg = tiny_config(text_path, out, **muon)
        params = nnx.state(config_lib.build_model(cfg, data.load_dataset(text_path).vocab_size, 0))
        opt_state = optim.make_optimizer(cfg).init(params)  # Muon's state: AdamW's would not restore
        restored = c.restore("latest", params=params, opt_state=opt_state, key=jax.random.PRNGKey(0))
        c.close()
        return restored

    s1, s2 = state(one), state(two)
    assert int(s1["train"]["step"]) == int(s2["train"]["step"]) == 8
    for a, b in zip(jax.tree.leaves((s1["params"], s1["opt_state"])), jax.tree.leaves((s2["params"],
                                                                                        s2["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = [[r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for out in (one, two)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert np.mean(losses[0][-2:]) < np.mean(losses[0][:2]) - 0.2

    with pytest.raises(run_dir.TrainingError, match=r"optimizer='muon'.* 'adamw'") as error:
        training.train(tiny_config(text_path, two, resume=True, max_iters=12, **{**muon, "optimizer": "adamw"}))
    assert str(error.value).startswith("resume: ") and "\n" not in str(error.value)
    assert "model." not in str(error.value)  # not the model's check: the model is the checkpoint's
