"""Training: `train(config)` checks the config, the data and out_dir, builds or restores the state, and hands it to
the loop of `jaxgpt.train_loop`.

Nothing is created or removed until every check has passed; `init_from` and `resume` decide the model's
architecture before anything is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt import checkpoint as ckpt_lib
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import optim
from jaxgpt import run_dir as run_dir_lib
from jaxgpt import sharding as sharding_lib
from jaxgpt.model import count_params
from jaxgpt.run_dir import Interrupt, RunLock, TrainingError, check_out_dir, prepare_out_dir
from jaxgpt.train_loop import Metrics, TrainLoop, TrainState, run_training
from jaxgpt.train_step import seed_keys


def enable_compilation_cache(path: str | os.PathLike, min_compile_time_secs: float = 1.0) -> None:
    """Keeps compiled XLA programs in `path`, so a rerun or a resumed run skips most compilation."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    compilation_cache.reset_cache()  # take the new directory even if something was compiled before


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


# Before the first step: what the model is, and where the run starts


def _load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    return data_lib.load_dataset(config.data.path or None, config.data.train_fraction)


def _check_data(dataset: data_lib.Dataset, block_size: int) -> None:
    for name, arr in (("train", dataset.train), ("val", dataset.val)):
        try:
            data_lib.check_length(arr, block_size, what=f"the {name} split of {dataset.source}")
        except ValueError as e:
            raise data_lib.DataError(str(e)) from None


