"""How good a training recipe is across seeds: the config's own val estimate and the exact val loss.

`--impl torch` runs the same recipe through nanoGPT's training loop with the PyTorch reference model
(tests/reference/torch_gpt.py: its `get_batch`, `estimate_loss`, AdamW groups, schedule and clipping),
so that the two can be compared seed for seed on the same machine.

A config's `eval_iters` batches give a noisy val estimate (shakespeare_char_cpu: 20 batches of 12 x 64
tokens). This runs `jaxgpt.train` once per seed and reports, for each run, the wall time, tokens/s,
the config's val estimate at the last step, and the exact val loss of the final parameters: the mean
next-token loss over every non-overlapping `block_size` window of the val split (the expectation of
the config's estimate). Medians over the seeds tell the recipe apart from the luck of one seed.

`--time-to-loss CONFIG ...` races recipes instead: per seed, nanoGPT's loop on `--config`'s settings, then jaxgpt
on each CONFIG, side by side in one process; it prints each recipe's val loss against seconds since its loop
started (the model built, compiling included), the seconds each took to reach `--target` (default: nanoGPT's
median best val), and `--plot PATH` draws the curves in one figure.

    PYTHONPATH=$PWD python benchmarks/bench_recipe.py --time-to-loss configs/shakespeare_char_cpu.py \
        configs/shakespeare_char_speedrun.py --seeds 1337 1 2 --plot time_to_loss.png

    PYTHONPATH=$PWD python benchmarks/bench_recipe.py --config configs/shakespeare_char_cpu.py \\
        --data ../shared/data/tinyshakespeare/input.txt --seeds 1337 1 2 3 4
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import config_with, machine  # noqa: E402

import jaxgpt.data as data_lib  # noqa: E402
from jaxgpt import checkpoint, training  # noqa: E402
from jaxgpt.model import loss_fn  # noqa: E402


def windows(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every non-overlapping block_size window of `ids` and its next-token targets: two (N, block_size)."""
    n = (len(ids) - 1) // block_size
    x_NT = np.asarray(ids[: n * block_size], np.int64).reshape(n, block_size)
    y_NT = np.asarray(ids[1 : n * block_size + 1], np.int64).reshape(n, block_size)
    return x_NT, y_NT


def exact_loss(model: nnx.Module, ids: np.ndarray, block_size: int, batch_size: int = 256) -> float:
    """Mean next-token loss over all non-overlapping windows of `ids` (every token predicted once)."""
    x_NT, y_NT = windows(ids, block_size)
    graphdef, params = nnx.split(model)

    @jax.jit
    def summed(params, x_BT, y_BT):
        return loss_fn(nnx.merge(graphdef, params)(x_BT), y_BT) * x_BT.size

    total = 0.0
    for i in range(0, len(x_NT), batch_size):
        x_BT, y_BT = (jnp.asarray(a[i : i + batch_size], jnp.int32) for a in (x_NT, y_NT))
        total += float(summed(params, x_BT, y_BT))
    return total / x_NT.size


