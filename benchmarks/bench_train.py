"""Side-by-side training-step benchmark: jaxgpt against the PyTorch reference on the same machine.

One process, alternating rounds, same config, same batches, same optimiser recipe (nanoGPT's AdamW:
warmup + cosine learning rate, weight decay 0.1 on >= 2-D parameters, betas (0.9, 0.99), global-norm
clip 1.0). Implementations:

    jax        jaxgpt's training step (`jaxgpt.train_step.make_train_chunk`), one step per call, host batches
    jax_scan   the same function running K steps per call (`lax.scan`) with batches drawn on the device
               from the whole token array (what train.py does)
    jax_remat  as jax, with `model.scan_layers` + `model.remat` (recompute each block in the backward)
    torch      tests/reference/torch_gpt.py in eager mode (`configure_optimizers`, nanoGPT's loop)
    torch_compile  the same model wrapped in `torch.compile` (its compile time is reported as first step)
  mixed precision, not in the default set (bf16 matmuls change the numerics; worth it on CPUs with bf16 units):
    jax_scan_bf16  jax_scan with `model.dtype="bfloat16"` (float32 parameters and optimiser)
    torch_bf16     torch eager under `torch.autocast("cpu", dtype=torch.bfloat16)`
  a CPU's cores as two devices, not in the default set:
    jax_scan_2cpu  jax_scan data-parallel over 2 CPU devices, half the batch each (`mesh.cpu_devices=2`, as the
                   shakespeare_char_cpu config does); the process then has 2 CPU devices, the other rows use one
  another attention, not in the default set:
    jax_scan_xla_attention  jax_scan with `model.attention_impl="xla"` (`jax.nn.dot_product_attention`), for a
                   shape whose recipe runs the lecture's attention (shakespeare_char_cpu, as its config does)

Reported per shape: median ms/step, tokens/s, ratios against torch eager and compiled, first-step time
(compile included), peak memory (RSS growth of a fresh subprocess over its first steps; for jax also
XLA's own buffer plan) and achieved GFLOP/s with nanoGPT's FLOPs-per-token estimate (`jaxgpt.mfu`).

    PYTHONPATH=$PWD python benchmarks/bench_train.py                       # both CPU shapes, ~5 min
    PYTHONPATH=$PWD python benchmarks/bench_train.py --shapes shakespeare_char_cpu --rounds 3
    PYTHONPATH=$PWD python benchmarks/bench_train.py --write benchmarks/RESULTS.md

The JAX rows time the library's own step, so a change there shows here. `--xla-flags` sets XLA_FLAGS
before jax starts (jax is imported only after argument parsing), to try XLA CPU flags side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # common.py, when run by path

from common import (
    DEFAULT_DATA,
    ROOT,
    SHAKESPEARE_CHAR,
    SHAKESPEARE_CHAR_CPU,
    TrainShape,
    build_jax_step,
    build_torch_model,
    flops_per_token,
    load_corpus,
    machine,
    torch_step,
)


@dataclasses.dataclass(frozen=True)
class Timed:
    """A benchmark shape and its timing loop: `rounds` x `steps` per implementation, `scan_k` steps per scanned call."""

    shape: TrainShape
    rounds: int
    steps: int
    scan_k: int
    attention_impl: str  # the jax rows' model.attention_impl: what the shape's config in configs/ sets


SHAPES = {
    "shakespeare_char_cpu": Timed(SHAKESPEARE_CHAR_CPU, rounds=5, steps=20, scan_k=20, attention_impl="reference"),
    "shakespeare_char": Timed(SHAKESPEARE_CHAR, rounds=3, steps=2, scan_k=2, attention_impl="auto"),
}
DEFAULT_IMPLS = ("jax", "jax_scan", "jax_remat", "torch", "torch_compile")
IMPLS = (*DEFAULT_IMPLS, "jax_scan_bf16", "torch_bf16", "jax_scan_xla_attention", "jax_scan_2cpu")


def host_batches(tokens, shape: TrainShape, n: int, seed: int = 0) -> list:
    """n fixed (x, y) int32 numpy batches, shared by every implementation."""
    import numpy as np

    from jaxgpt.data import windows

    rng = np.random.default_rng(seed)
    return [windows(tokens, rng.integers(0, len(tokens) - shape.block_size, shape.batch_size), shape.block_size)
            for _ in range(n)]


# ----------------------------------------------------------------------------------------------- jax


class JaxRunner:
    """jax: one step per call on host batches (as `data.on_device=False`); jax_scan: K steps per call,
    batches drawn on the device (train.py's default); jax_remat: as jax, with scan_layers + remat;
    jax_scan_bf16: as jax_scan, with model.dtype="bfloat16" (bf16 matmuls, float32 parameters);
    jax_scan_xla_attention: as jax_scan, with model.attention_impl="xla"; jax_scan_2cpu: as jax_scan, data-parallel
    over 2 CPU devices (the process must have them: `sharding.use_cpu_devices`)."""

    def __init__(self, timed: Timed, tokens, vocab_size: int, batches, impl: str):
        import jax
        import jax.numpy as jnp

        from jaxgpt import sharding

        self.jax, self.scan = jax, impl.startswith("jax_scan")
        self.k = timed.scan_k if self.scan else 1
        mesh = None
        self.data = jnp.asarray(tokens, jnp.int32)
        if impl == "jax_scan_2cpu":
            mesh = sharding.make_mesh(data=2, devices=jax.devices("cpu")[:2])
            self.data = jax.device_put(self.data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        step = build_jax_step(timed.shape, vocab_size, remat=impl == "jax_remat", mesh=mesh,
                              dtype="bfloat16" if impl.endswith("_bf16") else "float32",
                              attention_impl="xla" if impl == "jax_scan_xla_attention" else timed.attention_impl)
        self.chunk, self.params, self.opt_state = step.chunk, step.params, step.opt_state
        self.batches = [(jnp.asarray(x)[None, None], jnp.asarray(y)[None, None]) for x, y in batches]
        self.key = jax.random.key(1)
        self.i = 0

    def _data(self):
        return self.data if self.scan else self.batches[self.i % len(self.batches)]

    def memory_plan(self) -> int:
        """XLA's buffer plan for one call: arguments + outputs + temporaries - aliased (donated)."""
        lowered = self.chunk.lower(self.params, self.opt_state, self._data(), self.key, 0, n_steps=self.k)
        m = lowered.compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    def call(self) -> float:
        """Runs one call; returns seconds per train step."""
        t0 = time.perf_counter()
        self.params, self.opt_state, metrics = self.chunk(self.params, self.opt_state, self._data(), self.key,
                                                          self.i * self.k, n_steps=self.k)
        metrics["loss"].block_until_ready()
        self.i += 1
        return (time.perf_counter() - t0) / self.k


# --------------------------------------------------------------------------------------------- torch


class TorchRunner:
    """torch: the reference in eager mode with nanoGPT's loop; torch_compile: wrapped in `torch.compile` (its compile
    time shows as the first step); torch_bf16: eager under CPU autocast (bf16 matmuls, float32 parameters)."""

    k = 1

    def __init__(self, shape: TrainShape, vocab_size: int, batches, compiled: bool, bf16: bool = False):
        import torch

        from tests.reference import torch_gpt

        self.shape = shape
        self.model = build_torch_model(shape, vocab_size)
        self.opt = torch_gpt.configure_optimizers(self.model, shape.weight_decay, shape.learning_rate,
                                                  (shape.beta1, shape.beta2))
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        self.batches = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]
        self.i = 0

    def call(self) -> float:
        """Runs one step; returns its seconds (`.item()` waits for it)."""
        t0 = time.perf_counter()
        x, y = self.batches[self.i % len(self.batches)]
        torch_step(self.shape, self.model, self.fwd, self.opt, self.autocast, x, y, self.i).item()
        self.i += 1
        return time.perf_counter() - t0