def _saved_model_config(out_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """The model section of the newest usable checkpoint's config (resume with init_from)."""
    reader = ckpt_lib.Checkpointer(out_dir, read_only=True)
    try:
        which, saved_step = reader.find_usable(warn=lambda m: None)  # resume warns later
        return config_lib.from_dict(reader.restore_meta(which, saved_step)["config"]).model
    except ckpt_lib.CheckpointError as e:
        raise TrainingError(f"resume: {e}") from None
    finally:
        reader.close()


def _load_init_from(config: ml_collections.ConfigDict, dataset: data_lib.Dataset):
    """The model named by `config.init_from` ('nanogpt:PATH' | 'gpt2:PATH') and its tokenizer, checked against
    the dataset (its tokenizer, when both are known, must be the checkpoint's)."""
    from jaxgpt.convert import InitFromError, load_init_from

    if config.model.name != "gpt":
        raise config_lib.ConfigError(f"config key 'init_from' needs model.name='gpt', got {config.model.name!r}")
    overrides = {k: config.model[k] for k in config_lib.COMPUTE_FIELDS}
    try:
        model, tokenizer, _ = load_init_from(config.init_from, **overrides)
    except InitFromError as e:
        raise config_lib.ConfigError(f"config key 'init_from'={e.spec!r}: {e.reason}") from None
    if dataset.vocab_size > model.config.vocab_size:
        raise config_lib.ConfigError(f"init_from {config.init_from!r} has a vocabulary of {model.config.vocab_size} "
                                     f"but the dataset needs {dataset.vocab_size}: use the data it was trained on")
    if tokenizer is not None and dataset.tokenizer is not None and tokenizer.to_dict() != dataset.tokenizer.to_dict():
        raise config_lib.ConfigError(f"init_from {config.init_from!r} was trained with another tokenizer than "
                                     f"{dataset.source}'s: its token ids would mean other text")
    return model, tokenizer


def _resolve(config: ml_collections.ConfigDict, out_dir: pathlib.Path, dataset: data_lib.Dataset):
    """(config, dataset, model or None): with init_from, the model's architecture comes from the run's own
    checkpoint (resume) or from init_from's (new config), and a dataset without a tokenizer takes its."""
    if not config.init_from:
        return config, dataset, None
    if config.resume:
        return config_lib.with_model_arch(config, _saved_model_config(out_dir)), dataset, None
    model, tokenizer = _load_init_from(config, dataset)
    if dataset.tokenizer is None:  # e.g. GPT-2's tokenizer.json for a folder of BPE ids without meta.pkl
        dataset = dataclasses.replace(dataset, tokenizer=tokenizer)
    return config_lib.with_model_arch(config, model.config), dataset, model


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


def _restore(ckptr: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict, state: TrainState, main: bool,
             log: Callable[[str], None]) -> TrainState:
    """The state of the newest whole checkpoint, read into `state`'s structure and shardings."""
    try:  # a corrupt or half-written checkpoint is passed over with a warning
        which, saved_step = _find_usable(ckptr, main, log)
        saved = config_lib.from_dict(ckptr.restore_meta(which, saved_step)["config"])
        for k, v in saved.model.items():
            if k != "vocab_size" and config.model[k] != v:
                raise TrainingError(f"resume: the checkpoint has model.{k}={v!r} but the config says "
                                    f"{config.model[k]!r}; drop the override or use another out_dir")
        if saved.get("optimizer", "adamw") != config.optimizer:  # older checkpoints predate the key: AdamW
            raise TrainingError(f"resume: the checkpoint holds optimizer={saved.get('optimizer', 'adamw')!r}'s state "
                                f"but the config says {config.optimizer!r}; drop the override or use another out_dir")
        restored = ckptr.restore(which, step=saved_step, params=state.params, opt_state=state.opt_state,
                                 key=state.key)
    except ckpt_lib.CheckpointError as e:
        raise TrainingError(f"resume: {e}") from None
    meta = restored["meta"]
    log(f"resumed from {ckptr.step_dir(which, saved_step)} at step {restored['train']['step']} "
        f"(best val loss {meta.get('best_val_loss') or math.inf:.4f})")
    return TrainState(params=restored["params"], opt_state=restored["opt_state"], key=restored["train"]["key"],
                      step=int(restored["train"]["step"]), best_val=meta.get("best_val_loss") or math.inf,
                      skipped=int(meta.get("skipped_nonfinite") or 0))


def train(config: ml_collections.ConfigDict, *, log: Callable[[str], None] | None = None,
          interrupt: Interrupt | None = None) -> dict[str, Any]:
    """Runs (or resumes) training as `config` says; returns a summary dict.

    Raises `ConfigError`, `DataError` or `TrainingError` with a one-line message for bad input or faults;
    nothing is created or removed until the config, the data and out_dir have been checked. The run holds
    out_dir's `RunLock` throughout: a second run on the same out_dir refuses to start. Ctrl-C / SIGTERM are
    `interrupt`'s (train.py's, entered before its imports; else one of this call's own): stopping before the
    first step raises `run_dir.Interrupted` and leaves no empty checkpoint folders and no lock.
    """
    from tqdm.auto import tqdm

    cpu_note = sharding_lib.use_cpu_devices(config.mesh.get("cpu_devices", 0))  # before JAX's first computation
    main = jax.process_index() == 0
    log = log or (lambda s: tqdm.write(s, file=sys.stdout))
    if not main:  # one of several processes (multi-host): process 0 speaks and writes for the run
        log = lambda s: None  # noqa: E731
    with contextlib.ExitStack() as stack:
        if interrupt is None:
            interrupt = stack.enter_context(Interrupt())
        interrupt.log, interrupt.stopping = log, "stopping before training starts; nothing is saved"
        error = None
        try:  # every process checks (they see the same files); process 0 holds the lock
            _stop_if_interrupted(interrupt)
            config_lib.validate(config)
            out_dir = check_out_dir(config.out_dir, resume=config.resume, overwrite=config.overwrite)
            dataset = _load_data(config)
            config, dataset, init_model = _resolve(config, out_dir, dataset)
            _check_data(dataset, config.model.block_size)
            if (config.model.vocab_size or dataset.vocab_size) < dataset.vocab_size:
                raise config_lib.ConfigError(f"config key 'model.vocab_size'={config.model.vocab_size} is smaller "
                                             f"than the dataset's vocabulary ({dataset.vocab_size})")
            mesh = mesh_from_config(config)
            _stop_if_interrupted(interrupt)  # before anything is written
            if main:
                prepare_out_dir(out_dir, fresh=False)
                lock = stack.enter_context(RunLock(out_dir, take_over=config.take_over_lock, log=log))
                interrupt.on_quit = partial(run_dir_lib.quit_at_once, out_dir, lock)
                # Every check has passed: only now is anything removed.
                prepare_out_dir(out_dir, fresh=not config.resume)
        except (config_lib.ConfigError, data_lib.DataError, TrainingError) as e:
            error = e
        failed = sharding_lib.first_failed_process(error is not None)
        if error is not None:
            raise error
        if failed is not None:
            raise TrainingError(f"process {failed} of this run stopped before training: see its error")
        sharding_lib.sync_processes("jaxgpt: out_dir ready")
        if cpu_note:
            log(f"note: {cpu_note}")
        log(f"data: {len(dataset.train):,} train / {len(dataset.val):,} val tokens from {dataset.source}")
        if config.matmul_precision:
            stack.enter_context(jax.default_matmul_precision(config.matmul_precision))
        try:
            return _train(config, out_dir, dataset, init_model, mesh, log, interrupt)
        except run_dir_lib.Interrupted:
            if main:
                run_dir_lib.remove_empty_checkpoint_dirs(out_dir)
            raise


def _stop_if_interrupted(interrupt: Interrupt) -> None:
    if interrupt.signum is not None:
        raise run_dir_lib.Interrupted(f"interrupted ({signal.Signals(interrupt.signum).name}) before training "
                                      "started: nothing was written")


def _train(config: ml_collections.ConfigDict, out_dir: pathlib.Path, dataset: data_lib.Dataset,
           init_model: nnx.Module | None, mesh: Mesh, log: Callable[[str], None],
           interrupt: Interrupt) -> dict[str, Any]:
    """`train` itself, run while holding out_dir's lock: builds (or restores) the state, then runs the loop."""
    if config.compile_cache and not jax.config.jax_compilation_cache_dir:
        enable_compilation_cache(data_lib.cache_dir() / "xla", min_compile_time_secs=0.0)
    main = jax.process_index() == 0
    vocab_size = config.model.vocab_size or dataset.vocab_size
    scan_layers = config.model.scan_layers
    seed_key, run_key = seed_keys(config.seed)
    graphdef, params = nnx.split(init_model or config_lib.build_model(config, vocab_size, seed_key))
    # Replicated (fsdp=1) or FSDP-split; a restore reads the checkpoint straight into these shardings.
    params = sharding_lib.shard_params(params, mesh, scan_layers)
    # AdamW's state starts as zeros (moments and step counts): made on the host from its shapes, nothing to compile.
    opt_shapes = jax.eval_shape(optim.make_optimizer(config).init, params)
    opt_state = sharding_lib.zeros(sharding_lib.sharded_shapes(opt_shapes, mesh, scan_layers))
    state = TrainState(params, opt_state, key=jax.device_put(run_key, NamedSharding(mesh, PartitionSpec())))
    ckptr = ckpt_lib.Checkpointer(out_dir)
    try:
        metrics = Metrics(out_dir / "metrics.jsonl", write=main)
        if config.resume:
            state = _restore(ckptr, config, state, main, log)
            metrics.keep_before(state.step)
        tokens_per_step = config.batch_size * config.model.block_size * config.grad_accum_steps
        log(f"{config.model.name}: {count_params(state.params) / 1e6:.2f}M parameters, vocab {vocab_size}, "
            f"{tokens_per_step:,} tokens per step")
        if mesh.size > 1:
            log(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} over {mesh.size} "
                f"{jax.devices()[0].device_kind} devices")
        loop = TrainLoop(config, out_dir, dataset, graphdef, mesh, ckptr, metrics, state, seed_key, log)
        return run_training(loop, interrupt)
    finally:
        ckptr.close()
