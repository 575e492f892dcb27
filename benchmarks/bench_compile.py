"""Compile time of the training gradient vs depth: unrolled blocks vs `scan_layers` (and remat).

    PYTHONPATH=$PWD python benchmarks/bench_compile.py --depths 2 8 16

Times `jax.jit(value_and_grad(loss)).lower(...).compile()` of a small-width GPT (compile time depends
on the number of ops, not on their size), one fresh trace per row.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.model import GPT, GPTConfig, loss_fn


def compile_seconds(n_layer: int, scan_layers: bool, remat: bool) -> float:
    config = GPTConfig(
        block_size=64, vocab_size=65, n_layer=n_layer, n_head=4, n_embd=128, scan_layers=scan_layers, remat=remat
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    batch = jax.ShapeDtypeStruct((8, 65), jnp.int32)

    def loss(params, batch):
        return loss_fn(nnx.merge(graphdef, params)(batch[:, :-1]), batch[:, 1:])

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8, 16])
    args = parser.parse_args()
    print("| n_layer | unrolled (s) | scan_layers (s) | scan_layers + remat (s) |")
    print("|---|---|---|---|")
    for depth in args.depths:
        row = [compile_seconds(depth, scan, remat) for scan, remat in ((False, False), (True, False), (True, True))]
        print(f"| {depth} | " + " | ".join(f"{t:.2f}" for t in row) + " |", flush=True)


if __name__ == "__main__":
    main()
