"""Accelerator benchmark: jaxgpt against the PyTorch reference on one GPU, every measurement of issue 13 at once.

One command, one table (markdown on stdout) and, with `--json PATH`, the same rows as JSON. Sections:

    step      shakespeare_char training step (batch 64 x 256, 6 layers x 384, dropout 0.2, nanoGPT's AdamW:
              warmup + cosine, weight decay 0.1 on >= 2-D parameters, betas (0.9, 0.99), clip 1.0):
              jaxgpt float32 and bfloat16 (`train_step.make_train_chunk`, 50 steps per call, batches drawn on
              the device, as `configs/shakespeare_char.py` trains) and the PyTorch reference
              (tests/reference/torch_gpt.py) under `torch.compile` + bf16 autocast, fused AdamW as nanoGPT
              picks on CUDA, batches drawn on the device
    eval      one evaluation: eval_iters=200 batches of the train split and 200 of val, no dropout
              (jaxgpt: `train_step.make_estimate_loss`, one compiled call; torch: nanoGPT's estimate_loss loop
              over the compiled model, its batches drawn on the device)
    gpt2      GPT-2 124M step, 12 x 1024 tokens, random tokens, `configs/gpt2_124m.py`'s settings (bf16,
              cuDNN attention on GPUs, betas (0.9, 0.95)) with one micro-batch per step (nanoGPT's bench.py):
              jaxgpt host-fed one step per call (the config as shipped), jaxgpt on-device 10 steps per call,
              torch compiled + autocast; MFU with nanoGPT's FLOPs estimate (`jaxgpt.mfu`)
    sample    sampling ms/token, a shakespeare_char-shaped model (6 layers x 384, random weights), 1-token
              prompt + 255 new tokens, batch 1 and 8: `jaxgpt.decode.generate` (KV cache) with its first
              call (compile included) and the reference `generate` (a full forward per token) under bf16
              autocast, as nanoGPT's sample.py runs it
    recipe    (`--recipe`) `python train.py --config configs/shakespeare_char.py` as a subprocess, with a cold
              compilation cache: process wall time, best val and final val from its metrics.jsonl

Steady timings: a first (compiling) call, one warm-up window, then the median over `--windows` windows
(each K steps, synchronised at its end with `block_until_ready` / `torch.cuda.synchronize`); the min-max
spread is printed beside. The last column is jaxgpt's time over the PyTorch reference's (< 1: jaxgpt is
faster). A section that fails (say torch.compile without triton) is a table row with its error; the
others still run.

    python benchmarks/bench_gpu.py --data .data/input.txt --json out.json            # ~5 minutes on a GPU
    python benchmarks/bench_gpu.py --recipe --profile /tmp/trace --xla-dump /tmp/hlo
    python benchmarks/bench_gpu.py --tiny                                            # every section, tiny shapes, CPU

Only jax, flax, optax, chex, numpy and torch are needed: the step builders (`jaxgpt.train_step`,
`jaxgpt.optim`) do not import ml_collections (`--recipe` runs train.py, which needs it). jax preallocates
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 of the GPU here (unless set) so that torch fits beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = os.environ.get("JAXGPT_SHAKESPEARE") or str(ROOT.parent / "shared" / "data" / "tinyshakespeare"
                                                             / "input.txt")
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0"
SECTIONS = ("step", "eval", "gpt2", "sample", "recipe")
ORIGINAL_ENV = dict(os.environ)  # the recipe subprocess runs in the user's environment, not the tweaks below


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """A training benchmark shape and its optimiser recipe (nanoGPT's AdamW, schedule and clipping)."""

    batch_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    vocab_size: int | None  # None: the corpus's character vocabulary
    learning_rate: float
    warmup_iters: int
    lr_decay_iters: int
    min_lr: float
    beta2: float
    steps_per_call: int  # jaxgpt's K steps per compiled call, and the torch window's length
    beta1: float = 0.9
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every shape and count of one run; `--tiny` swaps in one that runs on a CPU in seconds."""

    shakespeare: TrainShape
    gpt2: TrainShape
    eval_iters: int
    sample_model: dict
    sample_new_tokens: int
    sample_batches: tuple[int, ...]
    windows: int
    recipe_overrides: tuple[str, ...]


FULL = Plan(
    shakespeare=TrainShape(64, 256, 6, 6, 384, 0.2, None, 1e-3, 100, 5000, 1e-4, 0.99, steps_per_call=50),
    gpt2=TrainShape(12, 1024, 12, 12, 768, 0.0, 50304, 6e-4, 2000, 600000, 6e-5, 0.95, steps_per_call=10),
    eval_iters=200,
    sample_model=dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
    sample_new_tokens=255,
    sample_batches=(1, 8),
    windows=5,
    recipe_overrides=(),
)
TINY = Plan(
    shakespeare=TrainShape(4, 32, 2, 2, 32, 0.2, None, 1e-3, 10, 100, 1e-4, 0.99, steps_per_call=4),
    gpt2=TrainShape(2, 64, 2, 2, 64, 0.0, 512, 6e-4, 10, 100, 6e-5, 0.95, steps_per_call=3),
    eval_iters=4,
    sample_model=dict(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32),
    sample_new_tokens=15,
    sample_batches=(1, 8),
    windows=2,
    recipe_overrides=("max_iters=20", "eval_interval=10", "eval_iters=2", "batch_size=4", "steps_per_call=5",
                      "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                      "sample_tokens=8", "log_interval=5"),
)


# --------------------------------------------------------------------------------------------- helpers


def import_training() -> types.SimpleNamespace:
    """jaxgpt's step functions (`jaxgpt.train_step`, `jaxgpt.optim`); none of them needs ml_collections."""
    from jaxgpt import optim, train_step

    return types.SimpleNamespace(make_optimizer=optim.make_optimizer, make_train_chunk=train_step.make_train_chunk,
                                 make_estimate_loss=train_step.make_estimate_loss, step_offsets=train_step.step_offsets,
                                 host_fed_batches=train_step.host_fed_batches)


def load_corpus(path: pathlib.Path):
    """The corpus's character ids (uint16), split 90 / 10 as jaxgpt.data does: (train, val, vocab_size)."""
    import numpy as np

    text = path.read_text(encoding="utf-8")
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(stoi)


def window_stats(per_step: list[float]) -> dict:
    """Median and spread (seconds per unit) of the timed windows."""
    return {"median_s": statistics.median(per_step), "min_s": min(per_step), "max_s": max(per_step),
            "windows": len(per_step)}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(window: Callable[[], float], windows: int, first: Callable[[], object] | None = None) -> dict:
    """The first call's wall time (compile included), one warm-up window, then `windows` timed windows.

    `window()` runs one window and returns its seconds per unit (per step, per token, per evaluation);
    `first()` is the first call (default: one window).
    """
    first_s = timed(first or window)
    window()
    stats = window_stats([window() for _ in range(windows)])
    stats["first_s"] = first_s
    return stats


# ----------------------------------------------------------------------------------------------- jax


class JaxTrainer:
    """jaxgpt's training step on `shape`, as `jaxgpt.training.train` builds it on one device.

    `host_fed`: batches drawn on the host and sent with every call (`data.on_device=False`), one step
    per call; otherwise the token array lives on the device and each call runs `shape.steps_per_call`
    steps, drawing its batches inside.
    """

    def __init__(self, training, shape: TrainShape, train_ids, vocab_size: int, *, dtype: str,
                 attention_impl: str = "auto", host_fed: bool = False):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        import jaxgpt
        from jaxgpt import sharding

        self.jax, self.training, self.shape, self.host_fed = jax, training, shape, host_fed
        config = jaxgpt.GPTConfig(vocab_size=vocab_size, block_size=shape.block_size, n_layer=shape.n_layer,
                                  n_head=shape.n_head, n_embd=shape.n_embd, dropout=shape.dropout, bias=False,
                                  dtype=dtype, attention_impl=attention_impl)
        model = jaxgpt.GPT(config, rngs=nnx.Rngs(0))
        self.n_params = model.num_params()
        self.graphdef, params = nnx.split(model)
        recipe = types.SimpleNamespace(decay_lr=True, **{f.name: getattr(shape, f.name) for f in dataclasses.fields(
            shape) if f.name in ("learning_rate", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay",
                                 "beta1", "beta2", "grad_clip")})
        tx = training.make_optimizer(recipe)  # reads only these attributes of a config
        self.mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
        self.params = sharding.shard_params(params, self.mesh)
        self.opt_state = sharding.shard_params(tx.init(params), self.mesh)
        self.key = jax.random.fold_in(jax.random.PRNGKey(1337), 1)
        self.k = 1 if host_fed else shape.steps_per_call
        self.chunk = training.make_train_chunk(self.graphdef, tx, batch_size=shape.batch_size,
                                               block_size=shape.block_size, use_dropout=shape.dropout > 0,
                                               mesh=self.mesh)
        self.host_ids = np.asarray(train_ids)
        self.data = jnp.asarray(self.host_ids, jnp.int32)
        self.step = 0

    def call(self) -> None:
        """One compiled call, synchronised as train.py does (it reads the losses back)."""
        jnp, training, a = self.jax.numpy, self.training, self.step
        data = self.data
        if self.host_fed:
            offsets = training.step_offsets(self.key, a, a + self.k, grad_accum_steps=1,
                                            batch_size=self.shape.batch_size, block_size=self.shape.block_size,
                                            n_tokens=len(self.host_ids))
            data = training.host_fed_batches(self.host_ids, offsets, self.shape.block_size, self.mesh)
        self.params, self.opt_state, metrics = self.chunk(self.params, self.opt_state, data, self.key, jnp.int32(a),
                                                          n_steps=self.k)
        losses = self.jax.device_get(metrics["loss"])
        if not all(map(math.isfinite, losses.tolist())):
            raise FloatingPointError(f"non-finite training loss {losses.tolist()}")
        self.step += self.k

    def window(self, steps: int) -> float:
        """Runs at least `steps` steps (whole calls); seconds per step."""
        calls = max(1, steps // self.k)
        t0 = time.perf_counter()
        for _ in range(calls):
            self.call()
        return (time.perf_counter() - t0) / (calls * self.k)

    def make_eval(self, train_ids, val_ids, eval_iters: int) -> Callable[[], float]:
        """One evaluation as train.py runs it: both splits in one compiled call; seconds per evaluation."""
        jnp = self.jax.numpy
        estimate = self.training.make_estimate_loss(self.graphdef, batch_size=self.shape.batch_size,
                                                    block_size=self.shape.block_size, eval_iters=eval_iters,
                                                    mesh=self.mesh)
        splits = (jnp.asarray(train_ids, jnp.int32), jnp.asarray(val_ids, jnp.int32))
        counter = iter(range(1 << 30))

        def evaluate() -> float:
            step = jnp.int32(next(counter))
            t0 = time.perf_counter()
            losses = [float(x) for x in estimate(self.params, splits, self.key, step)]
            dt = time.perf_counter() - t0
            if not all(map(math.isfinite, losses)):
                raise FloatingPointError(f"non-finite eval loss {losses}")
            return dt

        return evaluate


# --------------------------------------------------------------------------------------------- torch


def use_sdpa(model) -> None:
    """Switches the reference GPT's attention to nanoGPT's flash path, in place.

    nanoGPT's CausalSelfAttention calls `F.scaled_dot_product_attention(is_causal=True, dropout_p=...)`
    when torch has it (flash attention on GPUs); the reference spells the masked softmax out for
    readability. The same function of the same weights (the dropout masks differ), at nanoGPT's speed.
    """
    import torch.nn.functional as F

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    for block in model.transformer.h:
        block.attn.forward = types.MethodType(forward, block.attn)


class TorchTrainer:
    """The PyTorch reference trained as nanoGPT's train.py does: compiled model, bf16 autocast, AdamW
    groups of `configure_optimizers` (fused on CUDA, as nanoGPT picks), the learning rate set each step,
    gradient clipping; batches drawn on the device from the token array. `sdpa`: nanoGPT's attention."""

    def __init__(self, shape: TrainShape, train_ids, vocab_size: int, device: str, compile_model: bool,
                 sdpa: bool = True):
        import numpy as np
        import torch

        from tests.reference import torch_gpt

        torch.manual_seed(0)
        self.torch, self.tg, self.shape, self.device = torch, torch_gpt, shape, device
        config = torch_gpt.TorchGPTConfig(vocab_size=vocab_size, block_size=shape.block_size, n_layer=shape.n_layer,
                                          n_head=shape.n_head, n_embd=shape.n_embd, dropout=shape.dropout, bias=False)
        self.model = torch_gpt.GPT(config).to(device)
        if sdpa:
            use_sdpa(self.model)
        self.n_params = self.model.get_num_params()
        groups = torch_gpt.configure_optimizers(self.model, shape.weight_decay, shape.learning_rate,
                                                (shape.beta1, shape.beta2)).param_groups
        fused = {"fused": True} if device == "cuda" else {}
        self.opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                     lr=shape.learning_rate, betas=(shape.beta1, shape.beta2), **fused)
        self.fwd = torch.compile(self.model) if compile_model else self.model
        self.autocast = torch.autocast(device, dtype=torch.bfloat16)
        self.train_ids = torch.from_numpy(np.asarray(train_ids, np.int64)).to(device)
        self.offsets = torch.arange(shape.block_size + 1, device=device)
        self.step = 0

    def batch(self, data):
        ix = self.torch.randint(len(data) - self.shape.block_size, (self.shape.batch_size,), device=self.device)
        w = data[ix[:, None] + self.offsets]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def window(self, steps: int) -> float:
        """`steps` training steps, synchronised at the end; seconds per step."""
        s, t0 = self.shape, time.perf_counter()
        self.model.train()
        for _ in range(steps):
            lr = self.tg.get_lr(self.step, s.learning_rate, s.warmup_iters, s.lr_decay_iters, s.min_lr)
            for group in self.opt.param_groups:
                group["lr"] = lr
            with self.autocast:
                _, loss = self.fwd(*self.batch(self.train_ids))
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
        if not math.isfinite(loss.item()):  # .item() synchronises
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        return (time.perf_counter() - t0) / steps

    def make_eval(self, val_ids, eval_iters: int) -> Callable[[], float]:
        """nanoGPT's estimate_loss: eval mode, no_grad, autocast, `eval_iters` batches of each split."""
        import numpy as np

        val = self.torch.from_numpy(np.asarray(val_ids, np.int64)).to(self.device)

        def evaluate() -> float:
            t0 = time.perf_counter()
            self.model.eval()
            with self.torch.no_grad(), self.autocast:
                means = [self.torch.stack([self.fwd(*self.batch(d))[1] for _ in range(eval_iters)]).mean().item()
                         for d in (self.train_ids, val)]
            self.model.train()
            dt = time.perf_counter() - t0
            if not all(map(math.isfinite, means)):
                raise FloatingPointError(f"non-finite eval loss {means}")
            return dt

        return evaluate


# ------------------------------------------------------------------------------------------ sections


class Bench:
    """Runs the sections, each guarded, collecting one row per implementation."""

    def __init__(self, args, plan: Plan):
        self.args, self.plan = args, plan
        self.rows: list[dict] = []
        self.info: dict = {}
        self.sections: tuple[str, ...] = ()
        self.t0 = time.perf_counter()

    def write_json(self, table: str | None = None) -> None:
        add_ratios(self.rows)
        doc = {"machine": self.info, "sections": list(self.sections), "total_s": time.perf_counter() - self.t0,
               "complete": table is not None, "rows": self.rows, "table": table}
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        self.args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    def row(self, section: str, impl: str, unit: str, **fields) -> dict:
        r = {"section": section, "impl": impl, "unit": unit, **fields}
        self.rows.append(r)
        if self.args.json:  # rewritten after every row: a run stopped by a timeout keeps what it measured
            self.write_json()
        print(f"[bench_gpu] {section} | {impl}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
            file=sys.stderr, flush=True)
        return r

    def guarded(self, section: str, impl: str, unit: str, fn: Callable[[], dict]) -> dict | None:
        """`fn()`'s fields as a row, or its error as a row; never raises. Past `--budget`, skipped."""
        t0 = time.perf_counter()
        if self.args.budget is not None and t0 - self.t0 > self.args.budget:
            self.row(section, impl, unit, error=f"skipped: past the --budget of {self.args.budget:.0f} s")
            return None
        try:
            fields = fn()
        except Exception as e:  # noqa: BLE001  (one failing part is a table entry; the others still run)
            traceback.print_exc(file=sys.stderr)
            first = (str(e).strip().splitlines() or [""])[0]
            self.row(section, impl, unit, error=f"{type(e).__name__}: {first[:160]}",
                     section_s=time.perf_counter() - t0)
            return None
        return self.row(section, impl, unit, section_s=time.perf_counter() - t0, **fields)

    # -- context

    def setup(self) -> None:
        import jax
        import torch

        self.jax, self.torch = jax, torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":  # nanoGPT's train.py and bench.py
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:  # a CPU run checks the script on tiny shapes, where more threads only contend
            torch.set_num_threads(1)
        self.compile = {"auto": self.device == "cuda", "yes": True, "no": False}[self.args.torch_compile]
        self.sdpa = self.args.torch_attention == "sdpa"
        self.train_ids, self.val_ids, self.vocab = load_corpus(self.args.data)
        self.on_gpu = jax.default_backend() == "gpu"
        from jaxgpt import mfu

        self.mfu = mfu
        self.info = {
            "cpu": cpu_name(),
            "jax_device": jax.devices()[0].device_kind,
            "jax_backend": jax.default_backend(),
            "torch_device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "python": platform.python_version(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "torch_compile": self.compile,
            "torch_attention": self.args.torch_attention,
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "tiny": self.args.tiny,
        }

    def training(self):
        if not hasattr(self, "_training"):
            self._training = import_training()
        return self._training

    def flops_per_token(self, shape: TrainShape, n_params: int) -> float:
        return self.mfu.flops_per_token(n_params, shape.n_layer, shape.n_head, shape.n_embd // shape.n_head,
                                        shape.block_size)

    def step_fields(self, stats: dict, shape: TrainShape, n_params: int, device_kind: str | None, **extra) -> dict:
        tokens = shape.batch_size * shape.block_size
        tok_s = tokens / stats["median_s"]
        peak_mfu = self.mfu.mfu(tok_s, self.flops_per_token(shape, n_params), device_kind=device_kind)
        return {**stats, "tokens_per_s": tok_s, **({} if peak_mfu is None else {"mfu": peak_mfu}), **extra}

    def train_section(self, section: str, shape: TrainShape, jax_variants: list[tuple[str, dict]],
                      torch_impl: str | None, vocab: int, train_ids) -> dict:
        """Trains every variant (sequentially: one at a time on the device); returns the live trainers."""
        windows, k = self.plan.windows, shape.steps_per_call
        trainers: dict = {}
        for impl, kwargs in jax_variants:
            def run(impl=impl, kwargs=kwargs):
                t = JaxTrainer(self.training(), shape, train_ids, vocab, **kwargs)
                stats = measure(lambda: t.window(k), windows, first=lambda: t.window(t.k))
                trainers[impl] = t
                return self.step_fields(stats, shape, t.n_params, None, steps_per_call=t.k)

            self.guarded(section, impl, "ms/step", run)
        if torch_impl:
            def run_torch():
                t = TorchTrainer(shape, train_ids, vocab, self.device, self.compile, self.sdpa)
                stats = measure(lambda: t.window(k), windows, first=lambda: t.window(1))
                trainers["torch"] = t
                kind = self.info["torch_device"] if self.device == "cuda" else "cpu"
                return self.step_fields(stats, shape, t.n_params, kind, steps_per_call=k)

            self.guarded(section, torch_impl, "ms/step", run_torch)
        return trainers

    def torch_label(self) -> str:
        return (f"torch reference{', sdpa' if self.sdpa else ''}{', compiled' if self.compile else ', eager'}, "
                f"bf16 autocast ({self.device})")

    def run_step_and_eval(self) -> None:
        shape = self.plan.shakespeare
        want_step, want_eval = "step" in self.sections, "eval" in self.sections
        variants = [("jaxgpt float32", {"dtype": "float32"}), ("jaxgpt bfloat16", {"dtype": "bfloat16"})]
        if not want_step:  # eval only: float32 and torch are trained (their step rows dropped) to be evaluated
            variants = variants[:1]
        trainers = self.train_section("shakespeare_char step", shape, variants, self.torch_label(), self.vocab,
                                      self.train_ids)
        if not want_step:
            self.rows = [r for r in self.rows if r["section"] != "shakespeare_char step"]
        if self.args.profile and "jaxgpt float32" in trainers:
            self.guarded("profile", "jaxgpt float32 + bfloat16", "trace", lambda: self.profile(trainers))
        if not want_eval:
            return
        section = f"evaluation ({self.plan.eval_iters} x 2 batches)"
        for impl in [name for name, _ in variants] + ["torch"]:
            label = self.torch_label() if impl == "torch" else impl
            t = trainers.get(impl)
            if t is None:
                self.row(section, label, "ms/eval", error="not run: no trained model (see its step row)")
                continue
            ev = t.make_eval(self.val_ids, self.plan.eval_iters) if impl == "torch" else t.make_eval(
                self.train_ids, self.val_ids, self.plan.eval_iters)
            self.guarded(section, label, "ms/eval", lambda ev=ev: measure(ev, max(2, self.plan.windows // 2)))

    def profile(self, trainers: dict) -> dict:
        """One call of each jaxgpt shakespeare_char variant inside `jax.profiler.trace`."""
        out = pathlib.Path(self.args.profile)
        with self.jax.profiler.trace(str(out), create_perfetto_trace=True):
            for impl in ("jaxgpt float32", "jaxgpt bfloat16"):
                if impl in trainers:
                    with self.jax.profiler.TraceAnnotation(impl):
                        trainers[impl].call()
        files = [p for p in out.rglob("*") if p.is_file()]
        return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "path": str(out)}

    def run_gpt2(self) -> None:
        import numpy as np

        shape = self.plan.gpt2
        tokens = np.random.default_rng(0).integers(0, 50257 if shape.vocab_size > 50257 else shape.vocab_size,
                                                   size=max(1 << 21, 64 * shape.block_size), dtype=np.uint16)
        impl = "cudnn" if self.on_gpu else "xla"  # configs/gpt2_124m.py's choice
        variants = [(f"jaxgpt bf16 {impl}, host-fed, 1 step/call (as shipped)",
                     {"dtype": "bfloat16", "attention_impl": impl, "host_fed": True}),
                    (f"jaxgpt bf16 {impl}, on-device, {shape.steps_per_call} steps/call",
                     {"dtype": "bfloat16", "attention_impl": impl})]
        self.train_section("GPT-2 124M step", shape, variants, self.torch_label(), shape.vocab_size, tokens)

    def run_sample(self) -> None:
        import numpy as np
        import torch
        from flax import nnx

        import jaxgpt
        from tests.reference import torch_gpt

        new, cfg = self.plan.sample_new_tokens, self.plan.sample_model
        model = jaxgpt.GPT(jaxgpt.GPTConfig(**cfg, bias=False), rngs=nnx.Rngs(0))
        torch.manual_seed(0)
        ref = torch_gpt.GPT(torch_gpt.TorchGPTConfig(**cfg, bias=False)).to(self.device).eval()
        if self.sdpa:
            use_sdpa(ref)
        seeds = iter(range(1 << 30))
        repeats = max(3, self.plan.windows)
        for batch in self.plan.sample_batches:
            section = f"sampling 1 + {new} tokens, batch {batch}"

            def jax_side(batch=batch):
                idx = np.zeros((batch, 1), np.int32)

                def once() -> float:
                    key = self.jax.random.PRNGKey(next(seeds))
                    out = timed(lambda: jaxgpt.generate(model, idx, new, key=key))  # returns host numpy: synced
                    return out / new

                first = once() * new
                stats = window_stats([once() for _ in range(repeats)])
                return {**stats, "first_s": first, "tokens_per_s": batch / stats["median_s"]}

            def torch_side(batch=batch):
                idx = torch.zeros((batch, 1), dtype=torch.long, device=self.device)

                def once() -> float:
                    with torch.autocast(self.device, dtype=torch.bfloat16):
                        return timed(lambda: torch_gpt.generate(ref, idx, new).cpu()) / new

                first = once() * new
                stats = window_stats([once() for _ in range(repeats)])
                return {**stats, "first_s": first, "tokens_per_s": batch / stats["median_s"]}

            self.guarded(section, "jaxgpt generate, KV cache, float32", "ms/token", jax_side)
            label = f"torch reference generate{', sdpa' if self.sdpa else ''}, no cache, bf16 autocast ({self.device})"
            self.guarded(section, label, "ms/token",
                         torch_side)

    def run_recipe(self) -> None:
        def run() -> dict:
            with tempfile.TemporaryDirectory(prefix="bench_gpu_recipe_") as tmp:
                out_dir = pathlib.Path(tmp) / "out"
                config = ROOT / "configs" / "shakespeare_char.py"
                cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config),
                       f"--config.data.path={self.args.data}", f"--config.out_dir={out_dir}",
                       *(f"--config.{o}" for o in (*self.plan.recipe_overrides, *self.args.recipe_set))]
                env = dict(ORIGINAL_ENV, JAXGPT_CACHE=str(pathlib.Path(tmp) / "cache"))
                if self.args.tiny:
                    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + TINY_XLA_FLAGS).strip()
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), ORIGINAL_ENV.get("PYTHONPATH")]))
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=self.args.recipe_timeout)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    raise RuntimeError(f"train.py exited {proc.returncode}: {tail}")
                records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in records if "val_loss" in r]
            best = min(evals, key=lambda r: r["val_loss"])
            steps = [r["ms_per_step"] for r in records if "ms_per_step" in r]
            return {"median_s": wall, "wall_s": wall, "best_val": best["val_loss"], "best_val_step": best["step"],
                    "final_val": evals[-1]["val_loss"], "final_step": evals[-1]["step"], "evals": len(evals),
                    "median_train_ms_per_step": statistics.median(steps) if steps else None,
                    "command": " ".join(cmd[1:])}

        self.guarded("recipe: train.py --config configs/shakespeare_char.py", "jaxgpt (subprocess, cold cache)",
                     "s/run", run)

    def run(self, sections: tuple[str, ...]) -> None:
        self.sections = sections
        if "recipe" in sections:  # first, before this process takes its share of the accelerator
            self.run_recipe()
        self.setup()
        if "step" in sections or "eval" in sections:
            self.run_step_and_eval()
        if "sample" in sections:
            self.run_sample()
        if "gpt2" in sections:  # last: the longest compiles
            self.run_gpt2()


