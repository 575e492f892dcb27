"""Sharding: mesh construction, the FSDP partition rule, batch checks, multi-host detection, and (in a
subprocess with 8 simulated CPU devices) equality of data-parallel and FSDP training with one device."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxgpt.sharding import (
    batch_sharding,
    check_batch_size,
    is_multiprocess_env,
    make_mesh,
    maybe_initialize_distributed,
    param_spec,
    process_rows,
    shard_params,
    sharded_shapes,
    zeros,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, n: int = 8, timeout: int = 300, extra_args: tuple[str, ...] = (),
                     cache_dir: str | None = None) -> dict:
    """Runs `code` in a fresh Python with `n` simulated CPU devices (`extra_args` in sys.argv[1:], compiled
    programs kept in `cache_dir`); it prints one JSON line last."""
    env = dict(os.environ)
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *extra_args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_param_spec_shards_the_largest_divisible_axis():
    assert param_spec((32, 96), 8) == PartitionSpec(None, "fsdp")
    assert param_spec((96, 32), 8) == PartitionSpec("fsdp", None)
    assert param_spec((37, 32), 8) == PartitionSpec(None, "fsdp")  # 37 is not divisible: the other axis
    assert param_spec((37,), 8) == PartitionSpec(None)  # nothing divisible: replicated
    assert param_spec((32, 96), 1) == PartitionSpec(None, None)  # no fsdp: replicated
    assert param_spec((), 8) == PartitionSpec()
    assert param_spec((64, 32, 96), 8, skip_leading=True) == PartitionSpec(None, None, "fsdp")


def test_mesh_sizes_and_errors_on_one_device():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1}
    with pytest.raises(ValueError, match="devices, but there are"):
        make_mesh(data=3 * len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh(data=-1, fsdp=3 * len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="positive integer or -1"):
        make_mesh(data=0)


class _ProcessView:
    """What `process_rows` asks a sharding: the index of each device this process holds."""

    def __init__(self, indices):
        self.indices = indices

    def addressable_devices_indices_map(self, shape):
        return dict(enumerate(self.indices))


def test_sharded_shapes_are_what_shard_params_makes():
    mesh = make_mesh(1, 1)
    tree = {"w": np.ones((4, 6), np.float32), "count": np.zeros((), np.int32), "half": np.ones(3, np.float16)}
    shapes, placed = sharded_shapes(tree, mesh), shard_params(tree, mesh)
    for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(placed)):
        assert (s.shape, s.dtype, s.sharding) == (a.shape, a.dtype, a.sharding)


@pytest.mark.parametrize("name", ["shakespeare_char_cpu", "lecture"])
def test_optimizer_state_from_zeros_is_what_its_init_makes(name):
    """train() places the optimizer's state as host zeros of its shapes (nothing compiled): the premise is that the
    config's optimizer starts from zeros, in the same tree, dtypes and shardings as `tx.init`."""
    from jaxgpt import config as config_lib
    from jaxgpt import optim

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    tx = optim.make_optimizer(config)
    mesh = make_mesh(1, 1)
    params = shard_params(nnx.state(config_lib.build_model(config, 65, 0), nnx.Param), mesh)
    shapes = sharded_shapes(jax.eval_shape(tx.init, params), mesh)
    expected = jax.jit(tx.init, out_shardings=jax.tree.map(lambda s: s.sharding, shapes))(params)
    got = zeros(shapes)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert (g.shape, g.dtype, g.sharding, g.weak_type) == (e.shape, e.dtype, e.sharding, e.weak_type)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_batch_and_process_splits():
    mesh = make_mesh()
    check_batch_size(4 * len(jax.devices()), mesh)
    sharding = batch_sharding(mesh, 3, batch_axis=-2)
    assert sharding.spec == PartitionSpec(None, ("data", "fsdp"), None)
    assert process_rows(sharding, (5, 12, 8), axis=-2) == slice(0, 12)  # one process holds every row
    # Process 1 of 3, two devices each, batch of 12 on axis 1 (each device holds 2 rows; the fsdp copies repeat).
    mine = [(slice(None), slice(4, 6), slice(None)), (slice(None), slice(6, 8), slice(None)),
            (slice(None), slice(4, 6), slice(None))]
    assert process_rows(_ProcessView(mine), (5, 12, 8), axis=1) == slice(4, 8)
    gap = [(slice(0, 2), slice(None)), (slice(6, 8), slice(None))]
    with pytest.raises(ValueError, match="non-contiguous rows"):
        process_rows(_ProcessView(gap), (12, 8), axis=0)


