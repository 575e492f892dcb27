"""Training: `train(config)`, the loop around the jitted step of `jaxgpt.train_step`.

The loop is the only place with I/O: it checks the config, data and out_dir before touching anything,
restores a checkpoint to resume, calls the compiled step in chunks that end at each evaluation, writes
metrics.jsonl, loss.png and checkpoints, shows a progress bar, stops cleanly on Ctrl-C / SIGTERM, and
ends with a sample and a summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt import checkpoint as ckpt_lib
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import mfu as mfu_lib
from jaxgpt import optim
from jaxgpt import run_dir as run_dir_lib
from jaxgpt import sharding as sharding_lib
from jaxgpt.model import count_params
from jaxgpt.run_dir import LOCK_NAME, Interrupt, RunLock, TrainingError, check_out_dir, prepare_out_dir, read_metrics
from jaxgpt.train_step import (
    batch_offsets,
    eval_key,
    host_batches,
    host_fed_batches,
    in_background,
    make_estimate_loss,
    make_train_chunk,
    seed_keys,
    step_keys,
    step_offsets,
)

__all__ = ["LOCK_NAME", "RunLock", "TrainingError", "enable_compilation_cache", "eval_key", "host_batches",
           "make_estimate_loss", "make_optimizer", "make_train_chunk", "mesh_from_config", "step_keys", "step_mfu",
           "train"]

make_optimizer = optim.make_optimizer


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


def step_mfu(config: ml_collections.ConfigDict, model: nnx.Module, n_devices: int,
             device_kind: str | None = None) -> Callable[[float], float | None]:
    """tokens/s -> MFU over `n_devices` chips (nanoGPT's estimate); always None when the chip's peak is unknown."""
    if mfu_lib.peak_flops(device_kind) is None:
        return lambda tokens_per_s: None
    n_params = model.num_params() if hasattr(model, "num_params") else count_params(nnx.state(model, nnx.Param))
    m = config.model
    n_layer = m.n_layer if m.name == "gpt" else 0  # the bigram model has no attention
    per_token = mfu_lib.flops_per_token(n_params, n_layer, m.n_head, m.n_embd // m.n_head, m.block_size)
    return lambda tokens_per_s: mfu_lib.mfu(tokens_per_s, per_token, n_devices, device_kind)


def chunk_boundaries(start: int, max_iters: int, eval_interval: int, steps_per_call: int,
                     first_call: int | None = None) -> list[tuple[int, int]]:
    """Chunks [a, b) of steps: at most steps_per_call long (the first at most `first_call`, so progress shows
    early), never crossing a multiple of eval_interval."""
    chunks, a = [], start
    while a < max_iters:
        next_eval = (a // eval_interval + 1) * eval_interval
        longest = steps_per_call if chunks or first_call is None else min(first_call, steps_per_call)
        b = min(a + longest, next_eval, max_iters)
        chunks.append((a, b))
        a = b
    return chunks


FIRST_CALL_STEPS = 8  # the first compiled call of a run trains this many steps at most


# ---------------------------------------------------------------------------------------------------
# Before the first step: what the model is, and where the run starts
# ---------------------------------------------------------------------------------------------------


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
    from jaxgpt.convert import load_init_from

    if config.model.name != "gpt":
        raise config_lib.ConfigError(f"config key 'init_from' needs model.name='gpt', got {config.model.name!r}")
    overrides = {k: config.model[k] for k in ("dropout", "dtype", "attention_impl", "remat", "scan_layers")}
    try:
        model, tokenizer, _ = load_init_from(config.init_from, **overrides)
    except (OSError, ValueError, ImportError) as e:
        raise config_lib.ConfigError(f"config key 'init_from'={config.init_from!r}: {e}") from None
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


def _restore(ckptr: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict, state: dict, main: bool,
             log: Callable[[str], None]) -> dict:
    """`state` (params, opt_state, key, step, best_val, skipped) from the newest whole checkpoint."""
    try:  # a corrupt or half-written checkpoint is passed over with a warning
        which, saved_step = _find_usable(ckptr, main, log)
        saved = config_lib.from_dict(ckptr.restore_meta(which, saved_step)["config"])
        for k, v in saved.model.items():
            if k != "vocab_size" and config.model[k] != v:
                raise TrainingError(f"resume: the checkpoint has model.{k}={v!r} but the config says "
                                    f"{config.model[k]!r}; drop the override or use another out_dir")
        restored = ckptr.restore(which, step=saved_step, params=state["params"], opt_state=state["opt_state"],
                                 key=state["key"])
    except ckpt_lib.CheckpointError as e:
        raise TrainingError(f"resume: {e}") from None
    meta = restored["meta"]
    log(f"resumed from {ckptr.step_dir(which, saved_step)} at step {restored['train']['step']} "
        f"(best val loss {meta.get('best_val_loss') or math.inf:.4f})")
    return dict(params=restored["params"], opt_state=restored["opt_state"], key=restored["train"]["key"],
                step=int(restored["train"]["step"]), best_val=meta.get("best_val_loss") or math.inf,
                skipped=int(meta.get("skipped_nonfinite") or 0))


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


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
    """`train` itself, run while holding out_dir's lock."""
    from tqdm.auto import tqdm

    if config.compile_cache and not jax.config.jax_compilation_cache_dir:
        enable_compilation_cache(data_lib.cache_dir() / "xla", min_compile_time_secs=0.0)
    main = jax.process_index() == 0
    block_size = config.model.block_size
    vocab_size = config.model.vocab_size or dataset.vocab_size
    tx = optim.make_optimizer(config)
    scan_layers = config.model.scan_layers
    replicated = NamedSharding(mesh, PartitionSpec())
    # The shapes first: the training step and the evaluation compile from them (in threads) while the initial weights
    # are drawn.
    graphdef, shapes = nnx.split(init_model or config_lib.model_shape(config, vocab_size))
    key_shape = jax.eval_shape(lambda: seed_keys(config.seed))[1]
    s = dict(params=sharding_lib.sharded_shapes(shapes, mesh, scan_layers),
             opt_state=sharding_lib.sharded_shapes(jax.eval_shape(tx.init, shapes), mesh, scan_layers),
             key=jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=replicated),  # drawn below
             step=0, best_val=math.inf, skipped=0)
    ckptr = ckpt_lib.Checkpointer(out_dir)
    metrics = _Metrics(out_dir / "metrics.jsonl", write=main)
    run = _Run(config, out_dir, dataset, graphdef, mesh, ckptr, metrics, s, log)
    if run.on_device and config.max_iters > 0 and not config.eval_only:  # one program for any chunk and start
        run.train_chunk.prepare(s["params"], s["opt_state"], run.train_data, s["key"], np.int32(0),
                                n_steps=config.steps_per_call)
        run.estimate.prepare(s["params"], (run.train_data, run.val_data), s["key"], np.int32(0))
    seed_key, run_key = seed_keys(config.seed)
    s["key"] = jax.device_put(run_key, replicated)  # every step's keys' root
    run.seed_key = seed_key
    # Only the weights are taken from the model built: the compiled programs keep the graphdef of the shapes. (What a
    # graphdef holds varies across Flax versions: 0.12.0 keeps each layer's initialiser in it.)
    params = nnx.state(init_model or config_lib.build_model(config, vocab_size, seed_key))
    _check_like(params, shapes)
    # Replicated (fsdp=1) or FSDP-split; a restore reads the checkpoint straight into these shardings.
    s["params"] = sharding_lib.shard_params(params, mesh, scan_layers)
    # AdamW's state starts as zeros (moments and step counts): made on the host from its shapes, nothing to compile.
    s["opt_state"] = sharding_lib.zeros(s["opt_state"])
    try:
        if config.resume:
            s.update(_restore(ckptr, config, s, main, log))
            metrics.keep_before(s["step"])
        first_step, skipped_before = s["step"], s["skipped"]
        tokens_per_step = config.batch_size * block_size * config.grad_accum_steps
        log(f"{config.model.name}: {count_params(s['params']) / 1e6:.2f}M parameters, vocab {vocab_size}, "
            f"{tokens_per_step:,} tokens per step")
        if mesh.size > 1:
            log(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} over {mesh.size} "
                f"{jax.devices()[0].device_kind} devices")
        if config.eval_only:
            run.evaluate()
            return {"step": s["step"], "best_val_loss": s["best_val"], "wall_time": time.time() - run.t0,
                    "tokens_per_s": 0.0}
        bar = tqdm(total=config.max_iters, initial=s["step"], disable=not (config.progress and main),
                   dynamic_ncols=True, file=sys.stderr, desc="train")
        interrupt.call_seconds = run.call_seconds
        with contextlib.closing(bar):
            interrupted = run.loop(bar, interrupt)
        # While loss.png is drawn and the checkpoints are written, in threads.
        sample = run.final_sample() if interrupted is None else None
    finally:
        interrupt.call_seconds = lambda: None  # train.py's interrupt outlives the run: it keeps no reference to it
        run.wait_for_background()
        ckptr.close()
    if s["step"] > first_step and s["skipped"] - skipped_before == s["step"] - first_step:
        raise TrainingError(f"all {s['step'] - first_step} steps of this run were skipped as non-finite "
                            "(skip_nonfinite): the model learned nothing; check the data and lower learning_rate")
    summary = {"step": s["step"], "best_val_loss": s["best_val"], "wall_time": time.time() - run.t0,
               "tokens_per_s": run.tokens_per_s(), "interrupted": interrupted is not None,
               "skipped_nonfinite": s["skipped"]}
    if sample is not None:
        summary["sample"] = sample
        log("-" * 40 + "\n" + sample + "\n" + "-" * 40)
    log(f"done: step {s['step']}, best val loss {s['best_val']:.4f}, wall time {summary['wall_time']:.1f} s, "
        f"{summary['tokens_per_s']:,.0f} tokens/s (train steps)")
    return summary


