"""Training: a pure, jitted train step over the split NNX state, and the loop around it.

The step is functional, the way Flax's gemma and MaxText do it: `graphdef, params = nnx.split(model)`;
`train_chunk(params, opt_state, data, base_key, step0)` runs `n_steps` optimizer steps in one `lax.scan`
(so a CPU pays Python dispatch once per chunk, not per step), `nnx.merge`s the model inside, donates
`params` and `opt_state`, and returns the per-step losses. Gradient accumulation is a `lax.scan` over
micro-batches inside each step.

Every random choice is a function of (seed, step): the batch and the dropout masks of step i come from
`fold_in(base_key, i)`. The data position and the RNG are therefore restored by restoring the step, and
N steps in one run equal N/2 + resume + N/2 bit for bit.

`train(config)` is the loop, and the only place with I/O: evaluation, metrics.jsonl, loss.png, tqdm,
checkpoints, Ctrl-C / SIGTERM handling, the final sample and summary line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt import checkpoint as ckpt_lib
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import mfu as mfu_lib
from jaxgpt import optim
from jaxgpt import sharding as sharding_lib
from jaxgpt.model import loss_fn


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad out_dir, no checkpoint to resume, non-finite loss)."""


def enable_compilation_cache(path: str | os.PathLike, min_compile_time_secs: float = 1.0) -> None:
    """Keeps compiled XLA programs in `path`, so a rerun or a resumed run skips most compilation."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    compilation_cache.reset_cache()  # take the new directory even if something was compiled before


EVAL_SALT = 0x5EED  # eval batches come from a key stream apart from the training batches'


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """nanoGPT's AdamW recipe with the config's learning-rate schedule."""
    schedule = optim.lr_schedule(
        config.learning_rate,
        decay_lr=config.decay_lr,
        warmup_iters=config.warmup_iters,
        lr_decay_iters=config.lr_decay_iters,
        min_lr=config.min_lr,
    )
    return optim.adamw(
        schedule,
        weight_decay=config.weight_decay,
        beta1=config.beta1,
        beta2=config.beta2,
        grad_clip=config.grad_clip,
    )


def step_keys(base_key: jax.Array, step: jax.Array | int, grad_accum_steps: int) -> tuple[jax.Array, jax.Array]:
    """(batch keys, dropout keys) of a step's micro-batches, each of shape (grad_accum_steps, ...)."""
    keys = jax.random.split(jax.random.fold_in(base_key, step), 2 * grad_accum_steps)
    return keys[:grad_accum_steps], keys[grad_accum_steps:]


def _loss(graphdef: nnx.GraphDef, params: nnx.State, x_BT: jax.Array, y_BT: jax.Array, key, use_dropout: bool):
    model = nnx.merge(graphdef, params)
    return loss_fn(model(x_BT, key=key if use_dropout else None), y_BT)


