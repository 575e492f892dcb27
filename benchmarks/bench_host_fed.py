"""Host-fed batches against on-device batches: `train.py` with `data.on_device=False` beside `True`, alternately.

`data.on_device=False` (GPT-2's default: the corpus stays in a memmap on the host) gathers each chunk's batches on the
host and sends them while the previous chunk runs; it should train as fast as drawing the batches inside the step.
Each pair runs the same config both ways, one after the other; the table gives each way's training tokens/s (train.py's
summary: the training calls only, the first, compiling call left out), their medians and the pair-by-pair ratio.

    python benchmarks/bench_host_fed.py --pairs 3 --iters 500
    python benchmarks/bench_host_fed.py --checkout ../other-jaxgpt     # another checkout's train.py, same table
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tokens_per_s(checkout: pathlib.Path, config: str, iters: int, on_device: bool, data: str) -> float:
    """Training tokens/s of one `train.py` run, read from its `done:` line."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "train.py", "--config", config, f"--config.max_iters={iters}",
                f"--config.eval_interval={iters}", "--config.sample_tokens=0", "--config.plot=False",
                "--config.progress=False", f"--config.out_dir={out}", f"--config.data.on_device={on_device}"]
        if data:
            args.append(f"--config.data.path={data}")
        run = subprocess.run(args, cwd=checkout, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if run.returncode:
        raise RuntimeError(f"train.py exited {run.returncode}: {run.stderr[-2000:]}")
    return float(re.search(r"([\d,]+) tokens/s", run.stdout + run.stderr).group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shakespeare_char_cpu.py")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--data", default=os.environ.get("JAXGPT_SHAKESPEARE", ""), help="the corpus (default: download)")
    p.add_argument("--checkout", type=pathlib.Path, default=ROOT, help="the jaxgpt checkout whose train.py runs")
    a = p.parse_args(argv)
    host, device = [], []
    for _ in range(a.pairs):
        device.append(tokens_per_s(a.checkout, a.config, a.iters, True, a.data))
        host.append(tokens_per_s(a.checkout, a.config, a.iters, False, a.data))
    ratios = [h / d for h, d in zip(host, device)]
    print(f"{a.checkout.resolve().name}: {a.config}, {a.iters} steps, {a.pairs} pairs\n")
    print("| batches | tokens/s (median) | min | max |\n|---|---|---|---|")
    for name, xs in (("on the device", device), ("host-fed", host)):
        print(f"| {name} | {statistics.median(xs):,.0f} | {min(xs):,.0f} | {max(xs):,.0f} |")
    print(f"| host-fed / on the device, pair by pair | {statistics.median(ratios):.2f}x | {min(ratios):.2f} "
          f"| {max(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