def make_runner(impl: str, timed: Timed, tokens, vocab_size: int, batches):
    if impl.startswith("jax"):
        return JaxRunner(timed, tokens, vocab_size, batches, impl)
    import torch

    torch.set_num_threads(2)
    return TorchRunner(timed.shape, vocab_size, batches, compiled=impl == "torch_compile", bf16=impl == "torch_bf16")


# ------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Sets this process's peak RSS (VmHWM) back to its current RSS (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM of /proc/self/status: the peak RSS since the start or the last `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(impl: str, shape_name: str) -> dict:
    """In this (fresh) process: peak RSS growth over setup-to-after-3-calls, excluding imports."""
    timed = SHAPES[shape_name]
    tokens, _, vocab_size = load_corpus(DEFAULT_DATA)
    batches = host_batches(tokens, timed.shape, 2)
    import jax  # noqa: F401  (import cost is not the step's memory)
    import torch  # noqa: F401

    before = rss_bytes()
    reset_peak_rss()  # the imports' own peak would otherwise hide the step's
    runner = make_runner(impl, timed, tokens, vocab_size, batches)
    for _ in range(3):
        runner.call()
    return {"peak_rss_delta": peak_rss_bytes() - before}


def run_probe(impl: str, shape_name: str) -> dict:
    cmd = [sys.executable, __file__, "--probe", impl, "--shapes", shape_name]
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # carries XLA_FLAGS
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": str(e).splitlines()[0][:80]}


