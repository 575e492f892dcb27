"""benchmarks/bench_gpu.py on this CPU with tiny shapes: every section runs and reports sane timings.

The GPU numbers themselves need a GPU; what can fail here is the script: a section that errors, a row
without a timing, a ratio or throughput computed from the wrong numbers, a bad argument not refused,
or an import of ml_collections (absent on bare accelerator machines) on the way to the step builders.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402
import common  # noqa: E402
import gpu_programs  # noqa: E402

# Runs the script as __main__ with ml_collections made unimportable, as on a machine without it.
WITHOUT_ML_COLLECTIONS = (
    "import runpy, sys; sys.modules['ml_collections'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# gpu_check.sh runs bench_gpu.py through this: ml_collections unimportable in the benchmark's own process, as on a
# bare accelerator machine (train.py, which the recipe section starts with sys.executable, has it).
PYTHON_WITHOUT_ML_COLLECTIONS = """#!/bin/sh
case "$1" in
  *bench_gpu.py) exec "{python}" -c "{code}" "$@" ;;
  *) exec "{python}" "$@" ;;
esac
"""


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory, shakespeare_path) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    """`gpu_check.sh --recipe` end to end with tiny shapes on this CPU (its GPU tests fail here, and it goes on): the
    benchmark with a profile, then the recipes. --recipe-target 9: above a character model's first loss, so the step
    that reaches it is the first evaluation. One run for all the tests below: it is the slowest part of the file."""
    out = tmp_path_factory.mktemp("gpu_check")
    python = out / "python"
    python.write_text(PYTHON_WITHOUT_ML_COLLECTIONS.format(python=sys.executable, code=WITHOUT_ML_COLLECTIONS))
    python.chmod(0o755)
    env = dict(os.environ, OUT=str(out), BENCH_ARGS="--tiny --recipe-target 9", PYTEST_TIMEOUT_S="1",
               BUDGET_S="900", PYTHON=str(python), JAXGPT_SHAKESPEARE=str(shakespeare_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--recipe"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_tiny_run_has_every_section_with_sane_timings(gpu_check):
    out, proc = gpu_check
    doc = json.loads((out / "bench_gpu.json").read_text())
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r]
    assert doc["machine"]["jax_backend"] == "cpu" and doc["machine"]["torch_compile"] is False
    assert doc["complete"] and doc["machine"]["torch_attention"] == "sdpa"

    plan = gpu_programs.TINY
    sections = {
        "shakespeare_char step": plan.shakespeare,
        f"evaluation ({plan.eval_iters} x 2 batches)": None,
        "GPT-2 124M step": plan.gpt2,
        **{f"sampling 1 + {plan.sample_new_tokens} tokens, batch {b}": b for b in plan.sample_batches},
    }
    for section, shape in sections.items():
        got = [r for r in rows if r["section"] == section]
        torch_rows = [r for r in got if r["impl"].startswith("torch")]
        jax_rows = [r for r in got if r["impl"].startswith("jaxgpt")]
        assert len(torch_rows) == 1 and jax_rows, (section, [r["impl"] for r in got])
        assert section in proc.stdout  # the printed table
        for r in got:
            assert all(_positive(r[k]) for k in ("median_s", "min_s", "max_s", "first_s")), r
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert "mfu" not in r  # no peak FLOP/s for a CPU: no made-up MFU
            if isinstance(shape, common.TrainShape):
                assert r["tokens_per_s"] == pytest.approx(shape.batch_size * shape.block_size / r["median_s"])
            elif isinstance(shape, int):  # sampling: tokens of all rows per second
                assert r["tokens_per_s"] == pytest.approx(shape / r["median_s"])
        for r in jax_rows:
            assert r["jaxgpt_over_torch"] == pytest.approx(r["median_s"] / torch_rows[0]["median_s"])
            assert 1e-4 < r["jaxgpt_over_torch"] < 1e4
    impls = {r["impl"] for r in rows if r["section"] == "shakespeare_char step"}
    assert {"jaxgpt float32", "jaxgpt bfloat16", "jaxgpt bfloat16, dropout unfused (attention_impl='xla')"} <= impls
    assert sum(r["section"] == "GPT-2 124M step" and r["impl"].startswith("jaxgpt") for r in rows) == 2
    assert "recipe" not in doc["sections"]  # only with --recipe

    (profile,) = [r for r in rows if r["section"] == "profile"]
    written = list((out / "trace").iterdir())  # gpu_check.sh flattens the profiler's folders and gzips the files
    assert profile["files"] == len(written) > 0 and any(p.name.endswith(".xplane.pb.gz") for p in written)


@pytest.mark.slow
def test_tiny_recipe_runs_train_py_and_reads_its_metrics(gpu_check):
    out, proc = gpu_check
    rows = json.loads((out / "recipe.json").read_text())["rows"]
    assert [r["section"] for r in rows] == [f"recipe: train.py --config configs/{n}.py" for n in bench_gpu.RECIPES]
    overrides = dict(o.split("=") for o in gpu_programs.TINY.recipe_overrides)
    max_iters, interval = int(overrides["max_iters"]), int(overrides["eval_interval"])
    for row in rows:
        assert "error" not in row, row
        assert _positive(row["wall_s"]) and row["median_s"] == row["wall_s"]
        assert row["final_step"] == max_iters and row["evals"] == max_iters // interval + 1
        assert 0 < row["best_val"] < math.log(65) + 0.5  # a character model's loss, near or below uniform's
        assert (row["step_to_target"], row["target_val"]) == (0, 9.0)
    assert "val <= 9.0 at step 0" in proc.stdout


@pytest.mark.slow
def test_gpu_check_script_logs_each_phase_and_exit_status(gpu_check):
    out, proc = gpu_check
    log = (out / "log.txt").read_text()
    for phase in ("setup", "pytest on the GPU", "bench_gpu.py", "trace files", "recipes:", "done"):
        assert f"s {phase}" in log, phase
    assert "bench_gpu exit status: 0" in proc.stdout and "recipe exit status: 0" in proc.stdout


@pytest.mark.slow
def test_past_the_budget_parts_are_skipped_and_reported(tmp_path, shakespeare_path):
    out = tmp_path / "bench.json"
    proc = _run(["--tiny", "--only", "step,sample", "--budget", "0", "--data", str(shakespeare_path),
                 "--json", str(out)], timeout=300)
    assert proc.returncode == 1  # nothing measured is a failed run
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == {"shakespeare_char step", "sampling 1 + 15 tokens, batch 1",
                                            "sampling 1 + 15 tokens, batch 8"}
    assert all(r["error"].startswith("skipped: past the --budget") for r in rows)
    assert proc.stdout.count("| failed |") == len(rows)


@pytest.mark.slow
def test_xla_dump_is_set_before_jax_starts(tmp_path, shakespeare_path):
    dump = tmp_path / "hlo"
    proc = _run(["--tiny", "--only", "sample", "--xla-dump", str(dump), "--data", str(shakespeare_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [p.name for p in dump.iterdir()]
    decode_loops = ("_cached_steps", "_window_steps")  # jaxgpt.decode's compiled loops
    assert any(any(loop in n for loop in decode_loops) and n.endswith("after_optimizations.txt") for n in names), \
        names[:20]


def test_use_sdpa_is_the_reference_attention():
    import torch

    from tests.reference import torch_gpt

    torch.manual_seed(0)
    config = torch_gpt.TorchGPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.1)
    model = torch_gpt.GPT(config).eval()
    x = torch.randint(0, 65, (3, 20))
    logits, loss = model(x, x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gpu_programs.use_sdpa(model)
    logits_sdpa, loss_sdpa = model(x, x)
    loss_sdpa.backward()
    torch.testing.assert_close(logits_sdpa, logits, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
    model.train()  # dropout on: masks drawn, so outputs differ from eval mode
    assert not torch.allclose(model(x)[0], logits_sdpa)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "step,bogus"], "unknown section 'bogus'"),
        (["--data", "/nonexistent/input.txt"], "corpus /nonexistent/input.txt not found"),
        (["--windows", "0"], "--windows must be a positive integer"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(tmp_path, args, message):
    out = tmp_path / "bench.json"
    proc = _run([*args, "--json", str(out)], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not out.exists()


def test_table_marks_failed_sections_and_ratios():
    rows = [
        {"section": "s", "impl": "jaxgpt a", "unit": "ms/step", "median_s": 0.002, "min_s": 0.001, "max_s": 0.003,
         "first_s": 1.0, "tokens_per_s": 10.0},
        {"section": "s", "impl": "torch b", "unit": "ms/step", "median_s": 0.004, "min_s": 0.004, "max_s": 0.005,
         "first_s": 2.0},
        {"section": "t", "impl": "torch c", "unit": "ms/token", "error": "RuntimeError: no triton"},
    ]
    bench_gpu.add_ratios(rows)
    assert rows[0]["jaxgpt_over_torch"] == pytest.approx(0.5) and "jaxgpt_over_torch" not in rows[1]
    table = bench_gpu.fmt_table(rows, {})
    lines = table.splitlines()
    assert "| s | jaxgpt a | 2 ms/step | 1 - 3 | 1.00 | 10 | - | 0.50x |" in table
    assert any(line.startswith("| t | torch c | failed |") and "no triton" in line for line in lines)
    assert len({line.count("|") for line in lines if line.startswith("|")}) == 1  # every row has every column
