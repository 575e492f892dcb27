"""What `bench_gpu.py` runs: its plans (the full shapes and the tiny ones a CPU checks in seconds) and the two
trainers it times, jaxgpt's step and the PyTorch reference's as nanoGPT's train.py runs it on a GPU.

Only jax, flax, optax, chex, numpy and torch are needed: the step builders (`jaxgpt.train_step`, `jaxgpt.optim`)
do not import ml_collections, which bare accelerator machines may lack.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable

from common import SHAKESPEARE_CHAR, TrainShape, build_jax_step, build_torch_model, torch_step

GPT2_124M = TrainShape(12, 1024, 12, 12, 768, 0.0, vocab_size=50304, learning_rate=6e-4, warmup_iters=2000,
                       lr_decay_iters=600000, min_lr=6e-5, beta2=0.95)  # configs/gpt2_124m.py, one micro-batch


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every shape and count of one run; `--tiny` swaps in one that runs on a CPU in seconds."""

    shakespeare: TrainShape
    shakespeare_k: int  # jaxgpt's steps per compiled call, and the torch window's length
    gpt2: TrainShape
    gpt2_k: int
    eval_iters: int
    sample_model: dict
    sample_new_tokens: int
    sample_batches: tuple[int, ...]
    windows: int
    recipe_overrides: tuple[str, ...]


FULL = Plan(
    shakespeare=SHAKESPEARE_CHAR, shakespeare_k=50, gpt2=GPT2_124M, gpt2_k=10, eval_iters=200,
    sample_model=dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
    sample_new_tokens=255, sample_batches=(1, 8), windows=5, recipe_overrides=(),
)
TINY = Plan(
    shakespeare=dataclasses.replace(SHAKESPEARE_CHAR, batch_size=4, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                    warmup_iters=10, lr_decay_iters=100),
    shakespeare_k=4,
    gpt2=dataclasses.replace(GPT2_124M, batch_size=2, block_size=64, n_layer=2, n_head=2, n_embd=64, vocab_size=512,
                             warmup_iters=10, lr_decay_iters=100),
    gpt2_k=3, eval_iters=4,
    sample_model=dict(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32),
    sample_new_tokens=15, sample_batches=(1, 8), windows=2,
    recipe_overrides=("max_iters=20", "eval_interval=10", "eval_iters=2", "batch_size=4", "steps_per_call=5",
                      "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                      "sample_tokens=8", "log_interval=5"),
)


def timed_eval(losses: Callable[[], list[float]]) -> float:
    """Seconds one evaluation takes (`losses()` returns host floats, so it has waited for the device); raises on a
    non-finite loss, which would make the timing meaningless."""
    t0 = time.perf_counter()
    values = losses()
    dt = time.perf_counter() - t0
    if not all(map(math.isfinite, values)):
        raise FloatingPointError(f"non-finite eval loss {values}")
    return dt


class JaxTrainer:
    """jaxgpt's training step on `shape`, as `jaxgpt.training.train` builds it on one device.

    `host_fed`: batches drawn on the host and sent with every call (`data.on_device=False`), one step
    per call; otherwise the token array lives on the device and each call runs `k` steps, drawing its
    batches inside.
    """

    def __init__(self, shape: TrainShape, k: int, train_ids, vocab_size: int, *, dtype: str,
                 attention_impl: str = "auto", host_fed: bool = False):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jaxgpt import sharding

        self.jax, self.shape, self.host_fed = jax, shape, host_fed
        self.mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
        step = build_jax_step(shape, vocab_size, dtype=dtype, attention_impl=attention_impl, mesh=self.mesh)
        self.chunk, self.params, self.opt_state = step.chunk, step.params, step.opt_state
        self.graphdef, self.n_params = step.graphdef, step.n_params
        self.key = jax.random.fold_in(jax.random.PRNGKey(1337), 1)
        self.k = 1 if host_fed else k
        self.host_ids = np.asarray(train_ids)
        self.data = jnp.asarray(self.host_ids, jnp.int32)
        self.step = 0

    def call(self) -> None:
        """One compiled call, synchronised as train.py does (it reads the losses back)."""
        from jaxgpt import host_feed

        a, data = self.step, self.data
        if self.host_fed:
            offsets = host_feed.step_offsets(self.key, a, a + self.k, grad_accum_steps=1,
                                              batch_size=self.shape.batch_size, block_size=self.shape.block_size,
                                              n_tokens=len(self.host_ids))
            data = host_feed.host_fed_batches(self.host_ids, offsets, self.shape.block_size, self.mesh)
        self.params, self.opt_state, metrics = self.chunk(self.params, self.opt_state, data, self.key,
                                                          self.jax.numpy.int32(a), n_steps=self.k)
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
        from jaxgpt import train_step

        jnp = self.jax.numpy
        estimate = train_step.make_estimate_loss(self.graphdef, batch_size=self.shape.batch_size,
                                                 block_size=self.shape.block_size, eval_iters=eval_iters,
                                                 mesh=self.mesh)
        splits = (jnp.asarray(train_ids, jnp.int32), jnp.asarray(val_ids, jnp.int32))
        counter = iter(range(1 << 30))

        def evaluate() -> float:
            step = jnp.int32(next(counter))
            return timed_eval(lambda: [float(x) for x in estimate(self.params, splits, self.key, step)])

        return evaluate


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

        self.torch, self.shape, self.device = torch, shape, device
        self.model = build_torch_model(shape, vocab_size, device)
        if sdpa:
            use_sdpa(self.model)
        self.n_params = self.model.get_num_params()
        betas = (shape.beta1, shape.beta2)
        groups = torch_gpt.configure_optimizers(self.model, shape.weight_decay, shape.learning_rate,
                                                betas).param_groups
        fused = {"fused": True} if device == "cuda" else {}
        self.opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                     lr=shape.learning_rate, betas=betas, **fused)
        self.fwd = torch.compile(self.model) if compile_model else self.model
        self.autocast = torch.autocast(device, dtype=torch.bfloat16)
        self.train_ids = torch.from_numpy(np.asarray(train_ids, np.int64)).to(device)
        self.offsets = torch.arange(shape.block_size + 1, device=device)
        self.step = 0

    def batch(self, data):
        ix = self.torch.randint(len(data) - self.shape.block_size, (self.shape.batch_size,), device=self.device)
        w = data[ix[:, None] + self.offsets]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def window(self, steps: int) -> float:
        """`steps` training steps, synchronised at the end; seconds per step."""
        t0 = time.perf_counter()
        self.model.train()
        for _ in range(steps):
            loss = torch_step(self.shape, self.model, self.fwd, self.opt, self.autocast, *self.batch(self.train_ids),
                              self.step)
            self.step += 1
        if not math.isfinite(loss.item()):  # .item() synchronises
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        return (time.perf_counter() - t0) / steps

    def make_eval(self, val_ids, eval_iters: int) -> Callable[[], float]:
        """nanoGPT's estimate_loss: eval mode, no_grad, autocast, `eval_iters` batches of each split."""
        import numpy as np

        val = self.torch.from_numpy(np.asarray(val_ids, np.int64)).to(self.device)

        def losses() -> list[float]:
            self.model.eval()
            with self.torch.no_grad(), self.autocast:
                means = [self.torch.stack([self.fwd(*self.batch(d))[1] for _ in range(eval_iters)]).mean().item()
                         for d in (self.train_ids, val)]
            self.model.train()
            return means

        return lambda: timed_eval(losses)