def make_train_chunk(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    block_size: int,
    grad_accum_steps: int = 1,
    use_dropout: bool = False,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
    skip_nonfinite: bool = False,
) -> Callable:
    """The jitted `train_chunk(params, opt_state, data, base_key, step0, *, n_steps)`.

    `data` is either the whole token array on the device (batches are drawn inside, with
    `jaxgpt.data`'s gather) or a pair of pre-drawn host batches `(x, y)` of shape
    (n_steps, grad_accum_steps, batch_size, block_size). Returns (params, opt_state, metrics) with
    metrics['loss'] (n_steps,): the mean micro-batch loss of each step, computed with the parameters before
    that step's update, and metrics['finite'] (n_steps,): whether the loss and the gradients were finite.
    With `skip_nonfinite`, a step whose loss, gradients or updates are not finite changes neither the
    parameters nor the optimizer state.

    With a `mesh`, every batch is split over its ('data', 'fsdp') axes and params / opt_state keep the
    shardings of `jaxgpt.sharding.state_shardings` (`scan_layers`: the model stacks its blocks), in and out.
    """
    grad_fn = jax.value_and_grad(partial(_loss, graphdef, use_dropout=use_dropout))

    def one_step(params, opt_state, data, base_key, step, xy_ABT):
        batch_keys, drop_keys = step_keys(base_key, step, grad_accum_steps)

        def micro(grads, inputs):
            i, batch_key, drop_key = inputs
            if xy_ABT is None:
                x_BT, y_BT = data_lib.gather_batch(batch_key, data, batch_size, block_size)
            else:
                x_BT, y_BT = xy_ABT[0][i], xy_ABT[1][i]
            x_BT, y_BT = _constrain_batch(x_BT, mesh), _constrain_batch(y_BT, mesh)
            loss, g = grad_fn(params, x_BT, y_BT, drop_key)
            return (g if grads is None else jax.tree.map(jnp.add, grads, g)), loss

        if grad_accum_steps == 1:
            grads, loss = micro(None, (0, batch_keys[0], drop_keys[0]))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum_steps), batch_keys, drop_keys))
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            loss = losses.mean()
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if not skip_nonfinite:
            return new_params, new_opt_state, loss, finite
        keep_new = finite & _all_finite(updates)  # a NaN learning rate spoils the updates, not the gradients
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(keep_new, new, old),
                                         (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, loss, keep_new

    def train_chunk(params, opt_state, data, base_key, step0, *, n_steps: int):
        on_device = not isinstance(data, tuple)

        def body(carry, inputs):
            params, opt_state = carry
            i, xy = inputs
            params, opt_state, loss, finite = one_step(params, opt_state, data, base_key, step0 + i,
                                                       None if on_device else xy)
            return (params, opt_state), (loss, finite)

        xs = (jnp.arange(n_steps), None if on_device else data)
        params, opt_state = _constrain_state((params, opt_state), mesh, scan_layers)
        (params, opt_state), (losses, finite) = jax.lax.scan(body, (params, opt_state), xs)
        # Outputs sharded as the inputs were, so the donated buffers are reused.
        params, opt_state = _constrain_state((params, opt_state), mesh, scan_layers)
        return params, opt_state, {"loss": losses, "finite": finite}

    return jax.jit(train_chunk, donate_argnames=("params", "opt_state"), static_argnames=("n_steps",))


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def make_estimate_loss(graphdef: nnx.GraphDef, *, batch_size: int, block_size: int, eval_iters: int,
                       mesh: Mesh | None = None) -> Callable:
    """The jitted `estimate_loss(params, splits, keys) -> mean loss of each split` (no dropout).

    `splits` is a tuple of datasets, each the token array on the device or pre-drawn batches `(x, y)` of
    shape (eval_iters, B, T); `keys` one key per split. Each split's loss is the mean over `eval_iters`
    random batches (nanoGPT's `estimate_loss`); train and val share one compiled call. With a `mesh`,
    each batch is split over its ('data', 'fsdp') axes.
    """

    def one_split(params, data, key):
        def batch_loss(inputs):
            k, xy = inputs
            if xy is None:
                x_BT, y_BT = data_lib.gather_batch(k, data, batch_size, block_size)
            else:
                x_BT, y_BT = xy
            x_BT, y_BT = _constrain_batch(x_BT, mesh), _constrain_batch(y_BT, mesh)
            return _loss(graphdef, params, x_BT, y_BT, None, False)

        xy = data if isinstance(data, tuple) else None
        return jax.lax.map(batch_loss, (jax.random.split(key, eval_iters), xy)).mean()

    def estimate(params, splits, keys):
        return tuple(one_split(params, data, key) for data, key in zip(splits, keys))

    return jax.jit(estimate)


def _constrain_batch(x_BT: jax.Array, mesh: Mesh | None) -> jax.Array:
    return x_BT if mesh is None else sharding_lib.constrain_batch(x_BT, mesh)


def _constrain_state(tree, mesh: Mesh | None, scan_layers: bool):
    # The FSDP rule depends only on paths and shapes, so it gives the same shardings inside the trace.
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding_lib.state_shardings(tree, mesh, scan_layers))