# ------------------------------------------------------------------------------------------- output


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def add_ratios(rows: list[dict]) -> None:
    """Each jaxgpt row's median time over its section's torch row's (< 1: jaxgpt is faster)."""
    for r in rows:
        ref = next((o for o in rows if o["section"] == r["section"] and o["impl"].startswith("torch")
                    and "median_s" in o), None)
        if r["impl"].startswith("jaxgpt") and ref is not None and "median_s" in r:
            r["jaxgpt_over_torch"] = r["median_s"] / ref["median_s"]


def fmt_table(rows: list[dict], info: dict) -> str:
    scale = {"ms/step": 1e3, "ms/eval": 1e3, "ms/token": 1e3, "s/run": 1.0}
    lines = [
        f"jaxgpt on {info.get('jax_device', '?')} (jax {info.get('jax', '?')}, {info.get('jax_backend', '?')}), "
        f"torch {info.get('torch', '?')} on {info.get('torch_device', '?')}; host CPU {info.get('cpu', '?')}",
        *(["tiny shapes with XLA's backend optimisation off: a check of the script, not a measurement"]
          if info.get("tiny") else []),
        "",
        "| section | implementation | median | min - max | first call s | tokens/s | MFU | jaxgpt / torch | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['section']} | {r['impl']} | failed | | | | | | {r['error']} |")
            continue
        s = scale.get(r["unit"], 1.0)
        med = f"{r['median_s'] * s:.4g} {r['unit']}" if "median_s" in r else "-"
        spread = f"{r['min_s'] * s:.4g} - {r['max_s'] * s:.4g}" if "min_s" in r else "-"
        notes = []
        if "steps_per_call" in r:
            notes.append(f"{r['steps_per_call']} steps/call")
        if "best_val" in r:
            notes.append(f"best val {r['best_val']:.4f} (step {r['best_val_step']}), val {r['final_val']:.4f} at "
                         f"step {r['final_step']}, {r['evals']} evals")
        if "files" in r:
            notes.append(f"{r['files']} files, {r['bytes'] / 2**20:.1f} MiB in {r['path']}")
        cells = [
            r["section"], r["impl"], med, spread,
            f"{r['first_s']:.2f}" if "first_s" in r else "-",
            f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
            f"{r['mfu']:.1%}" if "mfu" in r else "-",
            f"{r['jaxgpt_over_torch']:.2f}x" if "jaxgpt_over_torch" in r else "-",
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path(DEFAULT_DATA),
                   help="tiny Shakespeare input.txt (default: $JAXGPT_SHAKESPEARE or ../shared/data/...)")
    p.add_argument("--json", type=pathlib.Path, help="also write the rows and the machine as JSON here")
    p.add_argument("--only", help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all "
                                  "but recipe)")
    p.add_argument("--recipe", action="store_true", help="also run the whole train.py shakespeare_char recipe")
    p.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the recipe run, e.g. model.dtype=bfloat16 (repeatable)")
    p.add_argument("--recipe-timeout", type=float, default=420.0, help="seconds before the recipe run is stopped")
    p.add_argument("--budget", type=float, help="seconds: parts that would start later are skipped (marked so)")
    p.add_argument("--torch-attention", choices=("sdpa", "reference"), default="sdpa",
                   help="the torch side's attention: nanoGPT's F.scaled_dot_product_attention (flash on GPUs; "
                        "default) or the reference's written-out softmax")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for every section (a CPU check in seconds)")
    p.add_argument("--windows", type=int, help="timed windows per measurement (default 5; 2 with --tiny)")
    p.add_argument("--torch-compile", choices=("auto", "yes", "no"), default="auto",
                   help="torch.compile the reference (auto: on CUDA only)")
    p.add_argument("--profile", type=pathlib.Path, help="write a jax.profiler trace of shakespeare_char steps here")
    p.add_argument("--xla-dump", type=pathlib.Path, help="XLA_FLAGS=--xla_dump_to=DIR: every compiled module's HLO")
    args = p.parse_args(argv)

    sections = tuple(SECTIONS[:-1]) if args.only is None else tuple(s.strip() for s in args.only.split(",") if s)
    for s in sections:
        if s not in SECTIONS:
            print(f"error: unknown section {s!r}: choose from {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
    if args.recipe and "recipe" not in sections:
        sections += ("recipe",)
    if not args.data.is_file():
        print(f"error: corpus {args.data} not found: pass --data PATH/TO/input.txt or set JAXGPT_SHAKESPEARE",
              file=sys.stderr)
        return 2
    args.data = args.data.resolve()
    if args.windows is not None and args.windows < 1:
        print(f"error: --windows must be a positive integer, got {args.windows}", file=sys.stderr)
        return 2
    for path in (args.json,):
        if path is not None and path.exists() and not path.is_file():
            print(f"error: --json {path} is not a file: pass a file path", file=sys.stderr)
            return 2

    # Before jax starts: the dump flag, and room on the accelerator for torch beside jax.
    if args.xla_dump:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.xla_dump} "
                                   "--xla_dump_hlo_as_text").strip()
    if args.tiny and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # a check of the script, not a measurement: halves the tiny run's compile time on a CPU
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TINY_XLA_FLAGS).strip()
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ and "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.45"

    plan = TINY if args.tiny else FULL
    if args.windows:
        plan = dataclasses.replace(plan, windows=args.windows)
    bench = Bench(args, plan)
    bench.run(sections)
    add_ratios(bench.rows)
    table = fmt_table(bench.rows, bench.info)
    print(table, flush=True)
    print(f"\ntotal {time.perf_counter() - bench.t0:.1f} s", flush=True)
    if args.json:
        bench.write_json(table)
    return 1 if any("error" in r for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
