"""benchmarks/bench_startup.py: its phases come from the right console lines, and its table from the right runs.

The timings themselves are the benchmark's business; what can fail here is the arithmetic: a phase read off
the wrong line (the "evaluating ..." notice instead of the evaluation's result), a ratio of unpaired runs, a
fixed cost from the wrong step counts.
"""

import argparse
import pathlib
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_startup  # noqa: E402


def _jaxgpt_lines(n: int, offset: float = 0.0) -> list[tuple[float, str]]:
    return [(1.0 + offset, "data: 1,003,854 train / 111,540 val tokens from x"),
            (2.0 + offset, "gpt: 0.80M parameters, vocab 65, 768 tokens per step"),
            (2.1 + offset, "compiling the training step (up to 125 steps per call) ..."),
            (2.2 + offset, "step 0: evaluating on 2 x 20 batches (compiles first) ..."),
            (3.0 + offset, "step 0: train loss 4.2136, val loss 4.2018 (best)"),
            (9.0 + offset, f"step {n}: train loss 2.4669, val loss 2.4747 (best)"),
            (9.5 + offset, f"done: step {n}, best val loss 2.4747, wall time 8.5 s, 15,386 tokens/s")]


def test_phases_end_at_the_evaluation_result_not_its_notice():
    got = bench_startup.phases(_jaxgpt_lines(200), wall=10.0, n=200)
    assert got == {"first_line": 1.0, "built": 2.0, "eval0": 3.0, "trained": 9.0, "sampled": 9.5, "exit": 10.0}
    nanogpt = [(1.5, "found vocab_size = 65"), (2.5, "step 0: train loss 4.2, val loss 4.2"),
               (7.0, "iter 199: loss 2.5, time 30.00ms"), (7.5, "step 200: train loss 2.4, val loss 2.4")]
    got = bench_startup.phases(nanogpt, wall=8.0, n=200)
    assert (got["built"], got["eval0"], got["trained"], got["sampled"]) == (1.5, 2.5, 7.0, 7.0)  # no sample


def test_table_pairs_runs_and_derives_the_fixed_cost():
    def runs(walls, n):
        return [bench_startup.phases(_jaxgpt_lines(n), wall=w, n=n) for w in walls]

    results = {("jaxgpt", 200): runs([10.0, 12.0, 11.0], 200), ("before", 200): runs([20.0, 12.0, 22.0], 200),
               ("nanoGPT loop", 200): runs([5.0, 6.0, 5.5], 200), ("jaxgpt", 1000): runs([43.0, 43.0, 43.0], 1000),
               ("before", 1000): runs([60.0, 60.0, 60.0], 1000), ("nanoGPT loop", 1000): runs([30.0] * 3, 1000)}
    text = bench_startup.table(results, argparse.Namespace(iters=[200, 1000], repeats=3, cache="warm"))
    # Pair by pair: 10/20, 12/12, 11/22 -> median 0.5 (a ratio of medians would say 11/20 = 0.55).
    assert "200 steps: jaxgpt / before wall time, pair by pair: median 0.50 (min 0.50, max 1.00)" in text
    assert "200 steps: jaxgpt / nanoGPT loop wall time, pair by pair: median 2.00 (min 2.00, max 2.00)" in text
    # jaxgpt: (43 - 11) / 800 = 40 ms per step; 11 - 200 * 0.04 = 3 s fixed.
    assert "jaxgpt: marginal 40.0 ms per step, fixed cost 3.0 s" in text
    assert "| jaxgpt | 200 | 1.00 | 2.00 | 3.00 | 9.00 | 9.50 | 11.00 |" in text


def test_table_pairs_cpu_seconds_when_measured():
    results = {("jaxgpt", 200): [bench_startup.phases(_jaxgpt_lines(200), wall=10.0, n=200, cpu=c) for c in (16, 18)],
               ("nanoGPT loop", 200): [bench_startup.phases(_jaxgpt_lines(200), wall=10.0, n=200, cpu=c)
                                       for c in (20, 18)]}
    text = bench_startup.table(results, argparse.Namespace(iters=[200], repeats=2, cache="cold"))
    assert "200 steps: jaxgpt / nanoGPT loop CPU time, pair by pair: median 0.90 (min 0.80, max 1.00)" in text
    assert "| jaxgpt | 200 | 1.00 | 2.00 | 3.00 | 9.00 | 9.50 | 10.00 | 17.0 |" in text


@pytest.mark.parametrize("bad", [["--data", "/nonexistent/input.txt"]])
def test_a_missing_corpus_is_one_line(bad, capsys):
    assert bench_startup.main(bad) == 2
    assert capsys.readouterr().err.strip().startswith("error: no corpus at /nonexistent/input.txt")


def test_new_lr_runs_each_get_their_own_learning_rate_near_the_recipes():
    rates = [bench_startup.new_learning_rate(r) for r in range(1, 50)]
    assert len(set(rates)) == len(rates)
    assert all(1e-3 < float(lr) < 1.05e-3 for lr in rates)


def test_the_warm_floor_keeps_one_cache_beside_cold_runs_and_is_paired_with_nanogpt():
    tmp = pathlib.Path("/t")
    cold = {bench_startup.cache_dir(tmp, "cold", "jaxgpt", 200, r) for r in range(3)}
    floor = {bench_startup.cache_dir(tmp, "cold", bench_startup.WARM_FLOOR, 200, r) for r in range(3)}
    assert len(cold) == 3 and len(floor) == 1  # every cold run starts empty; the floor reuses what round 0 filled
    warm = {bench_startup.cache_dir(tmp, "warm", "jaxgpt", 200, r) for r in range(3)}
    assert len(warm) == 1
    runs = lambda walls: [bench_startup.phases(_jaxgpt_lines(200), wall=w, n=200) for w in walls]  # noqa: E731
    results = {("jaxgpt", 200): runs([12.0, 12.0]), (bench_startup.WARM_FLOOR, 200): runs([9.0, 8.0]),
               ("nanoGPT loop", 200): runs([8.0, 8.0])}
    text = bench_startup.table(results, argparse.Namespace(iters=[200], repeats=2, cache="cold"))
    assert "200 steps: jaxgpt / jaxgpt, cache warm wall time, pair by pair: median 1.42 (min 1.33, max 1.50)" in text
    floor_vs_nanogpt = "jaxgpt, cache warm / nanoGPT loop wall time, pair by pair: median 1.06 (min 1.00, max 1.12)"
    assert f"200 steps: {floor_vs_nanogpt}" in text