# --------------------------------------------------------------------------------------------- main


def bench_shape(name: str, impls: list[str], rounds: int, steps: int, memory: bool) -> list[dict]:
    timed = SHAPES[name]
    shape = timed.shape
    tokens, _, vocab_size = load_corpus(DEFAULT_DATA)
    batches = host_batches(tokens, shape, 8)
    rows: dict[str, dict] = {}
    runners = {}
    for impl in impls:  # set up and take the first (compiling) step of each
        row = rows.setdefault(impl, {"impl": impl, "times": []})
        try:
            t0 = time.perf_counter()
            runner = make_runner(impl, timed, tokens, vocab_size, batches)
            t1 = time.perf_counter()
            runner.call()
            row["setup_s"], row["first_s"] = t1 - t0, time.perf_counter() - t1
            runners[impl] = runner
            if impl.startswith("jax"):
                row["xla_plan"] = runner.memory_plan()
        except Exception as e:  # noqa: BLE001  (a failing backend is a table entry, not a crash)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            print(f"[{name}] {impl} failed: {row['error']}", file=sys.stderr)
    order = list(runners)
    for r in range(rounds):  # alternate, rotating the order so no implementation always goes first
        for impl in order[r % len(order) :] + order[: r % len(order)]:
            runner = runners[impl]
            calls = max(1, steps // runner.k)
            rows[impl]["times"] += [runner.call() for _ in range(calls)]
        print(f"[{name}] round {r + 1}/{rounds} done", file=sys.stderr)
    tokens_per_step = shape.batch_size * shape.block_size
    fpt = flops_per_token(shape, vocab_size)
    for row in rows.values():
        if row["times"]:
            row["ms"] = 1e3 * statistics.median(row["times"])
            row["tok_s"] = tokens_per_step / (row["ms"] / 1e3)
            row["gflops"] = fpt * row["tok_s"] / 1e9
        if memory and "error" not in row:
            row.update(run_probe(row["impl"], name))
    return list(rows.values())


def fmt_table(name: str, rows: list[dict]) -> str:
    ref = {r["impl"]: r.get("tok_s") for r in rows}
    timed = SHAPES[name]
    shape = timed.shape
    lines = [
        f"**{name}** (batch {shape.batch_size}, block {shape.block_size}, {shape.n_layer} layers, "
        f"{shape.n_head} heads, {shape.n_embd} wide, dropout {shape.dropout}; K={timed.scan_k} for jax_scan; "
        f"attention_impl {timed.attention_impl!r})",
        "",
        "| impl | median ms/step | tokens/s | vs torch eager | vs torch.compile | setup s | first step s | "
        "peak RSS growth MiB | XLA buffers MiB | GFLOP/s | steps timed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['impl']} | failed: {r.get('error', '?')} | | | | | | | | | |")
            continue

        def ratio(other, r=r):
            return f"{r['tok_s'] / ref[other]:.2f}x" if ref.get(other) else "n/a"

        mem = f"{r['peak_rss_delta'] / 2**20:.0f}" if "peak_rss_delta" in r else r.get("error", "-")
        plan = f"{r['xla_plan'] / 2**20:.0f}" if "xla_plan" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {ratio('torch')} | {ratio('torch_compile')} | "
            f"{r['setup_s']:.2f} | {r['first_s']:.2f} | {mem} | {plan} | {r['gflops']:.1f} | {len(r['times'])} |"
        )
    return "\n".join(lines)