def host_fed_batches(data: np.ndarray, keys: jax.Array, batch_size: int, block_size: int,
                     mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """`host_batches` as global arrays on the mesh, their batch axis split over ('data', 'fsdp').

    Each process reads from `data` only the rows its own devices hold (all of them, with one process);
    every process draws the same offsets from `keys`, so the global batch is the one a single process
    would build.
    """
    global_shape = (*keys.shape[:-1], batch_size, block_size)
    sharding = sharding_lib.batch_sharding(mesh, len(global_shape), batch_axis=-2)
    rows = sharding_lib.process_rows(sharding, global_shape, axis=-2)
    return tuple(sharding_lib.from_process_rows(a, sharding, global_shape)
                 for a in host_batches(data, keys, batch_size, block_size, rows=rows))


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    """The config's ('data', 'fsdp') mesh over all devices; ConfigError when it or the batch size does not fit."""
    try:
        mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    except ValueError as e:
        raise config_lib.ConfigError(f"config keys {e}") from None
    try:
        sharding_lib.check_batch_size(config.batch_size, mesh)
    except ValueError as e:
        raise config_lib.ConfigError(f"config key 'batch_size': {e}") from None
    return mesh


def step_mfu(config: ml_collections.ConfigDict, model: nnx.Module, n_devices: int,
             device_kind: str | None = None) -> Callable[[float], float | None]:
    """tokens/s -> MFU over `n_devices` chips (nanoGPT's estimate); always None when the chip's peak is unknown."""
    if mfu_lib.peak_flops(device_kind) is None:
        return lambda tokens_per_s: None
    n_params = model.num_params() if hasattr(model, "num_params") else sum(
        p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    m = config.model
    n_layer = m.n_layer if m.name == "gpt" else 0  # the bigram model has no attention
    per_token = mfu_lib.flops_per_token(n_params, n_layer, m.n_head, m.n_embd // m.n_head, m.block_size)
    return lambda tokens_per_s: mfu_lib.mfu(tokens_per_s, per_token, n_devices, device_kind)


def eval_key(base_key: jax.Array, step: int, split_index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_key, EVAL_SALT), step), split_index)


def host_batches(data: np.ndarray, keys: jax.Array, batch_size: int, block_size: int,
                 rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """The batches `gather_batch` draws with raw uint32 `keys` of shape (*lead, 2), gathered on the host from `data`.

    For datasets kept off the device (large np.memmap): the same offsets as the on-device path, so both
    paths train on the same windows. Only the batch rows `rows` are read. Returns x, y int32 of shape
    (*lead, rows, block_size).
    """
    lead = keys.shape[:-1]
    flat = jnp.reshape(keys, (-1, keys.shape[-1]))
    high = len(data) - block_size
    ix_NB = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (batch_size,), 0, high))(flat))[:, rows]
    window = ix_NB[..., None] + np.arange(block_size + 1)
    tokens = np.asarray(data[window], dtype=np.int32).reshape(*lead, ix_NB.shape[-1], block_size + 1)
    return tokens[..., :-1], tokens[..., 1:]


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


def _has_checkpoint(out_dir: pathlib.Path, which: str) -> bool:
    d = out_dir / "checkpoints" / which
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _check_out_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Checks, changing nothing, that out_dir is writable and fits `resume` / `overwrite`."""
    out_dir = pathlib.Path(config.out_dir).absolute()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"out_dir {out_dir} is not writable ({e.strerror}): choose another --config.out_dir"
        ) from None
    if config.resume and not any(_has_checkpoint(out_dir, w) for w in ckpt_lib.WHICH):
        raise TrainingError(f"resume=True but there is no checkpoint in {out_dir / 'checkpoints' / 'latest'}: "
                            "train without --config.resume first, or point --config.out_dir at a run")
    if not config.resume and not config.overwrite and any(_has_checkpoint(out_dir, w) for w in ckpt_lib.WHICH):
        raise TrainingError(f"out_dir {out_dir} already holds a run: pass --config.resume=True to continue it, "
                            "--config.overwrite=True to start afresh, or another --config.out_dir")
    return out_dir


def _clear_out_dir(out_dir: pathlib.Path) -> None:
    """A fresh run starts from an empty record: old checkpoints (overwrite=True), metrics and plot go."""
    if (out_dir / "checkpoints").exists():
        shutil.rmtree(out_dir / "checkpoints")
    for name in ("metrics.jsonl", "loss.png"):
        (out_dir / name).unlink(missing_ok=True)


def _boundaries(start: int, max_iters: int, eval_interval: int, steps_per_call: int) -> list[tuple[int, int]]:
    """Chunks [a, b) of steps: at most steps_per_call long, never crossing a multiple of eval_interval."""
    chunks, a = [], start
    while a < max_iters:
        next_eval = (a // eval_interval + 1) * eval_interval
        b = min(a + steps_per_call, next_eval, max_iters)
        chunks.append((a, b))
        a = b
    return chunks


class _Interrupt:
    """Turns SIGINT / SIGTERM into a flag the loop checks between compiled calls; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


