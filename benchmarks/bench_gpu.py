"""Accelerator benchmark: jaxgpt against the PyTorch reference on one GPU, every GPU measurement in one run.

One command, one table (markdown on stdout) and, with `--json PATH`, the same rows as JSON. Sections:

    step      shakespeare_char training step (batch 64 x 256, 6 layers x 384, dropout 0.2, nanoGPT's AdamW:
              warmup + cosine, weight decay 0.1 on >= 2-D parameters, betas (0.9, 0.99), clip 1.0):
              jaxgpt float32 and bfloat16 (`train_step.make_train_chunk`, 50 steps per call, batches drawn on
              the device, as `configs/shakespeare_char.py` trains; on a GPU attention dropout runs in
              `jaxgpt.flash_dropout`'s kernels, and a bfloat16 row with `attention_impl='xla'` times the step
              without them, the (T, T) weights in memory) and the PyTorch reference
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
    recipe    (`--recipe`) `python train.py --config configs/<recipe>.py` as a subprocess, with a cold compilation
              cache, for the modern recipe (shakespeare_char_speedrun_gpu, 2500 steps) and then nanoGPT's
              (shakespeare_char, 5000): process wall time, best and final val from its metrics.jsonl, and the
              step and seconds at which val first reached `--recipe-target` (nanoGPT's 1.47)

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
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # common.py, when run by path

from common import DEFAULT_DATA, ROOT, TrainShape, cpu_name, flops_per_token, load_corpus, measure, timed, window_stats
from gpu_programs import FULL, TINY, JaxTrainer, Plan, TorchTrainer, use_sdpa

TINY_XLA_FLAGS = "--xla_backend_optimization_level=0"
SECTIONS = ("step", "eval", "gpt2", "sample", "recipe")
RECIPES = ("shakespeare_char_speedrun_gpu", "shakespeare_char")  # the modern recipe first: it is the shorter
ORIGINAL_ENV = dict(os.environ)  # the recipe subprocess runs in the user's environment, not the tweaks below


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
        self.compile = self.device == "cuda"  # torch.compile as nanoGPT uses it; on a CPU the tiny check skips it
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

    def step_fields(self, stats: dict, shape: TrainShape, vocab: int, device_kind: str | None, **extra) -> dict:
        tok_s = shape.batch_size * shape.block_size / stats["median_s"]
        peak_mfu = self.mfu.mfu(tok_s, flops_per_token(shape, vocab), device_kind=device_kind)
        return {**stats, "tokens_per_s": tok_s, **({} if peak_mfu is None else {"mfu": peak_mfu}), **extra}

    def train_section(self, section: str, shape: TrainShape, k: int, jax_variants: list[tuple[str, dict]],
                      torch_impl: str | None, vocab: int, train_ids) -> dict:
        """Trains every variant (sequentially: one at a time on the device), `k` steps per window; returns the live
        trainers."""
        windows = self.plan.windows
        trainers: dict = {}
        for impl, kwargs in jax_variants:
            def run(impl=impl, kwargs=kwargs):
                t = JaxTrainer(shape, k, train_ids, vocab, **kwargs)
                stats = measure(lambda: t.window(k), windows, first=lambda: t.window(t.k))
                trainers[impl] = t
                return self.step_fields(stats, shape, vocab, None, steps_per_call=t.k)

            self.guarded(section, impl, "ms/step", run)
        if torch_impl:
            def run_torch():
                t = TorchTrainer(shape, train_ids, vocab, self.device, self.compile, self.sdpa)
                stats = measure(lambda: t.window(k), windows, first=lambda: t.window(1))
                trainers["torch"] = t
                kind = self.info["torch_device"] if self.device == "cuda" else "cpu"
                return self.step_fields(stats, shape, vocab, kind, steps_per_call=k)

            self.guarded(section, torch_impl, "ms/step", run_torch)
        return trainers

    def torch_label(self) -> str:
        return (f"torch reference{', sdpa' if self.sdpa else ''}{', compiled' if self.compile else ', eager'}, "
                f"bf16 autocast ({self.device})")

    def run_step_and_eval(self) -> None:
        shape = self.plan.shakespeare
        want_step, want_eval = "step" in self.sections, "eval" in self.sections
        variants = [("jaxgpt float32", {"dtype": "float32"}), ("jaxgpt bfloat16", {"dtype": "bfloat16"})]
        if self.on_gpu or self.args.tiny:  # what the fused dropout attention is worth, side by side (--tiny: the path)
            variants.append(("jaxgpt bfloat16, dropout unfused (attention_impl='xla')",
                             {"dtype": "bfloat16", "attention_impl": "xla"}))
        if not want_step:  # eval only: float32 and torch are trained (their step rows dropped) to be evaluated
            variants = variants[:1]
        trainers = self.train_section("shakespeare_char step", shape, self.plan.shakespeare_k, variants,
                                      self.torch_label(), self.vocab, self.train_ids)
        if not want_step:
            self.rows = [r for r in self.rows if r["section"] != "shakespeare_char step"]
        if self.args.profile and "jaxgpt float32" in trainers:
            self.guarded("profile", "jaxgpt float32 + bfloat16", "trace", lambda: self.profile(trainers))
        if not want_eval:
            return
        section = f"evaluation ({self.plan.eval_iters} x 2 batches)"
        for impl in [name for name, _ in variants[:2]] + ["torch"]:  # as trained: float32, bfloat16
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
                    (f"jaxgpt bf16 {impl}, on-device, {self.plan.gpt2_k} steps/call",
                     {"dtype": "bfloat16", "attention_impl": impl})]
        self.train_section("GPT-2 124M step", shape, self.plan.gpt2_k, variants, self.torch_label(), shape.vocab_size,
                           tokens)

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
        """Each of RECIPES as a whole `train.py` run, under one deadline of `--recipe-timeout` seconds."""
        deadline = time.perf_counter() + self.args.recipe_timeout

        def run(name: str) -> dict:
            left = deadline - time.perf_counter()
            if left < 30:
                raise TimeoutError(f"skipped: {left:.0f} s left of --recipe-timeout {self.args.recipe_timeout:.0f}")
            with tempfile.TemporaryDirectory(prefix="bench_gpu_recipe_") as tmp:
                out_dir = pathlib.Path(tmp) / "out"
                cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{name}.py"),
                       f"--config.data.path={self.args.data}", f"--config.out_dir={out_dir}",
                       *(f"--config.{o}" for o in self.plan.recipe_overrides)]
                env = dict(ORIGINAL_ENV, JAXGPT_CACHE=str(pathlib.Path(tmp) / "cache"))
                if self.args.tiny:
                    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + TINY_XLA_FLAGS).strip()
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), ORIGINAL_ENV.get("PYTHONPATH")]))
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    raise RuntimeError(f"train.py exited {proc.returncode}: {tail}")
                records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in records if "val_loss" in r]
            best = min(evals, key=lambda r: r["val_loss"])
            reached = next((r for r in evals if r["val_loss"] <= self.args.recipe_target), None)
            steps = [r["ms_per_step"] for r in records if "ms_per_step" in r]
            return {"median_s": wall, "wall_s": wall, "best_val": best["val_loss"], "best_val_step": best["step"],
                    "final_val": evals[-1]["val_loss"], "final_step": evals[-1]["step"], "evals": len(evals),
                    "target_val": self.args.recipe_target,
                    "step_to_target": reached and reached["step"], "s_to_target": reached and reached["time"],
                    "median_train_ms_per_step": statistics.median(steps) if steps else None,
                    "command": " ".join(cmd[1:])}

        for name in RECIPES:
            self.guarded(f"recipe: train.py --config configs/{name}.py", "jaxgpt (subprocess, cold cache)", "s/run",
                         lambda name=name: run(name))

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
            notes.append(f"val <= {r['target_val']} " + ("never" if r["step_to_target"] is None else
                         f"at step {r['step_to_target']} ({r['s_to_target']:.0f} s into training)"))
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
    p.add_argument("--recipe", action="store_true", help="also run the whole train.py recipes: "
                                                            + ", ".join(RECIPES))
    p.add_argument("--recipe-timeout", type=float, default=420.0, help="seconds before the recipe runs are stopped")
    p.add_argument("--recipe-target", type=float, default=1.47, help="the val loss whose first step is reported "
                                                                       "(nanoGPT's shakespeare_char: 1.47)")
    p.add_argument("--budget", type=float, help="seconds: parts that would start later are skipped (marked so)")
    p.add_argument("--torch-attention", choices=("sdpa", "reference"), default="sdpa",
                   help="the torch side's attention: nanoGPT's F.scaled_dot_product_attention (flash on GPUs; "
                        "default) or the reference's written-out softmax")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for every section (a CPU check in seconds)")
    p.add_argument("--windows", type=int, help="timed windows per measurement (default 5; 2 with --tiny)")
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
    if args.json is not None and args.json.exists() and not args.json.is_file():
        print(f"error: --json {args.json} is not a file: pass a file path", file=sys.stderr)
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
