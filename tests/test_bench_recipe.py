"""The recipe benchmark's exact val loss: every window once, batched, equals one forward over all windows."""

import pathlib
import sys

import numpy as np
from flax import nnx

import jaxgpt
from jaxgpt.model import loss_fn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_recipe  # noqa: E402


def test_exact_loss_covers_every_window_once():
    model = jaxgpt.GPT(jaxgpt.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16),
                       rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, 11, size=8 * 5 + 3)  # 5 whole windows, 2 tokens left over
    x = ids[:40].reshape(5, 8)
    y = ids[1:41].reshape(5, 8)
    expected = float(loss_fn(model(x), y))
    assert abs(bench_recipe.exact_loss(model, ids, 8, batch_size=2) - expected) < 1e-6  # batches of 2, 2, 1
    assert abs(bench_recipe.exact_loss(model, ids[:41], 8) - expected) < 1e-6


def test_seconds_to_a_loss_is_the_first_evaluation_at_or_below_it():
    curve = [(1.0, 0, 4.2), (2.5, 10, 2.0), (4.0, 20, 1.9), (5.0, 30, 1.95)]
    assert bench_recipe.seconds_to(curve, 2.0) == 2.5
    assert bench_recipe.seconds_to(curve, 1.9) == 4.0
    assert bench_recipe.seconds_to(curve, 1.5) is None


def test_race_table_compares_each_recipe_with_the_first():
    def run(times_vals, best):
        return {"curve": [(t, i, v) for i, (t, v) in enumerate(times_vals)], "best_val_estimate": best,
                "wall_s": times_vals[-1][0]}

    runs = {"nanoGPT loop": [run([(1, 3.0), (10, 2.0)], 2.0), run([(1, 3.0), (12, 2.0)], 2.0)],
            "jaxgpt fast": [run([(1, 3.0), (4, 2.0)], 1.9), run([(1, 3.0), (6, 1.95)], 1.95)],
            "jaxgpt slow": [run([(1, 3.0), (9, 2.5)], 2.5), run([(1, 3.0), (5, 1.9)], 1.9)]}
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in bench_recipe.race_table(runs, 2.0).splitlines()[2:]]
    # nanoGPT's median wall: 11 s; columns: seconds to 2.0, reached, wall, both against 11 s
    assert rows[0][3:8] == ["11.0", "2/2", "11.0", "1.00x", "1.00x"]
    assert rows[1][3:8] == ["5.0", "2/2", "5.0", "0.45x", "0.45x"]  # median of 4 and 6 s
    assert rows[2][3:8] == ["-", "1/2", "7.0", "-", "0.64x"]


def test_a_tiny_race_runs_both_loops_and_draws_the_plot(tmp_path, shakespeare_path, capsys):
    config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "shakespeare_char_cpu.py")
    plot, rows = tmp_path / "race.png", tmp_path / "race.json"
    tiny = ["max_iters=4", "eval_interval=2", "eval_iters=1", "batch_size=2", "model.n_layer=1", "model.n_embd=16",
            "model.n_head=2", "model.block_size=8", "warmup_iters=1", "lr_decay_iters=4"]
    assert bench_recipe.main(["--config", config, "--data", str(shakespeare_path), "--time-to-loss", config,
                              "--seeds", "1", "--set", *tiny, "--plot", str(plot), "--json", str(rows)]) == 0
    import json

    runs = json.loads(rows.read_text())["runs"]
    assert [len(r[0]["curve"]) for r in runs.values()] == [3, 3]  # evaluations at steps 0, 2 and 4, each loop
    assert plot.stat().st_size > 1000 and "| jaxgpt shakespeare_char_cpu | 1 |" in capsys.readouterr().out