LOCK_NAME = "jaxgpt.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a zombie has exited: it only waits for its parent to collect it
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """`out_dir/jaxgpt.lock`: one run at a time per out_dir.

    The lock file, created exclusively, holds the pid and host of the run that owns out_dir and is removed
    when the run ends (by any exception or signal Python sees). A run killed outright (SIGKILL, a crash of
    the machine) leaves it behind: the next run takes it over by itself when the recorded process is gone
    from this host; a lock of another host (a shared file system) needs `take_over=True`
    (`--config.take_over_lock=True`), since its process cannot be checked from here.
    """

    def __init__(self, out_dir: pathlib.Path, *, take_over: bool = False, log: Callable[[str], None] = print):
        self.path = pathlib.Path(out_dir) / LOCK_NAME
        self.take_over = take_over
        self.log = log
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLock:
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if not holder:  # a writer killed between create and write, unless that writer is just now writing
                    dead = time.time() - self.path.stat().st_mtime > 10 if self.path.exists() else True
                else:
                    dead = host == self.owner["host"] and isinstance(pid, int) and not _pid_alive(pid)
                who = f"pid {pid} on {host}" if holder else "an unreadable lock"
                if attempt == 0 and (dead or self.take_over):
                    why = "that process is gone" if dead else "take_over_lock=True"
                    self.log(f"warning: taking over {self.path} from {who} ({why})")
                    self.path.unlink(missing_ok=True)
                    continue  # O_EXCL again: of two runs taking over at once, one wins
                raise TrainingError(
                    f"out_dir {self.path.parent} is in use by {who} (lock file {self.path}): wait for that run or "
                    "use another --config.out_dir; if that run is dead, pass --config.take_over_lock=True"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise TrainingError(f"could not take the lock {self.path}")  # not reached

    def __exit__(self, *exc) -> None:
        holder = self._holder()
        if (holder.get("pid"), holder.get("host")) == (self.owner["pid"], self.owner["host"]):  # else: taken over
            self.path.unlink(missing_ok=True)


def _json_or_none(line: str) -> dict | None:
    """A metrics.jsonl record, or None for a blank line or the torn last line of a killed run."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and "step" in r else None


def _check_data(dataset: data_lib.Dataset, block_size: int) -> None:
    for name, arr in (("train", dataset.train), ("val", dataset.val)):
        try:
            data_lib.check_length(arr, block_size, what=f"the {name} split of {dataset.source}")
        except ValueError as e:
            raise data_lib.DataError(str(e)) from None


# With init_from, these model fields come from the checkpoint; the others (dropout, dtype, attention_impl,
# remat, scan_layers) say how to compute and stay the config's.
_INIT_ARCH_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "activation", "tie_embeddings",
                     "pos_encoding", "attention", "norm_position", "ln_eps", "param_dtype")


def _load_init_from(config: ml_collections.ConfigDict, dataset: data_lib.Dataset) -> nnx.Module:
    """The model named by `config.init_from` ('nanogpt:PATH' | 'gpt2:PATH'); sets config.model to match it.

    The dataset keeps its tokenizer, which must be the checkpoint's when both are known.
    """
    from jaxgpt.convert import load_init_from

    if config.model.name != "gpt":
        raise config_lib.ConfigError(f"config key 'init_from' needs model.name='gpt', got {config.model.name!r}")
    overrides = {k: config.model[k] for k in ("dropout", "dtype", "attention_impl", "remat", "scan_layers")}
    try:
        model, tokenizer, _ = load_init_from(config.init_from, **overrides)
    except (OSError, ValueError, ImportError) as e:
        raise config_lib.ConfigError(f"config key 'init_from'={config.init_from!r}: {e}") from None
    for k in _INIT_ARCH_FIELDS:
        config.model[k] = getattr(model.config, k)
    if dataset.vocab_size > model.config.vocab_size:
        raise config_lib.ConfigError(f"init_from {config.init_from!r} has a vocabulary of {model.config.vocab_size} "
                                     f"but the dataset needs {dataset.vocab_size}: use the data it was trained on")
    if tokenizer is not None and dataset.tokenizer is not None and tokenizer.to_dict() != dataset.tokenizer.to_dict():
        raise config_lib.ConfigError(f"init_from {config.init_from!r} was trained with another tokenizer than "
                                     f"{dataset.source}'s: its token ids would mean other text")
    if dataset.tokenizer is None:
        dataset.tokenizer = tokenizer  # e.g. GPT-2's tokenizer.json for a folder of BPE ids without meta.pkl
    return model


def train(config: ml_collections.ConfigDict, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) training as `config` says; returns a summary dict.

    Raises `ConfigError`, `DataError` or `TrainingError` with a one-line message for bad input or faults.
    The run holds out_dir's `RunLock` throughout: a second run on the same out_dir refuses to start.
    """
    from tqdm.auto import tqdm

    main = jax.process_index() == 0
    log = log or (lambda s: tqdm.write(s, file=sys.stdout))
    if not main:  # one of several processes (multi-host): process 0 speaks and writes for the run
        log = lambda s: None  # noqa: E731
    with contextlib.ExitStack() as stack:
        error = None
        try:  # every process checks (they see the same files); process 0 holds the lock
            config_lib.validate(config)
            out_dir = _check_out_dir(config)
            if main:
                stack.enter_context(RunLock(out_dir, take_over=config.take_over_lock, log=log))
        except (config_lib.ConfigError, TrainingError) as e:
            error = e
        failed = sharding_lib.first_failed_process(error is not None)
        if error is not None:
            raise error
        if failed is not None:
            raise TrainingError(f"process {failed} of this run stopped before training: see its error")
        return _train(config, out_dir, log)


def _train(config: ml_collections.ConfigDict, out_dir: pathlib.Path, log: Callable[[str], None]) -> dict[str, Any]:
    """`train` itself, run while holding out_dir's lock."""
    from tqdm.auto import tqdm

    if config.compile_cache and not jax.config.jax_compilation_cache_dir:
        enable_compilation_cache(data_lib.cache_dir() / "xla")
    dataset = data_lib.load_dataset(config.data.path or None, config.data.train_fraction)
    init_model = None
    if config.init_from:
        config = config.copy_and_resolve_references()  # the model's fields are about to come from elsewhere
        if config.resume:  # the run's own checkpoint says what the model is
            reader = ckpt_lib.Checkpointer(out_dir, read_only=True)
            try:
                which, saved_step = reader.find_usable(warn=lambda m: None)  # resume below warns
                saved_model = config_lib.from_dict(reader.restore_meta(which, saved_step)["config"]).model
            except ckpt_lib.CheckpointError as e:
                raise TrainingError(f"resume: {e}") from None
            finally:
                reader.close()
            for k in _INIT_ARCH_FIELDS:
                config.model[k] = saved_model[k]
        else:
            init_model = _load_init_from(config, dataset)
    block_size = config.model.block_size  # init_from's, when given
    _check_data(dataset, block_size)
    vocab_size = config.model.vocab_size or dataset.vocab_size
    if vocab_size < dataset.vocab_size:
        raise config_lib.ConfigError(
            f"config key 'model.vocab_size'={vocab_size} is smaller than the dataset's vocabulary "
            f"({dataset.vocab_size})"
        )
    mesh = mesh_from_config(config)
    main = jax.process_index() == 0  # with several processes, process 0 alone writes the run's files
    if not config.resume and main:
        _clear_out_dir(out_dir)  # every check has passed: only now is anything removed
    sharding_lib.sync_processes("jaxgpt: out_dir ready")

    model = init_model or config_lib.build_model(config, vocab_size, nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(config)
    opt_state = tx.init(params)
    # Replicated (fsdp=1) or FSDP-split; a restore below reads the checkpoint straight into these shardings.
    scan_layers = config.model.scan_layers
    params = sharding_lib.shard_params(params, mesh, scan_layers)
    opt_state = sharding_lib.shard_params(opt_state, mesh, scan_layers)
    replicated = NamedSharding(mesh, PartitionSpec())
    base_key = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), replicated)
    step, best_val = 0, math.inf
    ckptr = ckpt_lib.Checkpointer(out_dir)
    history: list[dict] = []
    metrics_path = out_dir / "metrics.jsonl"
    skipped = 0  # steps skipped for a non-finite loss or gradient (skip_nonfinite)
    if config.resume:
        try:  # the newest whole checkpoint: a corrupt or half-written one is passed over with a warning
            which, saved_step = _find_usable(ckptr, main, log)
            saved = config_lib.from_dict(ckptr.restore_meta(which, saved_step)["config"])
            for k, v in saved.model.items():
                if k != "vocab_size" and config.model[k] != v:
                    raise TrainingError(f"resume: the checkpoint has model.{k}={v!r} but the config says "
                                        f"{config.model[k]!r}; drop the override or use another out_dir")
            restored = ckptr.restore(which, step=saved_step, params=params, opt_state=opt_state, key=base_key)
        except ckpt_lib.CheckpointError as e:
            ckptr.close()
            raise TrainingError(f"resume: {e}") from None
        except BaseException:
            ckptr.close()
            raise
        params, opt_state = restored["params"], restored["opt_state"]
        step, base_key = int(restored["train"]["step"]), restored["train"]["key"]
        best_val = restored["meta"].get("best_val_loss") or math.inf
        skipped = int(restored["meta"].get("skipped_nonfinite") or 0)
        if metrics_path.exists():
            history = [r for r in map(_json_or_none, metrics_path.read_text().splitlines()) if r is not None]
            # Steps from `step` on are redone: their records go (the evaluation at `step` itself stays).
            history = [r for r in history if r["step"] < step or (r["step"] == step and "val_loss" in r)]
            if main:
                metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        log(f"resumed from {ckptr.step_dir(which, saved_step)} at step {step} (best val loss {best_val:.4f})")

    n_params = sum(p.size for p in jax.tree.leaves(params))
    tokens_per_step = config.batch_size * block_size * config.grad_accum_steps
    log(f"{config.model.name}: {n_params / 1e6:.2f}M parameters, vocab {vocab_size}, {len(dataset.train):,} train / "
        f"{len(dataset.val):,} val tokens from {dataset.source}; {tokens_per_step:,} tokens per step")
    if mesh.size > 1:
        log(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} over {mesh.size} "
            f"{jax.devices()[0].device_kind} devices")
    mfu_of = step_mfu(config, nnx.merge(graphdef, params), mesh.size)

    on_device = config.data.on_device
    # Replicated: the batches are drawn inside the step, on every device.
    train_data = jax.device_put(np.asarray(dataset.train, np.int32), replicated) if on_device else dataset.train
    val_data = jax.device_put(np.asarray(dataset.val, np.int32), replicated) if on_device else dataset.val
    train_chunk = make_train_chunk(graphdef, tx, batch_size=config.batch_size, block_size=block_size,
                                   grad_accum_steps=config.grad_accum_steps,
                                   use_dropout=config.model.dropout > 0 and config.model.name == "gpt",
                                   mesh=mesh, scan_layers=scan_layers, skip_nonfinite=config.skip_nonfinite)
    estimate = make_estimate_loss(graphdef, batch_size=config.batch_size, block_size=block_size,
                                  eval_iters=config.eval_iters, mesh=mesh)
    schedule = optim.lr_schedule(config.learning_rate, decay_lr=config.decay_lr, warmup_iters=config.warmup_iters,
                                 lr_decay_iters=config.lr_decay_iters, min_lr=config.min_lr)
    meta_base = {"config": config_lib.to_dict(config), "vocab_size": vocab_size,
                 "tokenizer": dataset.tokenizer.to_dict() if dataset.tokenizer else None}

    def record(r: dict) -> None:
        history.append(r)
        if not main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    def save(which: str) -> None:
        try:
            ckptr.save(which, step, params=params, opt_state=opt_state, key=base_key,
                       meta=dict(meta_base, best_val_loss=None if math.isinf(best_val) else best_val,
                                 skipped_nonfinite=skipped))
        except ckpt_lib.CheckpointError as e:  # e.g. a full disk: the previous checkpoint is intact
            raise TrainingError(str(e)) from None

    def evaluate() -> dict:
        keys = (eval_key(base_key, step, 0), eval_key(base_key, step, 1))
        splits = (train_data, val_data)
        if not on_device:
            splits = tuple(host_fed_batches(d, jax.random.split(k, config.eval_iters), config.batch_size, block_size,
                                            mesh) for d, k in zip(splits, keys))
        return dict(zip(("train", "val"), map(float, estimate(params, splits, keys))))

    def do_eval() -> None:
        nonlocal best_val
        losses = evaluate()
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"non-finite eval loss at step {step} (train {losses['train']}, val {losses['val']}): "
                                f"training stopped; the last good checkpoint is kept in {out_dir / 'checkpoints'}")
        record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "time": time.time() - t0})
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            + (" (best)" if improved else ""))
        if step > 0:
            if improved:
                save("best")
            if improved or config.always_save_checkpoint:
                save("latest")
        if config.plot and main:
            from jaxgpt.plotting import plot_losses

            title = f"{config.model.name} on {pathlib.Path(dataset.source).name}"
            plot_losses(history, out_dir / "loss.png", title=title)

    t0 = time.time()
    train_time, train_steps, interrupted = 0.0, 0, None
    start_step = step
    if config.eval_only:
        do_eval()
        ckptr.close()
        return {"step": step, "best_val_loss": best_val, "wall_time": time.time() - t0, "tokens_per_s": 0.0}
    bar = tqdm(total=config.max_iters, initial=step, disable=not (config.progress and main), dynamic_ncols=True,
               file=sys.stderr, desc="train")
    try:
        with _Interrupt() as interrupt:
            if step % config.eval_interval == 0 and step not in {r["step"] for r in history if "val_loss" in r}:
                do_eval()
            for a, b in _boundaries(step, config.max_iters, config.eval_interval, config.steps_per_call):
                if interrupt.signum is not None:
                    interrupted = interrupt.signum
                    break
                t_call = time.perf_counter()
                data = train_data
                if not on_device:
                    keys = jax.vmap(lambda s: step_keys(base_key, s, config.grad_accum_steps)[0])(jnp.arange(a, b))
                    data = host_fed_batches(train_data, keys, config.batch_size, block_size, mesh)
                params, opt_state, metrics = train_chunk(params, opt_state, data, base_key, jnp.int32(a), n_steps=b - a)
                losses = np.asarray(metrics["loss"])  # the one host sync per chunk
                dt = time.perf_counter() - t_call
                if a > start_step or not train_steps:  # the first call also compiles: replaced once others ran
                    train_time, train_steps = (train_time, train_steps) if a > start_step else (0.0, 0)
                    train_time += dt
                    train_steps += b - a
                finite = np.asarray(metrics["finite"])
                bad = np.flatnonzero(~finite)
                if bad.size and not config.skip_nonfinite:
                    last = ckptr.latest_step("latest")
                    kept = "no checkpoint yet" if last is None else f"the last good checkpoint (step {last}) is kept"
                    what = (f"loss is {losses[bad[0]]}" if not np.isfinite(losses[bad[0]])
                            else f"a gradient is not finite (loss {losses[bad[0]]:.4f})")
                    raise TrainingError(f"{what} at step {a + int(bad[0])}: training stopped; {kept} in "
                                        f"{out_dir / 'checkpoints' / 'latest'} (--config.skip_nonfinite=True skips "
                                        "such steps)")
                for i in bad:
                    log(f"step {a + int(i)}: non-finite loss or gradient (loss {losses[i]}): update skipped")
                step = b
                ms = 1000 * dt / (b - a)
                tok_s = tokens_per_step / (ms / 1000)
                chunk_mfu = mfu_of(tok_s)
                extra = {} if chunk_mfu is None else {"mfu": chunk_mfu}
                for s in range(a, b):
                    skipped += int(not finite[s - a])
                    if s % config.log_interval == 0:
                        r = {"step": s, "loss": float(losses[s - a]), "lr": float(schedule(s)), "ms_per_step": ms,
                             "tokens_per_s": tok_s, **extra}
                        if config.skip_nonfinite:
                            r["skipped_nonfinite"] = skipped  # so far, this step included
                            if not finite[s - a]:
                                del r["loss"]  # NaN is not JSON; the count says what happened
                        record(r)
                bar.update(b - a)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}", ms_step=f"{ms:.1f}",
                                **({} if chunk_mfu is None else {"mfu": f"{chunk_mfu:.1%}"}))
                if step % config.eval_interval == 0 or step == config.max_iters:
                    do_eval()
            else:
                interrupted = interrupt.signum
            save("latest")  # at the end, or on Ctrl-C / SIGTERM: between calls, so the state is whole
            if interrupted is not None:
                log(f"interrupted ({signal.Signals(interrupted).name}) at step {step}: checkpoint saved in "
                    f"{out_dir / 'checkpoints' / 'latest'}; continue with --config.resume=True")
    finally:
        bar.close()
        ckptr.close()
    wall = time.time() - t0
    tokens_per_s = train_steps * tokens_per_step / train_time if train_time > 0 else 0.0
    summary = {"step": step, "best_val_loss": best_val, "wall_time": wall, "tokens_per_s": tokens_per_s,
               "interrupted": interrupted is not None, "skipped_nonfinite": skipped}
    if interrupted is None and config.sample_tokens > 0:
        if jax.process_count() > 1:  # every process takes part in gathering the weights; process 0 samples
            from jax.experimental import multihost_utils

            params = jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])
        if main:
            model = nnx.merge(graphdef, params)
            summary["sample"] = _sample_text(model, dataset.tokenizer, config.sample_tokens, config.seed)
            log("-" * 40 + "\n" + summary["sample"] + "\n" + "-" * 40)
    log(f"done: step {step}, best val loss {best_val:.4f}, wall time {wall:.1f} s, {tokens_per_s:,.0f} tokens/s "
        f"(train steps)")
    return summary