def versions() -> str:
    """The machine, jax and torch versions, XLA_FLAGS and the date: the line above every table."""
    import jax
    import torch

    return (f"{machine()}, {platform.system()}; jax {jax.__version__}, torch {torch.__version__} (2 threads); "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {time.strftime('%Y-%m-%d')}")


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20, dtype: str = "float32") -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of one (m, k) @ (k, n) matmul in torch (2 threads) and in jax (jit):
    the machine's ceiling for the dots that make up a training step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ta, tb = torch.from_numpy(a).to(getattr(torch, dtype)), torch.from_numpy(b).to(getattr(torch, dtype))
    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    # bf16: accumulate in float32 as jaxgpt's layers do (torch's bf16 GEMMs accumulate in float32 too)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    dot(ja, jb).block_until_ready()
    best = {"torch": float("inf"), "jax": float("inf")}
    for _ in range(repeats):
        for name, fn in (("torch", lambda: torch.mm(ta, tb)), ("jax", lambda: dot(ja, jb).block_until_ready())):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: 2 * m * k * n / t / 1e9 for name, t in best.items()}


def matmul_ceiling() -> str:
    """One line on what the machine's float32 matmuls reach: large, and at the small shape's MLP size."""
    big = matmul_gflops(2048, 2048, 2048, repeats=5)
    small = matmul_gflops(768, 128, 512)
    big16 = matmul_gflops(2048, 2048, 2048, repeats=5, dtype="bfloat16")
    return (f"float32 matmul ceiling, best of repeats: 2048x2048x2048 torch {big['torch']:.0f}, jax {big['jax']:.0f} "
            f"GFLOP/s; 768x128x512 (the small shape's MLP) torch {small['torch']:.0f}, jax {small['jax']:.0f} GFLOP/s; "
            f"bfloat16 2048x2048x2048 torch {big16['torch']:.0f}, jax {big16['jax']:.0f} GFLOP/s; CPU bf16 "
            f"instructions (avx512_bf16/amx_bf16): {cpu_bf16() or 'none'}")


def cpu_bf16() -> str:
    """The CPU's bf16 instruction-set flags from /proc/cpuinfo (empty where it has none or it is unreadable)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags)


def write_results(path: pathlib.Path, text: str) -> None:
    """Replaces the '### Latest run' block under '## Training step', keeping the rest of the file."""
    marker_start, marker_end = "<!-- bench_train:start -->", "<!-- bench_train:end -->"
    block = f"{marker_start}\n{text}\n{marker_end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n## Training step\n\n"
    if marker_start in old:
        head, rest = old.split(marker_start, 1)
        new = head + block + rest.split(marker_end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--rounds", type=int, help="alternating rounds (default per shape)")
    p.add_argument("--steps", type=int, help="train steps per implementation per round (default per shape)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    p.add_argument("--xla-flags", help="set XLA_FLAGS to this before jax starts (default: the environment's)")
    p.add_argument("--write", type=pathlib.Path, help="write the table into this markdown file (RESULTS.md)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    shapes = args.shapes.split(",")
    impls = args.impls.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}: choose from {', '.join(SHAPES)}")
    for i in impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}: choose from {', '.join(IMPLS)}")
    if not DEFAULT_DATA.exists():
        p.error(f"tiny Shakespeare not found at {DEFAULT_DATA}: set JAXGPT_SHAKESPEARE")
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags
    if "jax_scan_2cpu" in impls or args.probe == "jax_scan_2cpu":  # before jax starts
        from jaxgpt.sharding import use_cpu_devices

        use_cpu_devices(2)

    if args.probe:
        print(json.dumps(memory_probe(args.probe, shapes[0])))
        return 0

    ceiling = matmul_ceiling()
    print(ceiling + "\n", flush=True)
    tables = []
    for s in shapes:
        timed = SHAPES[s]
        rows = bench_shape(s, impls, args.rounds or timed.rounds, args.steps or timed.steps, not args.no_memory)
        tables.append(fmt_table(s, rows))
        print(tables[-1] + "\n", flush=True)
    text = (
        f"Machine: {versions()}.\n{ceiling}.\n"
        "Compare rows of one run (taken alternating in one process), not numbers across runs.\n\n" + "\n\n".join(tables)
    )
    if args.write:
        write_results(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
