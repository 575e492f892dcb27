"""The training loop: calls the jitted step of `jaxgpt.train_step` in chunks that end at each evaluation.

`TrainLoop` owns the run's `TrainState` and its three actions (train a chunk, evaluate, save); around them
it writes metrics.jsonl and loss.png, shows a progress bar, stops between calls on Ctrl-C / SIGTERM and ends
with a sample. `jaxgpt.training.train` checks the config and builds or restores the state first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
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
from jaxgpt import host_feed, optim, target
from jaxgpt import mfu as mfu_lib
from jaxgpt import run_dir as run_dir_lib
from jaxgpt import sharding as sharding_lib
from jaxgpt.run_dir import CHECKPOINTS, Interrupt, TrainingError, checkpoint_dir, read_metrics
from jaxgpt.train_step import make_estimate_loss, train_chunk_fn

FIRST_CALL_STEPS = 8  # the first compiled call of a run trains this many steps at most, so progress shows early


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds (params, opt_state, key, step) and the counters its meta keeps."""

    params: Any
    opt_state: Any
    key: jax.Array  # the run's base key: every step's and evaluation's keys come from it
    step: int = 0
    best_val: float = math.inf
    skipped: int = 0  # steps skipped as non-finite (skip_nonfinite)


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


def recipe_train_chunk(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, mesh: Mesh | None) -> Callable:
    """The jitted training chunk of a config: `train_chunk(params, opt_state, data, base_key, step0, n_steps,
    numbers)`, `numbers` the optimizer's (`optim.recipe_numbers(config)`).

    The numbers (learning rates, schedule lengths, weight decay, betas, clip) are the program's arguments, not
    constants: a rerun that changes only one of them finds the program in the compilation cache.
    On the device one program runs every chunk length (a short first call shows progress early).
    """
    c = config
    max_steps = c.steps_per_call if c.data.on_device else None

    def train_chunk(params, opt_state, data, base_key, step0, n_steps, numbers):
        # Carrying the cast weights saves a GPU a kernel a weight each step; a TPU program moves 1 % more bytes.
        carried_dtype = c.model.dtype if target.platform() == "gpu" else None
        chunk = train_chunk_fn(
            graphdef, optim.make_optimizer(c, numbers), batch_size=c.batch_size, block_size=c.model.block_size,
            grad_accum_steps=c.grad_accum_steps, use_dropout=c.model.dropout > 0 and c.model.name == "gpt",
            mesh=mesh, scan_layers=c.model.scan_layers, skip_nonfinite=c.skip_nonfinite, max_steps=max_steps,
            lr_schedule=optim.schedule_from_config(c, numbers), compute_dtype=carried_dtype)
        return chunk(params, opt_state, data, base_key, step0, n_steps)

    static = () if max_steps is not None else ("n_steps",)
    return jax.jit(train_chunk, donate_argnames=("params", "opt_state"), static_argnames=static)


class Metrics:
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