def test_multiprocess_detection():
    assert not is_multiprocess_env({})
    assert not is_multiprocess_env({"SLURM_NTASKS": "1"})
    assert is_multiprocess_env({"SLURM_NTASKS": "4"})
    assert is_multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert is_multiprocess_env({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert not is_multiprocess_env({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert maybe_initialize_distributed({}) is False  # one process: nothing to join
    with pytest.raises(ValueError, match="not an integer"):
        is_multiprocess_env({"JAX_NUM_PROCESSES": "many"})


@pytest.mark.slow  # a Python subprocess
def test_batch_not_divisible_is_a_clear_error_on_8_devices():
    out = run_with_devices(
        """
        import json
        from jaxgpt.sharding import make_mesh, check_batch_size
        mesh = make_mesh(data=2, fsdp=-1)
        try:
            check_batch_size(12, mesh)
            msg = None
        except ValueError as e:
            msg = str(e)
        print(json.dumps({"shape": dict(mesh.shape), "msg": msg}))
        """
    )
    assert out["shape"] == {"data": 2, "fsdp": 4}
    assert "batch_size=12 is not divisible by the data-parallel size 8" in out["msg"]


SHARDED_STEPS = """
import json
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jaxgpt.model import GPT, GPTConfig, loss_fn
from jaxgpt.optim import adamw
from jaxgpt.sharding import make_mesh, shard_params, batch_sharding, state_shardings, constrain_batch

jax.config.update("jax_default_matmul_precision", "highest")
SCAN = {scan}
config = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32, scan_layers=SCAN, **{switches})
tx = adamw(1e-3, weight_decay=0.1)  # nanoGPT-sized steps: Adam magnifies reduction-order noise
# One batch three times: the loss must fall, so the steps are seen to train.
data = jnp.tile(jax.random.randint(jax.random.key(1), (1, 8, 17), 0, 40), (3, 1, 1))

def run(mesh):
    model = GPT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    params = shard_params(params, mesh, scan_layers=SCAN)
    opt_state = shard_params(opt_state, mesh, scan_layers=SCAN)
    p_sh, o_sh = state_shardings(params, mesh, SCAN), state_shardings(opt_state, mesh, SCAN)
    b_sh = batch_sharding(mesh)

    def step(params, opt_state, batch):
        batch = constrain_batch(batch, mesh)  # a no-op for an already split batch; splits a replicated one
        def f(p):
            return loss_fn(nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:])
        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    step = jax.jit(step, in_shardings=(p_sh, o_sh, None), out_shardings=(p_sh, o_sh, None, p_sh),
                   donate_argnums=(0, 1))
    losses, grads = [], []
    for i in range(3):
        # Step 1 gets a replicated batch (as when batches are drawn on the device), the others a split one.
        batch = jax.device_put(data[i], b_sh if i else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        params, opt_state, loss, g = step(params, opt_state, batch)
        losses.append(float(loss))
        grads.append(flat(g))
    kernel = params["h"][0]["mlp"]["c_fc"]["kernel"] if not SCAN else params["h"]["mlp"]["c_fc"]["kernel"]
    return losses, grads, flat(params), str(kernel.sharding.spec)

def flat(tree):
    pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    return {{"/".join(map(str, k)): np.asarray(v) for k, v in nnx.traversals.flatten_mapping(pure).items()}}

def worst(a, b, scale=None):
    # the largest difference over all leaves; relative to each leaf's largest reference value when `scale`
    d = {{k: float(np.abs(a[k] - b[k]).max() / (np.abs(b[k]).max() if scale else 1.0)) for k in b}}
    k = max(d, key=d.get)
    return d[k], k

ref_losses, ref_grads, ref_params, _ = run(make_mesh(1, 1, devices=jax.devices()[:1]))
out = {{"n_devices": len(jax.devices()), "ref_losses": ref_losses}}
for name, (d, f) in {{"dp8": (8, 1), "fsdp8": (1, 8), "2x4": (2, 4)}}.items():
    losses, grads, params, spec = run(make_mesh(d, f))
    grad_diff, grad_worst = worst(grads[0], ref_grads[0], scale=True)  # the first step: the same parameters
    param_diff, param_worst = worst(params, ref_params)
    out[name] = {{"loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)), "grad_diff": grad_diff,
                 "grad_worst": grad_worst, "param_diff": param_diff, "param_worst": param_worst, "spec": spec}}
print(json.dumps(out))
"""


# The modern-GPT switches of GPTConfig: parameters of other shapes and names. Not zero_init_proj: its first step
# gives c_fc an all-zero gradient, which the relative gradient bound below cannot divide by.
MODERN = dict(pos_encoding="rotary", qk_norm=True, activation="relu2", norm="rmsnorm", logit_softcap=5.0,
              tie_embeddings=False)


@pytest.mark.parametrize("scan, switches", [(False, {}), (True, {}), (False, MODERN)],
                         ids=["layers", "scan_layers", "modern_switches"])
@pytest.mark.slow  # a Python subprocess
def test_data_parallel_and_fsdp_match_one_device(scan, switches):
    out = run_with_devices(SHARDED_STEPS.format(scan=scan, switches=switches))
    assert out["n_devices"] == 8
    assert out["ref_losses"][2] < out["ref_losses"][0]  # it trained
    # Bounds by what float32 reduction order can honestly change. Losses and the first step's gradients (the
    # same parameters everywhere) are sums in another order: a few float32 ulps of their scale (each gradient
    # leaf relative to its largest entry); later gradients also see the parameters' differences. The
    # parameters after AdamW steps are not: Adam divides a gradient by its own root-mean-square, so an entry
    # whose gradient is near zero moves by up to lr either way on noise alone (measured: 1.4e-5 on an Intel
    # Xeon, 1e-6 on an AMD EPYC). A wrong sharding (a gradient not summed over the batch shards, a
    # parameter shard updated from another's moments) moves entries by ~lr = 1e-3, far above lr / 10.
    for name in ("dp8", "fsdp8", "2x4"):
        assert out[name]["loss_diff"] < 1e-5, (name, out[name])
        assert out[name]["grad_diff"] < 1e-5, (name, out[name])
        assert out[name]["param_diff"] < 1e-4, (name, out[name])
    assert "fsdp" not in out["dp8"]["spec"]  # pure data parallelism: replicated weights
    assert "fsdp" in out["fsdp8"]["spec"] and "fsdp" in out["2x4"]["spec"]  # FSDP: weights split


# ---------------------------------------------------------------------------------------- train(config)

TRAIN_ON_8 = """
import json, sys, warnings
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from jaxgpt import config as config_lib, sharding, training
from tests.test_training import tiny_config

specs = set()
real_shard = training.sharding_lib.shard_params

def recording_shard(tree, mesh, scan_layers=False):
    out = real_shard(tree, mesh, scan_layers)
    specs.update(str(x.sharding.spec) for x in jax.tree.leaves(out) if x.ndim == 2)
    return out

training.sharding_lib.shard_params = recording_shard
text, tmp = sys.argv[1], sys.argv[2]
out = {{"n_devices": len(jax.devices()), "specs": {{}}}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, data, fsdp, kw in {runs}:
        specs.clear()
        training.train(tiny_config(text, f"{{tmp}}/{{name}}", **{{"mesh.data": data, "mesh.fsdp": fsdp, **kw}}))
        out["specs"][name] = sorted(specs)
try:
    training.train(tiny_config(text, f"{{tmp}}/bad", batch_size=12, compile_cache=False, **{{"mesh.data": 8}}))
except config_lib.ConfigError as e:
    out["batch_error"] = str(e)
out["donation_warnings"] = [str(w.message) for w in caught if "donat" in str(w.message).lower()]
print(json.dumps(out))
"""


def _losses(out_dir, key="loss"):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture
def xla_cache(tmp_path):
    """A compilation cache for this process and its subprocesses: runs on the same mesh compile once."""
    from jaxgpt.training import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    enable_compilation_cache(tmp_path / "xla", min_compile_time_secs=0)
    yield str(tmp_path / "xla")
    if before:
        enable_compilation_cache(before, min_compile_time_secs=0)
    else:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


@pytest.mark.slow  # a Python subprocess
def test_train_on_8_devices_matches_one_device_and_checkpoints_move_between_meshes(tmp_path, shakespeare_path,
                                                                                     xla_cache):
    """train(config) with data parallelism 8 and with FSDP 2 x 4 gives one device's losses; a 1-device
    checkpoint resumes on 2 x 4 (FSDP) devices, a data-parallel 8 checkpoint resumes on one device, and
    load_model reads the FSDP run's checkpoint onto one device."""
    from jaxgpt import checkpoint, training
    from tests.test_training import tiny_config, tiny_text

    assert len(jax.devices()) == 1  # the reference runs in this process
    text = tiny_text(tmp_path, shakespeare_path)
    # dropout 0.1 (tiny_config): the masks must not depend on the mesh either
    cfg = dict(batch_size=8, max_iters=4, compile_cache=False, plot=False)
    ref = tmp_path / "ref"
    training.train(tiny_config(text, ref, **cfg))
    shutil.copytree(ref, tmp_path / "one_to_8")
    training.train(tiny_config(text, ref, resume=True, **dict(cfg, max_iters=8)))

    runs = [("dp8", 8, 1, cfg), ("one_to_8", -1, 4, dict(cfg, resume=True, max_iters=8))]
    out = run_with_devices(TRAIN_ON_8.format(runs=runs), extra_args=(str(text), str(tmp_path)),
                           cache_dir=xla_cache)
    assert out["n_devices"] == 8
    training.train(tiny_config(text, tmp_path / "dp8", resume=True, **dict(cfg, max_iters=8)))  # 8 -> 1 device

    want, want_val = _losses(ref), _losses(ref, "val_loss")
    assert sorted(want) == list(range(8)) and want[7] < want[0]  # it trained
    for name in ("dp8", "one_to_8"):
        got, got_val = _losses(tmp_path / name), _losses(tmp_path / name, "val_loss")
        assert sorted(got) == list(range(8)) and sorted(got_val) == [0, 4, 8], name
        for s in got:
            assert abs(got[s] - want[s]) < 1e-5, (name, s, got[s], want[s])
        for s in got_val:
            assert abs(got_val[s] - want_val[s]) < 1e-5, (name, s, got_val[s], want_val[s])
    assert all("fsdp" not in s for s in out["specs"]["dp8"])  # data parallel: replicated weights
    assert any("fsdp" in s for s in out["specs"]["one_to_8"])  # FSDP: weights split
    assert out["donation_warnings"] == []  # the step's outputs keep the inputs' shardings
    msg = out["batch_error"]
    assert "batch_size=12 is not divisible by the data-parallel size 8" in msg and "\n" not in msg

    # sample.py's loader: the FSDP run's step-8 weights, whole on this process's one device.
    model, _, info = checkpoint.load_model(tmp_path / "one_to_8", "latest")
    ref_model, _, _ = checkpoint.load_model(ref, "latest")
    assert info["step"] == 8
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ref_model))):
        assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_mesh_that_does_not_fit_the_devices_is_a_config_error(tmp_path, shakespeare_path):
    from jaxgpt import training
    from jaxgpt.config import ConfigError
    from tests.test_training import tiny_config, tiny_text

    text_path = tiny_text(tmp_path, shakespeare_path)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"'mesh.data'=2 x 'mesh.fsdp'=1 = 2 devices, but there are 1"):
        training.train(tiny_config(text_path, out, **{"mesh.data": 2}))
    with pytest.raises(ConfigError, match=r"'mesh.fsdp'=3 does not divide the 1 devices"):
        training.train(tiny_config(text_path, out, **{"mesh.fsdp": 3}))
    assert not (out / "metrics.jsonl").exists()


