"""Every program a jaxgpt run executes, compiled for the TPUs and GPUs users have, on a CPU without them.

For each target (`benchmarks/targets.py`: TPU v5e 1 chip as on Colab, v6e 1 chip, v5e 8 chips with the data and the
FSDP mesh, H100, A100, T4) and config, it compiles the training chunk, the evaluation, and the sampler's prefill and
decode step, and prints one table: HBM needed per chip against the chip's, XLA's FLOPs and bytes, the roofline bound
max(FLOPs / peak, bytes / bandwidth) as a time and as MFU, and on GPUs the kernels (cuBLAS, cuDNN, Pallas, Triton, other
fusions) and the converts to float32. Only a device measures a time (`benchmarks/gpu_check.sh`); these figures say
what will run and what bounds it.

Loops are counted once: the training chunk's figures are one optimizer step (one micro-batch), the evaluation's
one batch, the decode step's one token. On GPUs, XLA gives no cost analysis without a device: FLOPs are the same
program's on the TPU v5e (the math is the same) and bytes are each kernel's operands and result
(`targets.kernel_bytes`). Without a device XLA does not autotune, so GPU kernel choices are its defaults.

    python benchmarks/bench_targets.py --install .targets        # the compile-only packages (~2 GB), once
    python benchmarks/bench_targets.py --quick                    # tiny shapes, v5e-1, H100, T4 (~3 min on 2 cores)
    python benchmarks/bench_targets.py --json targets.json        # everything (long: GPT-2 compiles for minutes)
    python benchmarks/bench_targets.py --targets h100 --configs shakespeare_char --hlo /tmp/hlo
    python benchmarks/bench_targets.py --targets tpu-v5e-1,h100 --configs shakespeare_char_speedrun_gpu \\
        --dtypes bfloat16

The packages folder (`--packages`, default `.targets` in the checkout) is put on the path of a child process with
JAX_PLATFORMS=cpu; the environment's own JAX stays CPU-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import targets as targets_lib  # noqa: E402
from common import config_with  # noqa: E402

SHAKESPEARE_TRAIN_TOKENS = 1_003_854  # tiny Shakespeare's train split (90 % of 1,115,394 characters)


@dataclasses.dataclass
class Job:
    """One config compiled for one target: `mesh` is (data, fsdp), or None for all chips data-parallel."""

    label: str
    config: object
    mesh: tuple[int, int] | None = None
    train_tokens: int = SHAKESPEARE_TRAIN_TOKENS


def load(name: str, **overrides):
    """configs/<name>.py with `overrides` (`model__n_layer=2` for model.n_layer) and the corpus's vocabulary."""
    c = config_with(ROOT / "configs" / f"{name}.py", {k.replace("__", "."): v for k, v in overrides.items()})
    if c.model.vocab_size is None:
        c.model.vocab_size = 65  # tiny Shakespeare's characters
    return c