def _literal(text: str):
    """'2' -> 2, 'True' -> True, 'abc' -> 'abc'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config(config_path: str, overrides: dict):
    """The config file with `overrides` (the CLI's dotted names and text values: model.n_layer=2) applied."""
    return config_with(config_path, {k: _literal(v) for k, v in overrides.items()})


def run_seed(config_path: str, data_path: str | None, seed: int, overrides: dict) -> dict:
    """jaxgpt.train on the config with `seed`, in a temporary out_dir."""
    config = _config(config_path, overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        config.out_dir = out_dir
        config.seed = seed
        config.plot = False
        config.progress = False
        config.sample_tokens = 0
        if data_path:
            config.data.path = data_path
        summary = training.train(config, log=lambda s: None)
        metrics = [json.loads(line) for line in open(pathlib.Path(out_dir) / "metrics.jsonl")]
        curve = [(m["time"], m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
        last_val = curve[-1][2]
        model, _, info = checkpoint.load_model(out_dir, "latest")
    dataset = data_lib.load_dataset(config.data.path or None)  # data_path, when given, is in the config
    block = config.model.block_size
    return {
        "seed": seed,
        "step": info["step"],
        "wall_s": summary["wall_time"],
        "tokens_per_s": summary["tokens_per_s"],
        "val_estimate": last_val,
        "best_val_estimate": summary["best_val_loss"],
        "val_exact": exact_loss(model, dataset.val, block),
        "curve": curve,
    }


def run_seed_torch(config_path: str, data_path: str | None, seed: int, overrides: dict) -> dict:
    """nanoGPT's train.py loop (CPU, float32, no compile) on the PyTorch reference model (nanogpt_loop.py)."""
    import torch

    from benchmarks.nanogpt_loop import CPU_RECIPE
    from benchmarks.nanogpt_loop import train as nanogpt_train

    config = _config(config_path, overrides)
    dataset = data_lib.load_dataset(data_path or config.data.path or None)
    settings = {k: (config.model[k] if k in config.model else config[k]) for k in CPU_RECIPE}
    model, out = nanogpt_train(np.asarray(dataset.train), np.asarray(dataset.val), dataset.vocab_size, seed=seed,
                               log=lambda line: None, **settings)
    T = config.model.block_size
    x, y = map(torch.from_numpy, windows(dataset.val, T))
    with torch.no_grad():
        model.eval()
        exact = sum(float(model(x[i:i + 256], y[i:i + 256])[1]) * len(x[i:i + 256]) for i in range(0, len(x), 256))
    wall = out["wall_s"]
    return {"seed": seed, "step": config.max_iters, "wall_s": wall,
            "tokens_per_s": config.max_iters * config.batch_size * T / wall,
            "val_estimate": out["val"], "best_val_estimate": out["best_val"], "val_exact": exact / len(x),
            "curve": out["curve"]}


def table(rows: list[dict]) -> str:
    head = ("| seed | steps | wall s | tokens/s | val, config's estimate (last eval) | best val estimate "
            "| val, exact (whole split) |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['step']} | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['val_estimate']:.4f} | {r['best_val_estimate']:.4f} | {r['val_exact']:.4f} |")
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("wall_s", "tokens_per_s", "val_estimate", "best_val_estimate", "val_exact")}
    lines.append(f"| **median** | | {med['wall_s']:.1f} | {med['tokens_per_s']:,.0f} | {med['val_estimate']:.4f} | "
                 f"{med['best_val_estimate']:.4f} | {med['val_exact']:.4f} |")
    return "\n".join(lines)


def seconds_to(curve: list, target: float) -> float | None:
    """The seconds at the first evaluation whose val loss is <= `target` (None: never reached)."""
    return next((t for t, _, val in curve if val <= target), None)


def race_table(runs: dict[str, list[dict]], target: float) -> str:
    """One row per recipe, medians over its seeds: best val, seconds to `target`, wall seconds, and both times
    against nanoGPT's (the first recipe's) median wall time, the time it takes to reach its own best."""
    base_wall = statistics.median(r["wall_s"] for r in next(iter(runs.values())))
    lines = [f"| recipe | seeds | best val (median) | s to val <= {target:.4f} (median) | reached | wall s (median) | "
             "to target / nanoGPT's wall | wall / nanoGPT's wall |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        reached = [t for t in (seconds_to(r["curve"], target) for r in rows) if t is not None]
        to_target = statistics.median(reached) if len(reached) == len(rows) else None
        wall = statistics.median(r["wall_s"] for r in rows)
        lines.append(f"| {name} | {len(rows)} | {statistics.median(r['best_val_estimate'] for r in rows):.4f} | "
                     f"{'-' if to_target is None else f'{to_target:.1f}'} | {len(reached)}/{len(rows)} | {wall:.1f} | "
                     f"{'-' if to_target is None else f'{to_target / base_wall:.2f}x'} | {wall / base_wall:.2f}x |")
    return "\n".join(lines)


def plot_race(runs: dict[str, list[dict]], target: float, path: str) -> None:
    """Val loss against seconds, every seed of every recipe, one colour per recipe; the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, (name, rows) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        for i, r in enumerate(rows):
            t, _, val = zip(*r["curve"])
            ax.plot(t, val, color=colour, alpha=0.8, label=name if i == 0 else None)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("seconds since the training loop started")
    ax.set_ylabel("val loss (the config's estimate)")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def race(args, overrides: dict) -> int:
    """--time-to-loss: nanoGPT's loop and each jaxgpt recipe, seed by seed, side by side."""
    runs: dict[str, list[dict]] = {"nanoGPT loop": []}
    for config in args.time_to_loss:
        runs[f"jaxgpt {pathlib.Path(config).stem}"] = []
    for seed in args.seeds:
        runs["nanoGPT loop"].append(run_seed_torch(args.config, args.data, seed, overrides))
        for config in args.time_to_loss:
            runs[f"jaxgpt {pathlib.Path(config).stem}"].append(run_seed(config, args.data, seed, overrides))
        for name, rows in runs.items():
            print(json.dumps({"recipe": name, **{k: v for k, v in rows[-1].items() if k != "curve"}}), flush=True)
    target = args.target or statistics.median(r["best_val_estimate"] for r in runs["nanoGPT loop"])
    print(f"\ntime to loss: {len(args.seeds)} seeds, {machine()}, jax {jax.__version__}\n")
    print(race_table(runs, target))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"target": target, "runs": runs}, indent=1))
    if args.plot:
        plot_race(runs, target, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char_cpu.py"))
    p.add_argument("--data", default=None, help="data.path (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2, 3, 4])
    p.add_argument("--impl", choices=("jax", "torch"), default="jax")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. max_iters=200")
    p.add_argument("--time-to-loss", nargs="+", metavar="CONFIG", help="race nanoGPT's loop (on --config's "
                   "settings) against jaxgpt on each CONFIG: val loss against seconds")
    p.add_argument("--target", type=float, help="the val loss to reach (default: nanoGPT's median best val)")
    p.add_argument("--plot", help="with --time-to-loss: draw the curves into this PNG")
    p.add_argument("--json", help="with --time-to-loss: write every run and curve here")
    args = p.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    if args.time_to_loss:
        return race(args, overrides)
    rows = []
    for seed in args.seeds:
        run = run_seed if args.impl == "jax" else run_seed_torch
        rows.append(run(args.config, args.data, seed, overrides))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.impl}: {pathlib.Path(args.config).name}, {len(rows)} seeds, jax {jax.__version__}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
