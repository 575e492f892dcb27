"""What the benchmarks share: the machine's description, timing, the corpus, the training shapes, and jaxgpt's and
the PyTorch reference's training step built the same way for every benchmark that times one.

jax and torch are imported inside the functions, never at import time: `bench_gpu.py` and `bench_train.py` set
XLA_FLAGS (and the CPU device count) after parsing their arguments, before JAX starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The corpus: $JAXGPT_SHAKESPEARE, else the shared copy beside the checkout (as CI lays it out).
DEFAULT_DATA = pathlib.Path(os.environ.get("JAXGPT_SHAKESPEARE")
                            or ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")


# ------------------------------------------------------------------------------------------------------- machine


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """'<CPU model>, <n> cores': the line every results table names its host with."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


# -------------------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` takes (the caller makes sure it waits for the device)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def window_stats(per_unit: list[float]) -> dict:
    """Median and spread (seconds per unit) of timed windows."""
    return {"median_s": statistics.median(per_unit), "min_s": min(per_unit), "max_s": max(per_unit),
            "windows": len(per_unit)}


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


# ------------------------------------------------------------------------------------------------ shapes, corpus


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """A training benchmark's model and optimiser recipe (nanoGPT's AdamW, schedule and clipping).

    Its attributes are the ones `jaxgpt.optim.make_optimizer` reads from a training config, so it serves as one.
    """

    batch_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    vocab_size: int | None = None  # None: the corpus's character vocabulary
    learning_rate: float = 1e-3
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    decay_lr: bool = True

    def model_args(self, vocab_size: int | None = None) -> dict:
        """GPTConfig / TorchGPTConfig arguments (no biases, as nanoGPT's shakespeare_char recipes)."""
        return dict(vocab_size=vocab_size or self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=False)


# nanoGPT's config/train_shakespeare_char.py, and its CPU variant (the README's recipe; configs/*.py).
SHAKESPEARE_CHAR = TrainShape(64, 256, 6, 6, 384, 0.2)
SHAKESPEARE_CHAR_CPU = TrainShape(12, 64, 4, 4, 128, 0.0, lr_decay_iters=2000)


def load_corpus(path: str | os.PathLike) -> tuple:
    """The corpus's character ids split as `jaxgpt.data` splits them: (train, val, vocab_size)."""
    from jaxgpt.data import load_dataset

    dataset = load_dataset(path)
    return dataset.train, dataset.val, dataset.vocab_size


def config_with(path: str | os.PathLike, overrides: dict) -> object:
    """A config file (`jaxgpt.config.load_config_file`) with dotted overrides applied: {"model.n_layer": 2}."""
    from jaxgpt import config as config_lib

    config = config_lib.load_config_file(path)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def flops_per_token(shape: TrainShape, vocab_size: int) -> float:
    """nanoGPT's training FLOPs per token (`jaxgpt.mfu.flops_per_token`) for the shape's model."""
    from flax import nnx

    import jaxgpt
    from jaxgpt import mfu

    model = nnx.eval_shape(lambda: jaxgpt.GPT(jaxgpt.GPTConfig(**shape.model_args(vocab_size)), rngs=nnx.Rngs(0)))
    return mfu.flops_per_token(model.num_params(), shape.n_layer, shape.n_head, shape.n_embd // shape.n_head,
                               shape.block_size)


# ---------------------------------------------------------------------------------------------------- the steps


def build_jax_step(shape: TrainShape, vocab_size: int, *, dtype: str = "float32", attention_impl: str = "auto",
                   remat: bool = False, mesh=None) -> types.SimpleNamespace:
    """jaxgpt's training step on `shape`, as `jaxgpt.training.train` builds it.

    Returns a namespace: `chunk(params, opt_state, data, key, step0, n_steps=K)` (`jaxgpt.train_step.make_train_chunk`:
    K AdamW steps in one compiled call, params and optimiser state donated), `params`, `opt_state` (on `mesh` when
    given), `graphdef` and `n_params`. `remat`: the model's `scan_layers` + `remat` (one scanned block, recomputed in
    the backward); `dtype` "bfloat16": mixed precision, float32 parameters.
    """
    from flax import nnx

    import jaxgpt
    from jaxgpt import optim, sharding, train_step

    config = jaxgpt.GPTConfig(**shape.model_args(vocab_size), dtype=dtype, attention_impl=attention_impl,
                              scan_layers=remat, remat=remat)
    model = jaxgpt.GPT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optim.make_optimizer(shape)
    opt_state = tx.init(params)
    if mesh is not None:
        params, opt_state = sharding.shard_params((params, opt_state), mesh, remat)
    chunk = train_step.make_train_chunk(graphdef, tx, batch_size=shape.batch_size, block_size=shape.block_size,
                                        use_dropout=shape.dropout > 0, scan_layers=remat, mesh=mesh)
    return types.SimpleNamespace(chunk=chunk, params=params, opt_state=opt_state, graphdef=graphdef,
                                 n_params=model.num_params())


def build_torch_model(shape: TrainShape, vocab_size: int, device: str = "cpu"):
    """The PyTorch reference GPT (tests/reference/torch_gpt.py) of `shape`, seeded, in train mode."""
    import torch

    from tests.reference import torch_gpt

    torch.manual_seed(0)
    return torch_gpt.GPT(torch_gpt.TorchGPTConfig(**shape.model_args(vocab_size))).to(device).train()


def torch_step(shape: TrainShape, model, forward, opt, autocast, x, y, step: int):
    """One step of nanoGPT's train.py loop: the learning rate set for `step`, forward under `autocast`, backward,
    global-norm clip, AdamW, gradients freed. Returns the loss tensor (not synchronised)."""
    import torch

    from tests.reference import torch_gpt

    lr = torch_gpt.get_lr(step, shape.learning_rate, shape.warmup_iters, shape.lr_decay_iters, shape.min_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast:
        _, loss = forward(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), shape.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