def jobs_for(target: targets_lib.Target, configs: list[str], quick: bool, gpt2_batch: int | None,
             dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[Job]:
    """The configs compiled for `target` in each of `dtypes` (bf16 only where the chip has bf16 units)."""
    dtypes = [d for d in dtypes if d == "float32" or target.peak_bf16]
    meshes = [(-1, 1), (1, target.chips)] if target.chips > 1 else [None]
    out = []
    for mesh in meshes:
        tag = "" if mesh is None else (" data" if mesh[1] == 1 else " fsdp")
        if quick:
            tiny = dict(model__n_layer=2, model__n_head=2, model__n_embd=128, model__block_size=128, batch_size=8,
                        eval_iters=2, steps_per_call=2, model__dropout=0.0)
            if not target.peak_bf16:  # a T4: what differs there is the attention without Triton (shakespeare_char's)
                t4_tiny = {**tiny, "model__dropout": 0.2, "model__dtype": "float32"}
                out.append(Job(f"tiny-dropout float32{tag}", load("shakespeare_char", **t4_tiny), mesh))
                continue
            out += [Job(f"tiny {d}{tag}", load("shakespeare_char", model__dtype=d, **tiny), mesh) for d in dtypes]
            # The modern recipe (every model switch and Muon) in the precision accelerators run it in.
            out.append(Job(f"tiny-speedrun {dtypes[-1]}{tag}",
                           load("shakespeare_char_speedrun_gpu", model__dtype=dtypes[-1], **tiny), mesh))
            # Attention dropout, as shakespeare_char trains: on a GPU, jaxgpt's fused kernels (flash_dropout).
            out += [Job(f"tiny-dropout {d}{tag}", load("shakespeare_char", model__dtype=d,
                                                        **{**tiny, "model__dropout": 0.2}), mesh) for d in dtypes]
            continue
        for name in (n for n in configs if n != "gpt2_124m"):
            out += [Job(f"{name} {d}{tag}", load(name, model__dtype=d), mesh) for d in dtypes]
        if "gpt2_124m" in configs and target.peak_bf16:
            batches = [12 * target.chips] + ([gpt2_batch] if gpt2_batch and target.chips == 1 else [])
            for b in batches:  # one micro-batch per step, as nanoGPT's bench.py times it
                out.append(Job(f"gpt2_124m b{b}{tag}", load("gpt2_124m", batch_size=b, grad_accum_steps=1,
                                                             eval_iters=20), mesh, train_tokens=0))
    return out


def lowered_programs(job: Job, devs: list) -> dict:
    """name -> `jax.stages.Lowered` for each program a run of `job.config` executes on `devs`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from jaxgpt import config as config_lib
    from jaxgpt import optim
    from jaxgpt import sharding as sharding_lib
    from jaxgpt.train_loop import recipe_train_chunk
    from jaxgpt.train_step import make_estimate_loss

    c = job.config
    data, fsdp = job.mesh or (-1, 1)
    mesh = sharding_lib.make_mesh(data, fsdp, devices=devs)
    scan = c.model.scan_layers
    graphdef, shapes = nnx.split(config_lib.model_shape(c, c.model.vocab_size))
    params = sharding_lib.sharded_shapes(shapes, mesh, scan)
    opt_state = sharding_lib.sharded_shapes(jax.eval_shape(optim.make_optimizer(c).init, shapes), mesh, scan)
    rep = NamedSharding(mesh, PartitionSpec())
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    step0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    B, T = c.batch_size, c.model.block_size

    def batches(n_lead: int) -> tuple:
        sds = jax.ShapeDtypeStruct((*([n_lead] if n_lead else []), B, T), jnp.int32,
                                   sharding=sharding_lib.batch_sharding(mesh, 3 if n_lead else 2, batch_axis=-2))
        return sds, sds

    chunk, numbers = recipe_train_chunk(graphdef, c, mesh), optim.recipe_numbers(c)
    estimate = make_estimate_loss(graphdef, batch_size=B, block_size=T, eval_iters=c.eval_iters, mesh=mesh)
    out = {}
    if c.data.on_device:
        tokens = jax.ShapeDtypeStruct((job.train_tokens,), jnp.int32, sharding=rep)
        out["train_chunk"] = chunk.lower(params, opt_state, tokens, key, step0, c.steps_per_call, numbers)
        out["evaluation"] = estimate.lower(params, (tokens, tokens), key, step0)
    else:  # the host feeds each step: (n_steps, grad_accum, B, T) and (eval_iters, B, T)
        x = jax.ShapeDtypeStruct((1, c.grad_accum_steps, B, T), jnp.int32,
                                 sharding=sharding_lib.batch_sharding(mesh, 4, batch_axis=-2))
        out["train_chunk"] = chunk.lower(params, opt_state, (x, x), key, step0, 1, numbers)
        out["evaluation"] = estimate.lower(params, (batches(c.eval_iters),) * 2, key, step0)

    # Sampling: one chip, batch 1, the blocks kept per layer (the cache is per layer).
    one = SingleDeviceSharding(devs[0])
    c1 = config_lib.from_dict(config_lib.to_dict(c))
    c1.model.scan_layers = False
    gd1, shapes1 = nnx.split(config_lib.model_shape(c1, c.model.vocab_size))
    p1 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes1)

    def prefill(params, idx_BT):
        model = nnx.merge(gd1, params)
        return model.decode(idx_BT, model.init_cache(idx_BT.shape[0]), 0)

    def decode(params, tok_B, pos, cache):
        return nnx.merge(gd1, params).decode(tok_B[:, None], cache, pos)

    prompt = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=one)
    cache = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                         jax.eval_shape(prefill, p1, prompt)[1])
    out["sample_prefill"] = jax.jit(prefill).trace(p1, prompt).lower()
    tok = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=one)
    pos = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
    out["sample_decode"] = jax.jit(decode, donate_argnums=3).trace(p1, tok, pos, cache).lower()
    del np
    return out


def measure(target: targets_lib.Target, job: Job, devs: list, hlo_dir: pathlib.Path | None,
            tpu_flops: dict, compiled_before: dict) -> list[dict]:
    """Compiles `job`'s programs for `target`; one row each (a failed compile is a row with its error).

    `compiled_before` (lowered program text -> compiled program, for this target) skips compiling a program again:
    configs that differ only in training (dropout, say) lower the same evaluation and sampler programs."""
    from jaxgpt import target as target_lib

    rows = []
    base = {"target": target.name, "config": job.label, "chips": target.chips,
            "hbm_gb": target.hbm_bytes / 1e9, "bandwidth_gbs": target.bandwidth / 1e9}
    bf16 = "bfloat16" in job.label or "gpt2" in job.label
    peak = target.peak_bf16 if bf16 else target.peak_f32
    try:
        with target_lib.compiling_for(devs):
            lowered = lowered_programs(job, devs)
    except Exception as e:  # noqa: BLE001 - a row, not a crash: the other targets still compile
        return [{**base, "program": "all", "compiled": False, "fits": False, "error": _one_line(e)}]
    config, dtype = job.label.split(" ")[:2]
    for name, low in lowered.items():
        row = {**base, "program": name, "peak_tflops": peak / 1e12}
        t0 = time.perf_counter()
        source = low.as_text()
        try:
            compiled = compiled_before.get(source) or low.compile()
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "compiled": False, "fits": False, "error": _one_line(e)})
            continue
        compiled_before[source] = compiled
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        m = compiled.memory_analysis()
        need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
                + m.generated_code_size_in_bytes)
        row.update(compiled=True, need_gb=need / 1e9, temp_gb=m.temp_size_in_bytes / 1e9,
                   fits=need <= target.hbm_bytes)
        text = compiled.as_text()
        if target.platform == "tpu":
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops, nbytes = cost.get("flops"), cost.get("bytes accessed")
            row["pallas"] = sum(1 for line in text.splitlines()  # jaxgpt's Pallas kernels, not XLA's own Mosaic ones
                                if 'custom_call_target="tpu_custom_call"' in line and "pallas_call" in line)
            tpu_flops[(config, dtype, name)] = tpu_flops[(config, name)] = flops  # the latter: any dtype's
        else:
            row.update(targets_lib.gpu_kernels(text))
            flops = tpu_flops.get((config, dtype, name), tpu_flops.get((config, name)))
            nbytes = targets_lib.kernel_bytes(text)
        row.update(gflops=flops and flops / 1e9, gbytes=nbytes / 1e9)
        if flops and nbytes:
            bound = max(flops / peak, nbytes / target.bandwidth)
            row.update(bound_ms=bound * 1e3, roofline_mfu=flops / peak / bound)
        if hlo_dir:
            hlo_dir.mkdir(parents=True, exist_ok=True)
            (hlo_dir / f"{target.name}.{job.label.replace(' ', '_')}.{name}.txt").write_text(text)
        rows.append(row)
    return rows


def _one_line(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return f"{type(e).__name__}: {lines[0][:300]}"


def gpt2_largest_batch(devs: list) -> int:
    """The largest multiple of 4 whose GPT-2 124M training step fits one chip's HBM (`devs`: one chip)."""
    from jaxgpt import target as target_lib

    def need(b: int) -> float:
        job = Job("gpt2", load("gpt2_124m", batch_size=b, grad_accum_steps=1, eval_iters=2), None, 0)
        with target_lib.compiling_for(devs):
            m = lowered_programs(job, devs)["train_chunk"].compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    hbm = targets_lib.TARGETS["tpu-v5e-1"].hbm_bytes
    a, b = need(4), need(12)  # memory grows linearly with the batch
    guess = int((hbm - a) / ((b - a) / 8) + 4) // 4 * 4
    while guess > 4 and need(guess) > hbm:
        guess -= 4
    return guess


FIELDS = [("target", "{}"), ("config", "{}"), ("program", "{}"), ("need_gb", "{:.2f}"), ("fits", "{}"),
          ("gflops", "{:.1f}"), ("gbytes", "{:.2f}"), ("bound_ms", "{:.3f}"), ("roofline_mfu", "{:.0%}"),
          ("kernels", "{}"), ("once", "{}"), ("pallas", "{}"), ("cublas", "{}"), ("cudnn", "{}"), ("triton", "{}"),
          ("f32_converts", "{}"), ("compile_s", "{}")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(f for f, _ in FIELDS) + " | error |\n|" + "---|" * (len(FIELDS) + 1) + "\n"
    body = ""
    for r in rows:
        cells = [fmt.format(r[f]) if r.get(f) is not None else "" for f, fmt in FIELDS]
        body += "| " + " | ".join(cells) + f" | {r.get('error', '')} |\n"
    return head + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, tpu-v5e-1, h100 and t4 only")
    p.add_argument("--targets", default="", help=f"comma-separated, of {','.join(targets_lib.TARGETS)}")
    p.add_argument("--configs", default="shakespeare_char,gpt2_124m",
                   help="comma-separated configs/ names (shakespeare_char_speedrun_gpu: the modern GPU recipe)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="model.dtype of each compiled config but GPT-2's")
    p.add_argument("--gpt2-batch", type=int, help="GPT-2's largest batch on a v5e chip, if known (else searched)")
    p.add_argument("--json", type=pathlib.Path, help="write the rows as a JSON list here")
    p.add_argument("--hlo", type=pathlib.Path, help="write each compiled program's HLO text into this folder")
    p.add_argument("--packages", type=pathlib.Path, default=ROOT / ".targets",
                   help="folder of the compile-only packages (default: .targets in the checkout)")
    p.add_argument("--install", type=pathlib.Path, metavar="FOLDER", help="install the compile-only packages, exit")
    p.add_argument("--tpu-only", action="store_true", help="with --install: libtpu alone (the TPU compiler)")
    a = p.parse_args(argv)
    if a.install:
        targets_lib.install(str(a.install), tpu_only=a.tpu_only)
        return 0
    if os.environ.get("JAXGPT_TARGETS_CHILD") != "1":  # run again with the compilers on the path, JAX on the CPU
        if not (a.packages / "libtpu").is_dir():
            print(f"error: no compile-only packages in {a.packages}: run `python benchmarks/bench_targets.py "
                  f"--install {a.packages}` first", file=sys.stderr)
            return 2
        env = {**targets_lib.compile_env(a.packages), "JAXGPT_TARGETS_CHILD": "1"}
        return subprocess.run([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env=env).returncode

    quick_targets = ["tpu-v5e-1", "h100", "t4"]
    names = a.targets.split(",") if a.targets else (quick_targets if a.quick else list(targets_lib.TARGETS))
    unknown = [n for n in names if n not in targets_lib.TARGETS]
    if unknown:
        print(f"error: unknown target {unknown[0]!r}: choose from {', '.join(targets_lib.TARGETS)}", file=sys.stderr)
        return 2
    names.sort(key=lambda n: targets_lib.TARGETS[n].platform != "tpu")  # TPU FLOPs first: the GPU rows reuse them
    configs = a.configs.split(",")
    missing = [n for n in configs if not (ROOT / "configs" / f"{n}.py").is_file()]
    if missing:
        print(f"error: no config configs/{missing[0]}.py: --configs takes names of files in configs/", file=sys.stderr)
        return 2
    if not set(a.dtypes.split(",")) <= {"float32", "bfloat16"}:
        print(f"error: --dtypes {a.dtypes!r}: choose from float32,bfloat16", file=sys.stderr)
        return 2
    rows: list[dict] = []
    tpu_flops: dict = {}
    gpt2_batch = a.gpt2_batch
    for name in names:
        target = targets_lib.TARGETS[name]
        try:
            devs = targets_lib.devices(target)
        except Exception as e:  # noqa: BLE001
            rows.append({"target": name, "program": "all", "config": "", "compiled": False, "fits": False,
                         "error": _one_line(e)})
            continue
        if name == "tpu-v5e-1" and not a.quick and "gpt2_124m" in configs and gpt2_batch is None:
            gpt2_batch = gpt2_largest_batch(devs)
        compiled_before: dict = {}  # this target's programs only: they are let go with the next target
        for job in jobs_for(target, configs, a.quick, gpt2_batch, tuple(a.dtypes.split(","))):
            print(f"compiling {name}: {job.label}", file=sys.stderr, flush=True)
            rows += measure(target, job, devs, a.hlo, tpu_flops, compiled_before)
            if a.json:  # rewritten after every config: a long run keeps what it compiled
                a.json.write_text(json.dumps(rows, indent=1))
    import jax

    info = (f"jax {jax.__version__}; peaks per chip (TFLOP/s bf16 / float32, GB/s): "
            + "; ".join(f"{t.name} {f'{t.peak_bf16 / 1e12:g}' if t.peak_bf16 else 'no bf16'} / {t.peak_f32 / 1e12:g}, "
                        f"{t.bandwidth / 1e9:g}" for t in targets_lib.TARGETS.values() if t.name in names))
    print(info + "\n\n" + table(rows))
    failed = [r for r in rows if not r["compiled"]]
    for r in failed:
        print(f"error: {r['target']} {r['config']} {r['program']} did not compile: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