def _check_like(params: Any, shapes: Any) -> None:
    """The compiled step's premise: the weights built have the structure, shapes and dtypes they compiled from."""
    same = jax.tree.structure(params) == jax.tree.structure(shapes) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)))
    assert same, "the model built differs from its shapes"  # noqa: S101


class _Metrics:
    """The run's records: in memory for the plot, appended to metrics.jsonl by process 0."""

    def __init__(self, path: pathlib.Path, *, write: bool):
        self.path, self.write = path, write
        self.history: list[dict] = read_metrics(path)

    def keep_before(self, step: int) -> None:
        """On resume: steps from `step` on are redone, so their records go (the evaluation at `step` stays)."""
        self.history = [r for r in self.history if r["step"] < step or (r["step"] == step and "val_loss" in r)]
        if self.write:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def evaluated(self, step: int) -> bool:
        return any(r["step"] == step and "val_loss" in r for r in self.history)

    def record(self, r: dict) -> None:
        self.history.append(r)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(r) + "\n")


class _Run:
    """The loop's state and its three actions: train a chunk, evaluate, save."""

    def __init__(self, config, out_dir, dataset, graphdef, mesh, ckptr, metrics, state, log):
        self.config, self.out_dir, self.dataset, self.mesh, self.graphdef = config, out_dir, dataset, mesh, graphdef
        self.ckptr, self.metrics, self.s, self.log = ckptr, metrics, state, log
        self.main = jax.process_index() == 0
        c, block_size = config, config.model.block_size
        self.on_device = c.data.on_device
        replicated = NamedSharding(mesh, PartitionSpec())
        # Replicated: the batches are drawn inside the step, on every device.
        put = lambda a: jax.device_put(np.asarray(a, np.int32), replicated) if self.on_device else a  # noqa: E731
        self.train_data, self.val_data = put(dataset.train), put(dataset.val)
        # The optimizer's numbers are the program's arguments: a rerun with another learning rate compiles nothing.
        self.train_chunk = make_train_chunk(
            graphdef, partial(optim.make_optimizer, c), batch_size=c.batch_size, block_size=block_size,
            grad_accum_steps=c.grad_accum_steps, use_dropout=c.model.dropout > 0 and c.model.name == "gpt", mesh=mesh,
            scan_layers=c.model.scan_layers, skip_nonfinite=c.skip_nonfinite,
            max_steps=c.steps_per_call if self.on_device else None,
            lr_schedule=partial(optim.schedule_from_config, c), numbers=optim.recipe_numbers(c))
        self.estimate = make_estimate_loss(graphdef, batch_size=c.batch_size, block_size=block_size,
                                           eval_iters=c.eval_iters, mesh=mesh)
        self.mfu_of = step_mfu(c, nnx.merge(graphdef, state["params"]), mesh.size)
        self.meta = {"config": config_lib.to_dict(c), "vocab_size": c.model.vocab_size or dataset.vocab_size,
                     "tokenizer": dataset.tokenizer.to_dict() if dataset.tokenizer else None}
        self.tokens_per_step = c.batch_size * block_size * c.grad_accum_steps
        self.t0 = time.time()
        self.train_time, self.train_steps = 0.0, 0
        self.first_call = (0.0, 0)
        self.call_started: float | None = None
        self.postfix: dict[str, str] = {}
        self.plotter: threading.Thread | None = None
        self.preparer: threading.Thread | None = None
        self.seed_key: jax.Array | None = None  # PRNGKey(seed), set once drawn: the end-of-run sample's key
        self.prefetched: dict[tuple[int, int], tuple[jax.Array, jax.Array]] = {}
        self.eval_seconds = 0.0

    def call_seconds(self) -> float | None:
        return None if self.call_started is None else time.perf_counter() - self.call_started

    def tokens_per_s(self) -> float:
        seconds, steps = (self.train_time, self.train_steps) if self.train_steps else self.first_call
        return steps * self.tokens_per_step / seconds if seconds > 0 else 0.0

    def loop(self, bar, interrupt: Interrupt) -> int | None:
        """Trains to max_iters, evaluating at every eval_interval; returns the signal that stopped it, if any."""
        c, s = self.config, self.s
        start = s["step"]
        # On the device every chunk length shares one compiled program: a short first call shows progress early.
        first_call = FIRST_CALL_STEPS if self.on_device else None
        chunks = chunk_boundaries(start, c.max_iters, c.eval_interval, c.steps_per_call, first_call)
        if chunks and interrupt.signum is None:  # the training step compiles while the first evaluation runs
            self.log(f"compiling the training step (up to {c.steps_per_call} steps per call) ...")
            self.train_chunk.prepare(s["params"], s["opt_state"], self.batches(*chunks[0]), s["key"],
                                     jnp.int32(start), n_steps=chunks[0][1] - start)
        if chunks and interrupt.signum is None:
            self.prepare_ahead()  # the run's end compiles beside the step and the first evaluation
        if s["step"] % c.eval_interval == 0 and not self.metrics.evaluated(s["step"]) and interrupt.signum is None:
            self.evaluate()
        for k, (a, b) in enumerate(chunks):
            if interrupt.signum is not None:
                break
            interrupt.stopping = None  # from this call on, a stop saves the state it reached
            upcoming = chunks[k + 1] if k + 1 < len(chunks) and b % c.eval_interval else None
            self.train(a, b, first=a == start, upcoming=upcoming)
            bar.update(b - a)
            bar.set_postfix(**self.postfix)
            if s["step"] % c.eval_interval == 0 or s["step"] == c.max_iters:
                self.evaluate()
        signum = interrupt.signum
        if signum is not None and s["step"] == start:  # nothing trained: the checkpoints on disk are all there is
            last = self.ckptr.latest_step("latest")
            kept = "there is no checkpoint yet" if last is None else f"the checkpoint of step {last} is kept"
            raise run_dir_lib.Interrupted(f"interrupted ({signal.Signals(signum).name}) before the first training "
                                          f"step: nothing to save; {kept}")
        self.save("latest")  # at the end, or on Ctrl-C / SIGTERM: between calls, so the state is whole
        if signum is not None:
            self.log(f"interrupted ({signal.Signals(signum).name}) at step {s['step']}: checkpoint saved in "
                     f"{self.out_dir / 'checkpoints' / 'latest'}; continue with --config.resume=True")
        return signum

    def host_offsets(self, a: int, b: int) -> np.ndarray:
        """Where the batches of steps [a, b) start (data kept off the device): a small program, waited for."""
        c = self.config
        return step_offsets(self.s["key"], a, b, grad_accum_steps=c.grad_accum_steps, batch_size=c.batch_size,
                            block_size=c.model.block_size, n_tokens=len(self.train_data))

    def host_batches(self, a: int, b: int, offsets: np.ndarray | None = None):
        """The batches of steps [a, b) gathered on the host and put on the devices (data kept off the device)."""
        offsets = self.host_offsets(a, b) if offsets is None else offsets
        return host_fed_batches(self.train_data, offsets, self.config.model.block_size, self.mesh)

    def batches(self, a: int, b: int):
        """What the training call of steps [a, b) reads: the token array on the device, or the host-fed batches
        (drawn once, kept until that call)."""
        if self.on_device:
            return self.train_data
        if (a, b) not in self.prefetched:
            self.prefetched[(a, b)] = self.host_batches(a, b)
        return self.prefetched[(a, b)]

    def train(self, a: int, b: int, *, first: bool, upcoming: tuple[int, int] | None = None) -> None:
        c, s = self.config, self.s
        self.call_started = time.perf_counter()
        data = self.batches(a, b)
        self.prefetched.pop((a, b), None)
        # Double buffering: where the next chunk's batches start is drawn now, while the devices are idle (queued
        # behind the call below, that small program would hold the host until the call ends); the batches are read
        # and sent while the call runs.
        upcoming_offsets = self.host_offsets(*upcoming) if not self.on_device and upcoming else None
        s["params"], s["opt_state"], out = self.train_chunk(s["params"], s["opt_state"], data, s["key"],
                                                            jnp.int32(a), n_steps=b - a)
        if upcoming_offsets is not None:
            self.prefetched[upcoming] = self.host_batches(*upcoming, offsets=upcoming_offsets)
        out = jax.device_get(out)  # the one host sync per chunk
        losses, finite, lrs = out["loss"], out["finite"], out["lr"]
        dt = time.perf_counter() - self.call_started
        self.call_started = None
        if first:  # it also compiles: the throughput counts it only when no other call ran
            self.first_call = (dt, b - a)
        else:
            self.train_time += dt
            self.train_steps += b - a
        bad = np.flatnonzero(~finite)
        if bad.size and not c.skip_nonfinite:
            last = self.ckptr.latest_step("latest")
            kept = "no checkpoint yet" if last is None else f"the last good checkpoint (step {last}) is kept"
            what = (f"loss is {losses[bad[0]]}" if not np.isfinite(losses[bad[0]])
                    else f"a gradient is not finite (loss {losses[bad[0]]:.4f})")
            raise TrainingError(f"{what} at step {a + int(bad[0])}: training stopped; {kept} in "
                                f"{self.out_dir / 'checkpoints' / 'latest'} (--config.skip_nonfinite=True skips "
                                "such steps)")
        for i in bad:
            self.log(f"step {a + int(i)}: non-finite loss or gradient (loss {losses[i]}): update skipped")
        s["step"] = b
        ms = 1000 * dt / (b - a)
        tok_s = self.tokens_per_step / (ms / 1000)
        chunk_mfu = self.mfu_of(tok_s)
        extra = {} if chunk_mfu is None else {"mfu": chunk_mfu}
        for i in range(a, b):
            s["skipped"] += int(not finite[i - a])
            if i % c.log_interval == 0:
                r = {"step": i, "loss": float(losses[i - a]), "lr": float(lrs[i - a]), "ms_per_step": ms,
                     "tokens_per_s": tok_s, **extra}
                if c.skip_nonfinite:
                    r["skipped_nonfinite"] = s["skipped"]  # so far, this step included
                    if not finite[i - a]:
                        del r["loss"]  # NaN is not JSON; the count says what happened
                self.metrics.record(r)
        self.postfix = dict(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}", ms_step=f"{ms:.1f}",
                            **({} if chunk_mfu is None else {"mfu": f"{chunk_mfu:.1%}"}))


    def evaluate(self) -> None:
        """nanoGPT's estimate_loss on both splits (one compiled call); saves 'best' / 'latest' as the config says."""
        c, s = self.config, self.s
        step = s["step"]
        splits = (self.train_data, self.val_data)
        if not self.on_device:  # the batches drawn on the host, with the keys the program would draw them with
            offsets = [batch_offsets(jax.random.split(eval_key(s["key"], step, i), c.eval_iters), c.batch_size,
                                     c.model.block_size, len(d)) for i, d in enumerate(splits)]
            splits = tuple(host_fed_batches(d, o, c.model.block_size, self.mesh) for d, o in zip(splits, offsets))
        if not self.metrics.history or self.eval_seconds > 5:  # say why the console is quiet
            took = f"; the last one took {self.eval_seconds:.0f} s" if self.eval_seconds else " (compiles first)"
            self.log(f"step {step}: evaluating on 2 x {c.eval_iters} batches{took} ...")
        self.call_started = time.perf_counter()
        losses = dict(zip(("train", "val"), map(float, self.estimate(s["params"], splits, s["key"], np.int32(step)))))
        self.eval_seconds = time.perf_counter() - self.call_started
        self.call_started = None
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"non-finite eval loss at step {step} (train {losses['train']}, val {losses['val']}): "
                                f"training stopped; the last good checkpoint is kept in {self.out_dir / 'checkpoints'}")
        self.metrics.record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                             "time": time.time() - self.t0})
        improved = losses["val"] < s["best_val"]
        s["best_val"] = min(s["best_val"], losses["val"])
        self.log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 + (" (best)" if improved else ""))
        if step > 0:
            # The first trained state is 'best' even when step 0's untrained loss was lower (a one-token vocabulary,
            # a diverging run): sample.py's default then has a checkpoint to read.
            save_best = improved or self.ckptr.latest_step("best") is None
            if save_best:
                self.save("best")
            if save_best or c.always_save_checkpoint:
                self.save("latest", same_as="best" if save_best else None)
        if c.plot and self.main and (step > 0 or c.eval_only):  # a curve needs a second point
            self.plot()

    def plot(self) -> None:
        """Redraws loss.png in a thread, so that training goes on meanwhile (one drawing at a time)."""
        self.wait_for_plot()
        title = f"{self.config.model.name} on {pathlib.Path(self.dataset.source).name}"
        records = list(self.metrics.history)

        def draw():
            from jaxgpt.plotting import plot_losses

            plot_losses(records, self.out_dir / "loss.png", title=title)

        self.plotter = threading.Thread(target=draw, name="jaxgpt-plot")
        self.plotter.start()

    def wait_for_plot(self) -> None:
        if self.plotter is not None:
            self.plotter.join()
            self.plotter = None

    def wait_for_background(self) -> None:
        """Joins the plotting and preparing threads (neither touches the training state)."""
        self.wait_for_plot()
        if self.preparer is not None:
            self.preparer.join()
            self.preparer = None

    def prepare_ahead(self) -> None:
        """In a thread: loads the plotting library and compiles the end-of-run sample's programs, so that neither
        keeps the run waiting at its end.

        The sample's programs are compiled on zeros shaped and sharded like the parameters (the real ones are
        donated to each training call); they land in the same compiled-program caches the sample then hits.
        The loop calls this before the step-0 evaluation, while the training step compiles: compiling is then
        what the cores do anyway. Later, on a CPU, it would take cores from the training calls (5 s lost for 3 s
        saved on 2 cores), and at the end it would keep the run waiting (benchmarks/RESULTS.md, fifth round).
        """
        c = self.config
        if self.preparer is not None or not self.main:
            return
        sample = c.sample_tokens > 0 and jax.process_count() == 1  # several processes gather the weights first
        # Host zeros (nothing compiles for them), on the device the sample will run on.
        zeros = sharding_lib.zeros(sharding_lib.first_replica(self.s["params"])) if sample else None
        prompt = sample_prompt(self.dataset.tokenizer)

        def prepare():
            if c.plot:
                import jaxgpt.plotting  # noqa: F401 - matplotlib takes ~0.5 s to import
            if not sample:
                return
            from jaxgpt.sampling import prepare_generate

            with contextlib.suppress(Exception):  # the sample itself will raise whatever is wrong
                prepare_generate(nnx.merge(self.graphdef, zeros), len(prompt), c.sample_tokens,
                                 key=self.seed_key)

        self.preparer = in_background(prepare, name="jaxgpt-prepare")

    def final_sample(self) -> str | None:
        """The end-of-run sample (config.sample_tokens characters), or None when there is none to show."""
        if self.config.sample_tokens <= 0:
            return None
        if self.preparer is not None:
            self.preparer.join()
            self.preparer = None
        return _final_sample(self.graphdef, self.s["params"], self.dataset.tokenizer, self.config.sample_tokens,
                             self.seed_key)

    def save(self, which: str, *, same_as: str | None = None) -> None:
        """Checkpoints the state as `which`; `same_as` names a checkpoint of this very state to link instead."""
        s = self.s
        meta = dict(self.meta, best_val_loss=None if math.isinf(s["best_val"]) else s["best_val"],
                    skipped_nonfinite=s["skipped"])
        try:
            if same_as is not None:
                self.ckptr.link(which, s["step"], source=same_as)
            else:
                self.ckptr.save(which, s["step"], params=s["params"], opt_state=s["opt_state"], key=s["key"],
                                meta=meta)
        except ckpt_lib.CheckpointError as e:  # e.g. a full disk: the previous checkpoint is intact
            raise TrainingError(str(e)) from None


def _final_sample(graphdef, params, tokenizer, n_tokens: int, seed: int | jax.Array) -> str | None:
    """The end-of-run sample on process 0 (every process takes part in gathering the weights), else None."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])
    if jax.process_index() != 0:
        return None
    return sample_text(nnx.merge(graphdef, sharding_lib.first_replica(params)), tokenizer, n_tokens, seed)


def sample_text(model: nnx.Module, tokenizer, n_tokens: int, seed: int | jax.Array) -> str:
    """A sample from the model, starting from a newline (nanoGPT's default prompt) or token 0, drawn from `seed` (an
    int, or its key `jax.random.PRNGKey(seed)`)."""
    from jaxgpt.sampling import generate

    start = sample_prompt(tokenizer)
    key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(seed)
    ids = generate(model, start[None, :], n_tokens, key=key)[0]
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids.tolist()))


def sample_prompt(tokenizer) -> np.ndarray:
    """The end-of-run sample's prompt: a newline (nanoGPT's default start) when the tokenizer has one, else token 0."""
    if tokenizer is not None and "\n" in getattr(tokenizer, "stoi", {}):
        return np.asarray(tokenizer.encode("\n"), np.int32)
    return np.zeros(1, np.int32)