def _find_usable(ckptr: ckpt_lib.Checkpointer, main: bool, log: Callable[[str], None]) -> tuple[str, int]:
    """The checkpoint to resume from. Process 0 looks first and moves unusable steps aside; the others
    then look at what it left (with one process, just the first part)."""
    error = None
    if main:
        try:
            found = ckptr.find_usable(warn=lambda m: log(f"warning: {m}"), quarantine=True)
        except ckpt_lib.CheckpointError as e:
            error = e
    failed = sharding_lib.first_failed_process(error is not None)
    if error is not None:
        raise error
    if failed is not None:
        raise ckpt_lib.CheckpointError(f"process {failed} of this run found no usable checkpoint: see its error")
    if not main:
        ckptr.reload()
        found = ckptr.find_usable(warn=lambda m: None)
    return found


def _sample_text(model: nnx.Module, tokenizer, n_tokens: int, seed: int) -> str:
    """A sample from the trained model, starting from a newline (nanoGPT's default prompt) or token 0."""
    from jaxgpt.sampling import generate

    has_newline = tokenizer is not None and "\n" in getattr(tokenizer, "stoi", {})
    start = tokenizer.encode("\n") if has_newline else np.zeros(1, np.int32)
    ids = generate(model, start[None, :], n_tokens, key=jax.random.PRNGKey(seed))[0]
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids.tolist()))