class TrainLoop:
    """The loop's state (`self.state`) and its actions: train a chunk, evaluate, save, sample."""

    def __init__(self, config: ml_collections.ConfigDict, out_dir: pathlib.Path, dataset: data_lib.Dataset,
                 graphdef: nnx.GraphDef, mesh: Mesh, ckptr: ckpt_lib.Checkpointer, metrics: Metrics,
                 state: TrainState, seed_key: jax.Array, log: Callable[[str], None]):
        self.config, self.out_dir, self.dataset, self.mesh, self.graphdef = config, out_dir, dataset, mesh, graphdef
        self.ckptr, self.metrics, self.state, self.seed_key, self.log = ckptr, metrics, state, seed_key, log
        self.main = jax.process_index() == 0
        c, block_size = config, config.model.block_size
        self.on_device = c.data.on_device
        replicated = NamedSharding(mesh, PartitionSpec())
        # Replicated: the batches are drawn inside the step, on every device.
        put = lambda a: jax.device_put(np.asarray(a, np.int32), replicated) if self.on_device else a  # noqa: E731
        self.train_data, self.val_data = put(dataset.train), put(dataset.val)
        self.train_chunk, self.numbers = recipe_train_chunk(graphdef, c, mesh), optim.recipe_numbers(c)
        self.estimate = make_estimate_loss(graphdef, batch_size=c.batch_size, block_size=block_size,
                                           eval_iters=c.eval_iters, mesh=mesh)
        n_params = nnx.merge(graphdef, state.params).num_params()
        self.mfu_of = mfu_lib.step_mfu(c.model, n_params, mesh.size)
        self.meta = {"config": config_lib.to_dict(c), "vocab_size": c.model.vocab_size or dataset.vocab_size,
                     "tokenizer": dataset.tokenizer.to_dict() if dataset.tokenizer else None}
        self.tokens_per_step = c.batch_size * block_size * c.grad_accum_steps
        self.t0 = time.time()
        self.train_time, self.train_steps = 0.0, 0
        self.first_call = (0.0, 0)
        self.call_started: float | None = None
        self.postfix: dict[str, str] = {}
        self.plotter: threading.Thread | None = None
        self.prefetched: dict[tuple[int, int], tuple[jax.Array, jax.Array]] = {}
        self.eval_seconds = 0.0

    def call_seconds(self) -> float | None:
        """How long the compiled call in progress has run (None between calls): for the Ctrl-C message."""
        return None if self.call_started is None else time.perf_counter() - self.call_started

    def tokens_per_s(self) -> float:
        seconds, steps = (self.train_time, self.train_steps) if self.train_steps else self.first_call
        return steps * self.tokens_per_step / seconds if seconds > 0 else 0.0

    def run(self, bar, interrupt: Interrupt) -> int | None:
        """Trains to max_iters, evaluating at every eval_interval; returns the signal that stopped it, if any."""
        c, s = self.config, self.state
        start = s.step
        chunks = chunk_boundaries(start, c.max_iters, c.eval_interval, c.steps_per_call,
                                  FIRST_CALL_STEPS if self.on_device else None)
        if s.step % c.eval_interval == 0 and not self.metrics.evaluated(s.step) and interrupt.signum is None:
            self.evaluate()
        for k, (a, b) in enumerate(chunks):
            if interrupt.signum is not None:
                break
            interrupt.stopping = None  # from this call on, a stop saves the state it reached
            if a == start:
                self.log(f"compiling the training step (up to {c.steps_per_call} steps per call) ...")
            upcoming = chunks[k + 1] if k + 1 < len(chunks) and b % c.eval_interval else None
            self.train(a, b, first=a == start, upcoming=upcoming)
            bar.update(b - a)
            bar.set_postfix(**self.postfix)
            if s.step % c.eval_interval == 0 or s.step == c.max_iters:
                self.evaluate()
        signum = interrupt.signum
        if signum is not None and s.step == start:  # nothing trained: the checkpoints on disk are all there is
            last = self.ckptr.latest_step("latest")
            kept = "there is no checkpoint yet" if last is None else f"the checkpoint of step {last} is kept"
            raise run_dir_lib.Interrupted(f"interrupted ({signal.Signals(signum).name}) before the first training "
                                          f"step: nothing to save; {kept}")
        self.save("latest")  # at the end, or on Ctrl-C / SIGTERM: between calls, so the state is whole
        if signum is not None:
            self.log(f"interrupted ({signal.Signals(signum).name}) at step {s.step}: checkpoint saved in "
                     f"{checkpoint_dir(self.out_dir, 'latest')}; continue with --config.resume=True")
        return signum

    def host_batches(self, a: int, b: int, offsets: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
        """The batches of steps [a, b) gathered on the host and put on the devices (data kept off the device)."""
        c = self.config
        if offsets is None:
            offsets = host_feed.step_offsets(self.state.key, a, b, grad_accum_steps=c.grad_accum_steps,
                                             batch_size=c.batch_size, block_size=c.model.block_size,
                                             n_tokens=len(self.train_data))
        return host_feed.host_fed_batches(self.train_data, offsets, c.model.block_size, self.mesh)

    def train(self, a: int, b: int, *, first: bool, upcoming: tuple[int, int] | None = None) -> None:
        """Trains steps [a, b) in one compiled call and records what it returns."""
        c, s = self.config, self.state
        self.call_started = time.perf_counter()
        data = self.train_data if self.on_device else self.prefetched.pop((a, b), None) or self.host_batches(a, b)
        # Double buffering: where the next chunk's batches start is drawn now, while the devices are idle (queued
        # behind the call below, that small program would hold the host until the call ends); the batches are read
        # and sent while the call runs.
        upcoming_offsets = None
        if not self.on_device and upcoming:
            upcoming_offsets = host_feed.step_offsets(s.key, *upcoming, grad_accum_steps=c.grad_accum_steps,
                                                      batch_size=c.batch_size, block_size=c.model.block_size,
                                                      n_tokens=len(self.train_data))
        s.params, s.opt_state, out = self.train_chunk(s.params, s.opt_state, data, s.key, jnp.int32(a), b - a,
                                                      self.numbers)
        if upcoming_offsets is not None:
            self.prefetched[upcoming] = self.host_batches(*upcoming, offsets=upcoming_offsets)
        out = {k: v[:b - a] for k, v in jax.device_get(out).items()}  # the one host sync per chunk
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
                                f"{checkpoint_dir(self.out_dir, 'latest')} (--config.skip_nonfinite=True skips "
                                "such steps)")
        for i in bad:
            self.log(f"step {a + int(i)}: non-finite loss or gradient (loss {losses[i]}): update skipped")
        s.step = b
        ms = 1000 * dt / (b - a)
        tok_s = self.tokens_per_step / (ms / 1000)
        chunk_mfu = self.mfu_of(tok_s)
        extra = {} if chunk_mfu is None else {"mfu": chunk_mfu}
        for i in range(a, b):
            s.skipped += int(not finite[i - a])
            if i % c.log_interval == 0:
                r = {"step": i, "loss": float(losses[i - a]), "lr": float(lrs[i - a]), "ms_per_step": ms,
                     "tokens_per_s": tok_s, **extra}
                if c.skip_nonfinite:
                    r["skipped_nonfinite"] = s.skipped  # so far, this step included
                    if not finite[i - a]:
                        del r["loss"]  # NaN is not JSON; the count says what happened
                self.metrics.record(r)
        self.postfix = dict(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}", ms_step=f"{ms:.1f}",
                            **({} if chunk_mfu is None else {"mfu": f"{chunk_mfu:.1%}"}))

    def evaluate(self) -> None:
        """nanoGPT's estimate_loss on both splits (one compiled call); saves 'best' / 'latest' as the config says."""
        c, s = self.config, self.state
        step = s.step
        splits = (self.train_data, self.val_data)
        if not self.on_device:  # the batches drawn on the host, with the keys the program would draw them with
            splits = tuple(host_feed.host_fed_batches(
                d, host_feed.eval_offsets(s.key, step, i, eval_iters=c.eval_iters, batch_size=c.batch_size,
                                          block_size=c.model.block_size, n_tokens=len(d)),
                c.model.block_size, self.mesh) for i, d in enumerate(splits))
        if not self.metrics.history or self.eval_seconds > 5:  # say why the console is quiet
            took = f"; the last one took {self.eval_seconds:.0f} s" if self.eval_seconds else " (compiles first)"
            self.log(f"step {step}: evaluating on 2 x {c.eval_iters} batches{took} ...")
        self.call_started = time.perf_counter()
        losses = dict(zip(("train", "val"), map(float, self.estimate(s.params, splits, s.key, np.int32(step)))))
        self.eval_seconds = time.perf_counter() - self.call_started
        self.call_started = None
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"non-finite eval loss at step {step} (train {losses['train']}, val {losses['val']}): "
                                f"training stopped; the last good checkpoint is kept in {self.out_dir / CHECKPOINTS}")
        self.metrics.record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                             "time": time.time() - self.t0})
        improved = losses["val"] < s.best_val
        s.best_val = min(s.best_val, losses["val"])
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

    def final_sample(self) -> str | None:
        """The end-of-run sample (config.sample_tokens characters) on process 0, else None."""
        if self.config.sample_tokens <= 0:
            return None
        params = self.state.params
        if jax.process_count() > 1:  # every process takes part in gathering the weights
            from jax.experimental import multihost_utils

            params = jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])
        if not self.main:
            return None
        model = nnx.merge(self.graphdef, sharding_lib.first_replica(params))
        return sample_text(model, self.dataset.tokenizer, self.config.sample_tokens, self.seed_key)

    def save(self, which: str, *, same_as: str | None = None) -> None:
        """Checkpoints the state as `which`; `same_as` names a checkpoint of this very state to link instead."""
        s = self.state
        meta = dict(self.meta, best_val_loss=None if math.isinf(s.best_val) else s.best_val,
                    skipped_nonfinite=s.skipped)
        try:
            if same_as is not None:
                self.ckptr.link(which, s.step, source=same_as)
            else:
                self.ckptr.save(which, s.step, params=s.params, opt_state=s.opt_state, key=s.key, meta=meta)
        except ckpt_lib.CheckpointError as e:  # e.g. a full disk: the previous checkpoint is intact
            raise TrainingError(str(e)) from None


