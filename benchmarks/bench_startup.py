"""Whole-process start-up: a short jaxgpt run against nanoGPT's loop, side by side, phase by phase.

Runs, alternating A B A B ..., `python train.py --config configs/shakespeare_char_cpu.py --config.max_iters=N`
and nanoGPT's train.py loop for the same recipe (`benchmarks/nanogpt_loop.py`, the PyTorch reference model),
both on one prepared copy of the corpus (nanoGPT's train.bin / val.bin). Every line a process prints is
timestamped from its start, which splits the wall time into phases: until the first line, until the model
is built, the step-0 evaluation, training (compile included) with the last evaluation, the end-of-run
sample, exit. With two step counts the marginal cost per step and the fixed cost (the rest) follow:
fixed = wall(N1) - N1 * (wall(N2) - wall(N1)) / (N2 - N1). Each process's CPU time (user + system, all its threads)
is paired too: on a host whose cores are all busy, it says what a change saves more steadily than the wall time.

`--cache cold` gives every jaxgpt run an empty compilation cache; `warm` fills one first and reuses it; `new-lr` is
`warm` with a learning rate no earlier run used, the researcher's "change a line, rerun" (nanoGPT's loop too).
`--also NAME=DIR` adds another jaxgpt checkout (an older commit, say) as a third command. `--warm-floor` adds
"jaxgpt, cache warm": this checkout with every program in the cache (filled by the first round) beside the cold runs,
what a run costs with no compiling at all, so the table shows how much of a gap compiling is.

    PYTHONPATH=$PWD python benchmarks/bench_startup.py --data ../shared/data/tinyshakespeare/input.txt \\
        --iters 200 1000 --repeats 3 --cache warm
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # common.py, when run by path

from common import DEFAULT_DATA, ROOT, machine

# Phase ends, by the first line that starts with each marker (jaxgpt's console, then nanoGPT's).
MARKERS = {
    "built": ("gpt:", "bigram:", "found vocab_size"),
    "eval0": ("step 0: train loss",),
    "trained": ("step {n}:", "iter {last}:"),
    "sampled": ("done:",),
}


def timed_run(cmd: list[str], env: dict[str, str], cwd: pathlib.Path) -> tuple[float, float, list[tuple[float, str]]]:
    """Runs `cmd`; returns its wall time, its CPU time (user + system, its threads and children included) and each
    output line with the seconds since start."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = "\n".join(text for _, text in lines[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, lines


def phases(lines: list[tuple[float, str]], wall: float, n: int, cpu: float | None = None) -> dict[str, float]:
    """Seconds at which each phase ended (absent markers repeat the previous time), and the CPU seconds if given."""
    out = {"first_line": lines[0][0] if lines else wall}
    previous = out["first_line"]
    for name, markers in MARKERS.items():
        wanted = tuple(m.format(n=n, last=n - 1) for m in markers)
        found = next((t for t, text in lines if text.lstrip().startswith(wanted)), None)
        previous = out[name] = previous if found is None else found
    out["exit"] = wall
    if cpu is not None:
        out["cpu"] = cpu
    return out


def new_learning_rate(run: int) -> str:
    """The learning rate of the `run`-th run (from 1) under `--cache new-lr`: the recipe's 1e-3 raised by run / 1000,
    so that no two runs share one and each is near the recipe's."""
    return f"{1e-3 * (1 + run / 1000):.7g}"


WARM_FLOOR = "jaxgpt, cache warm"


def cache_dir(tmp: pathlib.Path, cache: str, name: str, n: int, r: int) -> pathlib.Path:
    """The compile cache of one run: its own empty one under `--cache cold` (but the warm floor's), else one per
    command, filled by the first round."""
    return tmp / f"xla-{name}-{n}-{r}" if cache == "cold" and name != WARM_FLOOR else tmp / "xla" / name