CPU_DEVICES = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from jaxgpt import sharding, training
from tests.test_training import tiny_config

text, tmp = sys.argv[1], sys.argv[2]
lines = []
summary = training.train(tiny_config(text, tmp + "/two", **{"mesh.cpu_devices": 2}), log=lines.append)
later = sharding.use_cpu_devices(3)  # JAX runs now: refused, with the reason
mesh = sharding.make_mesh(data=2)
x = jax.device_put(jax.numpy.arange(8.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
split = jax.device_put(x, sharding.batch_sharding(mesh, ndim=1))
one, shape, kept = sharding.first_replica((x, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), split))
print(json.dumps({"n_devices": len(jax.devices()), "lines": lines, "later": later,
                  "same": sharding.use_cpu_devices(2), "loss": summary["best_val_loss"],
                  "first_replica": [len(one.sharding.device_set), one.tolist() == x.tolist(),
                                    len(shape.sharding.device_set), kept is split]}))
"""


@pytest.mark.slow  # a Python subprocess
def test_cpu_devices_make_a_data_parallel_mesh_before_jax_starts(tmp_path, shakespeare_path):
    """`mesh.cpu_devices=2` (the CPU recipe's) makes two CPU devices, whatever XLA_FLAGS said, when train() is JAX's
    first computation; the run is data-parallel over them and trains as one device does, to float32 rounding.
    Asked once JAX runs, it is refused with a note, not an error. (And `first_replica`, which its sample and
    checkpoints use, on those two devices.)"""
    from jaxgpt import training
    from tests.test_training import tiny_config, tiny_text

    text_path = tiny_text(tmp_path, shakespeare_path)
    out = run_with_devices(CPU_DEVICES, n=1, extra_args=(str(text_path), str(tmp_path)))
    assert out["n_devices"] == 2
    assert any(line.startswith("mesh: data 2 x fsdp 1 over 2 cpu devices") for line in out["lines"])
    assert out["same"] is None  # what runs already: nothing to say
    assert "'mesh.cpu_devices'=3 not applied: JAX already runs with 2 CPU device(s)" in out["later"]
    # first_replica: a replicated array as one device's copy, its shape too; a split array stays split.
    assert out["first_replica"] == [1, True, 1, True]
    one = training.train(tiny_config(text_path, tmp_path / "one"), log=lambda s: None)  # this process: one device
    assert out["loss"] == pytest.approx(one["best_val_loss"], rel=1e-4)