def run_training(loop: TrainLoop, interrupt: Interrupt) -> dict[str, Any]:
    """Evaluates (eval_only) or trains with `loop`, then samples; returns the run's summary."""
    from tqdm.auto import tqdm

    c, s, log = loop.config, loop.state, loop.log
    first_step, skipped_before = s.step, s.skipped
    try:
        if c.eval_only:
            loop.evaluate()
            return {"step": s.step, "best_val_loss": s.best_val, "wall_time": time.time() - loop.t0,
                    "tokens_per_s": 0.0}
        bar = tqdm(total=c.max_iters, initial=s.step, disable=not (c.progress and loop.main), dynamic_ncols=True,
                   file=sys.stderr, desc="train")
        interrupt.call_seconds = loop.call_seconds
        with contextlib.closing(bar):
            interrupted = loop.run(bar, interrupt)
        sample = loop.final_sample() if interrupted is None else None  # while loss.png is drawn, in a thread
    finally:
        interrupt.call_seconds = lambda: None  # train.py's interrupt outlives the run: it keeps no reference to it
        loop.wait_for_plot()
    if s.step > first_step and s.skipped - skipped_before == s.step - first_step:
        raise TrainingError(f"all {s.step - first_step} steps of this run were skipped as non-finite "
                            "(skip_nonfinite): the model learned nothing; check the data and lower learning_rate")
    summary = {"step": s.step, "best_val_loss": s.best_val, "wall_time": time.time() - loop.t0,
               "tokens_per_s": loop.tokens_per_s(), "interrupted": interrupted is not None,
               "skipped_nonfinite": s.skipped}
    if sample is not None:
        summary["sample"] = sample
        log("-" * 40 + "\n" + sample + "\n" + "-" * 40)
    log(f"done: step {s.step}, best val loss {s.best_val:.4f}, wall time {summary['wall_time']:.1f} s, "
        f"{summary['tokens_per_s']:,.0f} tokens/s (train steps)")
    return summary


def sample_text(model: nnx.Module, tokenizer, n_tokens: int, seed: int | jax.Array) -> str:
    """A sample from the model, starting from a newline (nanoGPT's default prompt) or token 0, drawn from `seed` (an
    int, or its key `jax.random.PRNGKey(seed)`)."""
    from jaxgpt.decode import generate

    if tokenizer is not None and "\n" in getattr(tokenizer, "stoi", {}):
        start = np.asarray(tokenizer.encode("\n"), np.int32)
    else:
        start = np.zeros(1, np.int32)
    key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(seed)
    ids = generate(model, start[None, :], n_tokens, key=key)[0]
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids.tolist()))