def commands(args, data_dir: pathlib.Path, n: int, out_dir: pathlib.Path) -> dict[str, tuple[list[str], pathlib.Path]]:
    jax_cmd = lambda root: ([sys.executable, "train.py", "--config", "configs/shakespeare_char_cpu.py",  # noqa: E731
                             f"--config.max_iters={n}", f"--config.data.path={data_dir}",
                             f"--config.out_dir={out_dir}", "--config.overwrite=True", "--config.progress=False"],
                            root)
    cmds = {"jaxgpt": jax_cmd(ROOT)}
    for spec in args.also:
        name, root = spec.split("=", 1)
        cmds[name] = jax_cmd(pathlib.Path(root).resolve())
    if getattr(args, "warm_floor", False):
        cmds[WARM_FLOOR] = jax_cmd(ROOT)
    cmds["nanoGPT loop"] = ([sys.executable, str(ROOT / "benchmarks" / "nanogpt_loop.py"), "--data", str(data_dir),
                             "--max_iters", str(n)], ROOT)
    return cmds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="tiny Shakespeare input.txt")
    p.add_argument("--iters", type=int, nargs="+", default=[200], help="step counts; two give the fixed cost")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", choices=("cold", "warm", "new-lr"), default="warm")
    p.add_argument("--also", nargs="*", default=[], metavar="NAME=DIR", help="other jaxgpt checkouts to time")
    p.add_argument("--warm-floor", action="store_true",
                   help="also time this checkout with a warm compile cache, beside cold runs")
    args = p.parse_args(argv)
    if not pathlib.Path(args.data).is_file():
        print(f"error: no corpus at {args.data}: pass --data PATH/input.txt", file=sys.stderr)
        return 2
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="jaxgpt-startup-"))
    try:
        data_dir = tmp / "data"
        subprocess.run([sys.executable, "-m", "jaxgpt.prepare", "--input", args.data, "--out", str(data_dir),
                        "--no_progress"], check=True, cwd=ROOT, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        results: dict[tuple[str, int], list[dict]] = {}
        run_number = itertools.count(1)
        for n in args.iters:
            cmds = commands(args, data_dir, n, tmp / "out")
            for r in range(args.repeats + 1):  # the first round warms the page cache (and the compile cache)
                for name, (cmd, cwd) in cmds.items():
                    cache = cache_dir(tmp, args.cache, name, n, r)
                    env = dict(os.environ, PYTHONPATH=str(cwd), JAXGPT_CACHE=str(cache))
                    if args.cache == "new-lr":
                        lr = new_learning_rate(next(run_number))
                        cmd = cmd + ([f"--config.learning_rate={lr}"] if "train.py" in cmd else ["--learning_rate", lr])
                    wall, cpu, lines = timed_run(cmd, env, cwd)
                    if r:
                        results.setdefault((name, n), []).append(phases(lines, wall, n, cpu))
                    shutil.rmtree(tmp / "out", ignore_errors=True)
        print(table(results, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def table(results: dict[tuple[str, int], list[dict]], args) -> str:
    med = {key: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for key, runs in results.items()}
    with_cpu = all("cpu" in m for m in med.values())
    lines = [f"{machine()}; compile cache {args.cache}; median of {args.repeats} runs, "
             "seconds since the process started" + ("; CPU: user + system seconds" if with_cpu else ""),
             "",
             "| command | steps | first line | model built | step-0 eval done | trained + last eval | sample done | "
             "exit (wall) |" + (" CPU |" if with_cpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if with_cpu else "")]
    for (name, n), m in med.items():
        lines.append(f"| {name} | {n} | {m['first_line']:.2f} | {m['built']:.2f} | {m['eval0']:.2f} | "
                     f"{m['trained']:.2f} | {m['sampled']:.2f} | {m['exit']:.2f} |" +
                     (f" {m['cpu']:.1f} |" if with_cpu else ""))
    names = sorted({name for name, _ in med}, key=list(dict.fromkeys(name for name, _ in med)).index)
    lines.append("")
    for n in args.iters:
        for measure, what in (("exit", "wall"), ("cpu", "CPU")) if with_cpu else (("exit", "wall"),):
            values = {name: [run[measure] for run in results[(name, n)]] for name in names}
            pairs = [("jaxgpt", other) for other in names if other != "jaxgpt"]
            pairs += [(name, "nanoGPT loop") for name in names if name not in ("jaxgpt", "nanoGPT loop")]
            for mine, other in pairs:  # the runs alternate: pairs share the noise
                ratios = [a / b for a, b in zip(values[mine], values[other])]
                lines.append(f"{n} steps: {mine} / {other} {what} time, pair by pair: median "
                             f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    if len(args.iters) >= 2:
        n1, n2 = args.iters[:2]
        for name in names:
            w1, w2 = med[(name, n1)]["exit"], med[(name, n2)]["exit"]
            per_step = (w2 - w1) / (n2 - n1)
            lines.append(f"{name}: marginal {1000 * per_step:.1f} ms per step, fixed cost {w1 - n1 * per_step:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
