"""Sampling speed: jaxgpt's KV-cache decoder (`jaxgpt.decode`) vs the lecture's loop vs PyTorch's generate.

One process, one machine, the same random weights in both frameworks (a shakespeare_char-shaped GPT:
6 layers, 6 heads, 384 wide, block 256, vocabulary 65). Cases: a 1-token prompt continued by 255
tokens (within the context) and by 500 (past it, where every step is a full-window forward), at
batch 1 and 8. Reports medians over repeats, speedups, the first call (compile included), and the
cached path's ms/token against the memory-traffic floor (parameter bytes / measured bandwidth: at
batch 1 every weight is read once per token).

    python benchmarks/bench_sample.py                      # prints the table, writes benchmarks/RESULTS.md
    python benchmarks/bench_sample.py --batches 1 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # common.py, when run by path

from common import ROOT, machine, timed  # noqa: E402

import jaxgpt  # noqa: E402
from tests.reference import torch_gpt  # noqa: E402

SHAPE = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)


def bandwidth_gbs(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory bandwidth from a large numpy copy (read + write), best of `repeats`."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best / 1e9


def median_time(fn, repeats: int) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def matmul_loop_ms(model, batch_size: int, steps: int = 255, repeats: int = 3) -> float:
    """ms per step of a compiled loop that does nothing but the blocks' weight matmuls.

    Each step multiplies a (batch, C) activation by every (K, N) kernel of the blocks in turn (about
    all of the parameter bytes), as a decode step does. This is the floor XLA's own matmul kernels set
    on this machine for one decode step: the cached decoder cannot be faster than it.
    """
    kernels = [k for k in jax.tree.leaves(nnx.state(model.h, nnx.Param)) if k.ndim == 2]
    C = model.config.n_embd

    @jax.jit
    def loop(x_BC, kernels):
        def step(_, x_BC):
            for k_KN in kernels:
                K, N = k_KN.shape
                y_BN = jnp.tile(x_BC, (1, K // C)) @ k_KN
                x_BC = x_BC + 1e-3 * y_BN.reshape(batch_size, N // C, C).sum(1)
            return x_BC

        return jax.lax.fori_loop(0, steps, step, x_BC)

    x_BC = jnp.ones((batch_size, C), jnp.float32)
    loop(x_BC, kernels).block_until_ready()
    return median_time(lambda: loop(x_BC, kernels).block_until_ready(), repeats) / steps * 1e3


def build_models():
    model = jaxgpt.GPT(jaxgpt.GPTConfig(**SHAPE), rngs=nnx.Rngs(0))
    torch_model = torch_gpt.GPT(torch_gpt.TorchGPTConfig(**SHAPE)).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in jaxgpt.to_torch_state_dict(model).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    assert all(k.endswith("attn.bias") for k in missing) and not unexpected, (missing, unexpected)
    return model, torch_model


def run(args) -> str:
    torch.set_num_threads(args.torch_threads)
    model, torch_model = build_models()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bw = bandwidth_gbs()
    floor_ms = param_bytes / (bw * 1e9) * 1e3
    rows = []
    seed = iter(range(10**6))
    matmul_ms = {B: matmul_loop_ms(model, B) for B in args.batches}
    for new in args.new_tokens:
        for B in args.batches:
            idx = np.zeros((B, 1), np.int32)

            def cached(idx=idx, new=new):
                return jaxgpt.generate(model, idx, new, key=jax.random.key(next(seed)))

            def uncached(idx=idx, new=new):
                return jaxgpt.sampling.generate(model, idx, new, key=jax.random.key(next(seed)))

            def reference(B=B, new=new):
                with torch.no_grad():
                    return torch_gpt.generate(torch_model, torch.zeros((B, 1), dtype=torch.long), new)

            first = timed(cached)  # compiles this (batch, length) shape
            t_cached = median_time(cached, args.repeats)
            uncached()  # compile outside the timing; its steady state is what is compared
            slow_repeats = max(1, args.repeats // 3)
            t_uncached = median_time(uncached, slow_repeats)
            t_torch = median_time(reference, slow_repeats)
            ms_tok = t_cached / new * 1e3
            rows.append(
                f"| 1 + {new} | {B} | {t_torch:.2f} | {t_uncached:.2f} | {t_cached:.3f} | "
                f"**{t_torch / t_cached:.1f}x** | {t_uncached / t_cached:.1f}x | {first:.2f} | "
                f"{ms_tok:.2f} | {matmul_ms[B]:.2f} | {floor_ms:.2f} |"
            )
            print(rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [
        "## Sampling",
        "",
        f"`python benchmarks/bench_sample.py` on {machine()}, {time.strftime('%Y-%m-%d')}; jax {jax.__version__}, "
        f"torch {torch.__version__} "
        f"({args.torch_threads} threads). A shakespeare_char-shaped GPT (6 layers, 6 heads, 384 wide, block 256, "
        f"{param_bytes / 1e6:.1f} MB of float32 parameters), random weights shared by both frameworks; "
        f"multinomial sampling at temperature 1. Times in seconds, median of {args.repeats} repeats "
        f"({max(1, args.repeats // 3)} for the uncached loops). Memory bandwidth {bw:.1f} GB/s (numpy copy), so "
        f"reading every weight once costs {floor_ms:.2f} ms: the memory floor per step. \"Matmul loop\" is a "
        "compiled loop doing only the blocks' weight matmuls at that batch size, once per step: the floor "
        "XLA's own matmul kernels set here (`matmul_loop_ms`). The load average was "
        f"{load:.1f} (2.0 is the benchmark's own two threads); the ratios, taken side by side, are the result.",
        "",
        "| prompt + new | batch | PyTorch reference | jaxgpt uncached | jaxgpt KV cache | vs PyTorch | vs uncached "
        "| first call (compile) | ms/step | matmul loop ms/step | memory floor ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        "",
        "500 new tokens run past the 256-token context: as nanoGPT, each token then conditions on the last 256 "
        "tokens at positions 0..255, so every cached key and value changes and each step is a full-window forward "
        "(compiled, in a loop of its own).",
    ]
    return "\n".join(header + rows + notes) + "\n"


def write_section(path: pathlib.Path, section: str) -> None:
    """Replaces the "## Sampling" section of `path` (or appends it), leaving other sections alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Sampling\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new_tokens", type=int, nargs="+", default=[255, 500])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--write", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    section = run(args)
    print(section)
    if not args.no_write:
        write_section(pathlib.Path(args.write), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
