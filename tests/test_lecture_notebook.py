"""notebooks/lets_build_gpt.ipynb runs top to bottom on CPU and prints the lecture notes' own numbers.

The notebook's code cells (all but the one tagged 'install') run once in a fresh Python, in the notebook's smoke
mode (JAXGPT_NOTEBOOK_SMOKE=1: each rung of the build and the compiled run train a few steps; the bigram model
trains in full, its steps being cheap). Where the notes print numbers that do not come from PyTorch's random
generator (the corpus statistics, the encodings, their printed input tensors and what the averaging ladder and the
attention scores make of them), the numbers the notebook prints must be the notes' to the printed digits; the
expected values below are copied from the notes' printed outputs.
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.test_notebook import notebook_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "lets_build_gpt.ipynb")

# Printed after the notebook's own code, so the test can read a few of its variables.
DUMP = """
print("LECTURE-NOTEBOOK-STATE", json.dumps({
    "bigram_initial_loss": bigram_initial_loss,
    "bigram_val_loss": bigram_val_loss,
    "rungs": rungs,
    "rung_iters": rung_iters,
    "gpt_sample": gpt_sample,
    "summary": {k: v for k, v in summary.items() if k != "sample"},
    "max_iters": config.max_iters,
    "out_dir": str(pathlib.Path(config.out_dir).resolve()),
    "x_lecture": np.asarray(x_lecture).tolist(),
    "inputs": np.asarray(inputs).tolist(),
    "encoder_last_equal": bool(jnp.allclose(enc[:, -1], dec[:, -1], atol=1e-5)),
    "encoder_first_equal": bool(jnp.allclose(enc[:, 0], dec[:, 0], atol=1e-5)),
}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare_path):
    """(stdout, state) of one run of the notebook; cwd is an empty folder, so nothing is read from it."""
    cwd = tmp_path_factory.mktemp("lecture")
    env = dict(os.environ, JAXGPT_SHAKESPEARE=str(shakespeare_path), JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               JAXGPT_NOTEBOOK_SMOKE="1")
    env.pop("JAXGPT_DIR", None)  # the notebook finds configs/ beside the jaxgpt it imports
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = "import json\n\n" + notebook_code(NOTEBOOK) + "\n" + DUMP
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("LECTURE-NOTEBOOK-STATE")][-1]
    return proc.stdout, json.loads(line.split(" ", 1)[1])


NUMBER = re.compile(r"-?inf|-?\d+(?:\.\d*)?")


def numbers(text: str) -> list[float]:
    return [float(t) for t in NUMBER.findall(text)]


def count_printed(stdout: str, expected, tol: float = 0.0) -> int:
    """How many times the numbers of `expected` (as the notes print them) appear in a row in the output.

    Printed numbers are compared as written: with tol=0 the notebook must print the same digits.
    """
    want = numbers(str(np.asarray(expected, dtype=np.float64).tolist()))
    got = numbers(stdout)
    close = lambda a, b: a == b or abs(a - b) <= tol + 1e-12  # noqa: E731  (exact for -inf)
    return sum(
        all(close(got[i + j], w) for j, w in enumerate(want)) for i in range(len(got) - len(want) + 1)
    )


def test_install_cell_is_tagged_and_outputs_are_stripped():
    cells = json.load(open(NOTEBOOK))["cells"]
    install = [c for c in cells if "install" in c["metadata"].get("tags", [])]
    assert len(install) == 1
    source = "".join(install[0]["source"])
    assert "JAXGPT_DIR" in source and "pip" in source and "<org>" not in source  # the uploaded project folder
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


@pytest.mark.slow  # the notebook in a Python subprocess
def test_corpus_vocabulary_and_encoding(run, shakespeare_path):
    stdout, _ = run
    assert "Length of dataset in characters: 1115394\n" in stdout
    text = shakespeare_path.read_text(encoding="utf-8")
    assert text[:1000] in stdout
    assert "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n65\n" in stdout
    assert "{'\\n': 0, ' ': 1, '!': 2, '$': 3, '&': 4, \"'\": 5, ',': 6, '-': 7, '.': 8, '3': 9, ':': 10" in stdout
    assert "'x': 62, 'y': 63, 'z': 64}\n" in stdout
    assert "[46, 47, 47, 1, 58, 46, 43, 56, 43]\nhii there\n" in stdout
    assert "(1115394,)" in stdout
    first = [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52, 10, 0, 14, 43, 44, 53, 56, 43, 1, 61, 43, 1, 54, 56,
             53, 41, 43, 43, 42, 1, 39, 52, 63, 1, 44, 59, 56, 58, 46, 43, 56, 6, 1, 46, 43, 39, 56, 1, 51, 43, 1]
    assert count_printed(stdout, first) >= 1
    assert count_printed(stdout, [1003854, 111540]) == 1


@pytest.mark.slow  # the notebook in a Python subprocess
def test_blocks_and_batches(run):
    stdout, _ = run
    assert count_printed(stdout, [18, 47, 56, 57, 58, 1, 15, 47, 58]) >= 1
    context = [18, 47, 56, 57, 58, 1, 15, 47]
    for t, target in enumerate([47, 56, 57, 58, 1, 15, 47, 58]):
        assert f"when input is {context[: t + 1]} the target: {target}\n" in stdout
    xb = [[24, 43, 58, 5, 57, 1, 46, 43], [44, 53, 56, 1, 58, 46, 39, 58],
          [52, 58, 1, 58, 46, 39, 58, 1], [25, 17, 27, 10, 0, 21, 1, 54]]
    yb = [[43, 58, 5, 57, 1, 46, 43, 39], [53, 56, 1, 58, 46, 39, 58, 1],
          [58, 1, 58, 46, 39, 58, 1, 46], [17, 27, 10, 0, 21, 1, 54, 39]]
    assert count_printed(stdout, xb) >= 1 and count_printed(stdout, yb) >= 1
    listing = [([24, 43, 58, 5, 57, 1, 46, 43], [43, 58, 5, 57, 1, 46, 43, 39]),
               ([44, 53, 56, 1, 58, 46, 39, 58], [53, 56, 1, 58, 46, 39, 58, 1])]
    for x, y in listing:
        for t in range(8):
            assert f"when input is {x[: t + 1]} the target: {y[t]}\n" in stdout


@pytest.mark.slow  # the notebook in a Python subprocess
def test_bigram_model_learns(run):
    _, state = run
    # N(0, 1) logits cost more than the uniform guess ln(65) ~ 4.17 (the notes print 4.8786 on their batch).
    assert math.log(65) < state["bigram_initial_loss"] < 5.5
    history = state["rungs"]["bigram"]
    assert [h["step"] for h in history] == list(range(0, 3001, 300))
    assert history[0]["val"] > math.log(65)  # the plain loop starts from the untrained table ...
    # ... and lowers the loss: a bigram table cannot go much below ~2.45 on tiny Shakespeare; the notes end near 2.5.
    assert 2.35 < state["bigram_val_loss"] < 2.6 and state["bigram_val_loss"] == history[-1]["val"]


@pytest.mark.slow  # the notebook in a Python subprocess
def test_averaging_ladder_on_the_notes_inputs(run):
    stdout, _ = run
    assert count_printed(stdout, [[2, 7], [8, 11], [14, 16]]) == 1
    assert count_printed(stdout, [[2, 7], [4, 5.5], [4.6667, 5.3333]]) == 1
    xb = [[[0.2357, 0.6186, 0.3991], [0.1029, 0.5228, 0.8372], [0.9153, 0.9635, 0.1719],
           [0.0969, 0.2464, 0.5394], [0.3521, 0.2202, 0.7020]],
          [[0.7796, 0.2707, 0.5217], [0.1820, 0.5898, 0.4388], [0.4741, 0.3602, 0.0515],
           [0.1895, 0.8833, 0.1996], [0.2332, 0.0990, 0.9172]]]
    xbow = [[[0.2357, 0.6186, 0.3991], [0.1693, 0.5707, 0.6182], [0.4180, 0.7016, 0.4694],
             [0.3377, 0.5878, 0.4869], [0.3406, 0.5143, 0.5299]],
            [[0.7796, 0.2707, 0.5217], [0.4808, 0.4303, 0.4803], [0.4786, 0.4069, 0.3373],
             [0.4063, 0.5260, 0.3029], [0.3717, 0.4406, 0.4258]]]
    assert count_printed(stdout, xb) >= 1
    # This xb was drawn without a seed and is known to 4 decimals only: its averages may differ by one in the
    # last printed place (the loop, the matmul and the softmax each print them).
    assert count_printed(stdout, xbow, tol=1e-4) == 3
    wei5 = [[1, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.3333, 0.3333, 0.3333, 0, 0], [0.25] * 4 + [0], [0.2] * 5]
    assert count_printed(stdout, wei5) >= 1
    inf = -math.inf
    assert count_printed(stdout, [[0, inf, inf, inf, inf], [0, 0, inf, inf, inf], [0, 0, 0, inf, inf]]) == 1

    # The lecture's x = torch.randn(4, 8, 2) after torch.manual_seed(1337): exact to the printed digits.
    x0 = [[0.1808, -0.0700], [-0.3596, -0.9152], [0.6258, 0.0255], [0.9545, 0.0643],
          [0.3612, 1.1679], [-1.3499, -0.5102], [0.2360, -0.2398], [-0.9211, 1.5433]]
    xbow = [
        [[0.1808, -0.0700], [-0.0894, -0.4926], [0.1490, -0.3199], [0.3504, -0.2238],
         [0.3525, 0.0545], [0.0688, -0.0396], [0.0927, -0.0682], [-0.0341, 0.1332]],
        [[1.3488, -0.1396], [0.8173, 0.4127], [-0.1342, 0.4395], [0.2711, 0.4774],
         [0.2421, 0.0694], [0.0084, 0.0020], [0.0712, -0.1128], [0.2527, 0.2149]],
        [[-0.6631, -0.2513], [0.1735, -0.0649], [0.1685, 0.3348], [-0.1621, 0.1765],
         [-0.2312, -0.0436], [-0.1015, -0.2855], [-0.2593, -0.1630], [-0.3015, -0.2293]],
        [[1.6455, -0.8030], [1.4985, -0.5395], [0.4954, 0.3420], [1.0623, -0.1802],
         [1.1401, -0.4462], [1.0870, -0.4071], [1.0430, -0.1299], [1.1138, -0.1641]],
    ]
    assert count_printed(stdout, x0) == 1
    assert count_printed(stdout, xbow) == 1
    assert count_printed(stdout, xbow[0]) == 2  # the loop's full output and the softmax rung's xbow3[0]
    wei8 = [[round(1 / (t + 1), 4) if s <= t else 0.0 for s in range(8)] for t in range(8)]
    assert wei8[6][0] == 0.1429 and count_printed(stdout, wei8) == 1
    assert count_printed(stdout, [0.19, 0.14, 0.24, 0.14, 0.29]) == 1
    assert count_printed(stdout, [0.03, 0.00, 0.16, 0.00, 0.80]) == 1


@pytest.mark.slow  # the notebook in a Python subprocess
def test_attention_scores_on_the_notes_inputs(run):
    stdout, _ = run
    assert count_printed(stdout, [0.2961, 0.5166, 0.2517]) >= 1
    assert count_printed(stdout, [0.6886, 0.0740, 0.8665]) >= 1
    scores = [0.4602, 1.2304, 0.2611, 1.1189, 0.3408, 1.0023]
    assert count_printed(stdout, scores) >= 4  # three ways, and row 1 of the full matrix
    assert count_printed(stdout, [0.1043, 0.2788, 0.0592, 0.2535, 0.0772, 0.2271, 1.0]) == 1
    assert count_printed(stdout, [0.1174, 0.2536, 0.0962, 0.2268, 0.1042, 0.2019]) >= 2  # naive and jax softmax
    assert count_printed(stdout, [0.4762, 0.2052, 0.6228]) >= 3  # matmul, loop, row 1 of all contexts
    attn_scores = [[0.4179, 0.4602, 0.1397, 0.5509, 0.2036, 0.3884],
                   [0.4602, 1.2304, 0.2611, 1.1189, 0.3408, 1.0023],
                   [0.1397, 0.2611, 0.0630, 0.2580, 0.0887, 0.2193],
                   [0.5509, 1.1189, 0.2580, 1.0992, 0.3343, 0.8977],
                   [0.2036, 0.3408, 0.0887, 0.3343, 0.1445, 0.3155],
                   [0.3884, 1.0023, 0.2193, 0.8977, 0.3155, 0.8600]]
    assert count_printed(stdout, attn_scores) == 1
    assert count_printed(stdout, [8.6883, 13.4977, 7.1457, 12.9435, 7.6481, 11.6328]) == 1
    # The notes' softmax over dim=0 of the scores.
    weights = [[0.1748, 0.1174, 0.1609, 0.1340, 0.1603, 0.1268],
               [0.1824, 0.2536, 0.1817, 0.2365, 0.1838, 0.2342],
               [0.1324, 0.0962, 0.1490, 0.1000, 0.1429, 0.1070],
               [0.1997, 0.2268, 0.1811, 0.2319, 0.1827, 0.2110],
               [0.1411, 0.1042, 0.1529, 0.1079, 0.1511, 0.1179],
               [0.1697, 0.2019, 0.1743, 0.1896, 0.1793, 0.2032]]
    assert count_printed(stdout, weights) == 1
    assert count_printed(stdout, np.transpose(weights)) == 1  # the row softmax: each query's weights


@pytest.mark.slow  # the notebook in a Python subprocess
def test_notebook_tensors_are_the_notes_seeded_draws(run):
    import torch

    _, state = run
    torch.manual_seed(1337)
    np.testing.assert_array_equal(np.float32(state["x_lecture"]), torch.randn(4, 8, 2).numpy())
    torch.manual_seed(123)
    np.testing.assert_array_equal(np.float32(state["inputs"]), torch.rand(6, 3).numpy())


RUNGS = ["bigram", "one head", "multi-head", "+ feed-forward", "blocks + residual", "+ LayerNorm",
         "+ dropout (GPT)"]


@pytest.mark.slow  # the notebook in a Python subprocess
def test_each_rung_of_the_build_trains_and_is_tabled(run):
    stdout, state = run
    rungs = state["rungs"]
    assert list(rungs) == RUNGS
    assert state["rung_iters"] == 50  # smoke mode
    for name in RUNGS[1:]:
        history = rungs[name]
        assert [h["step"] for h in history] == [0, 50]
        first, last = history[0], history[-1]
        assert all(math.isfinite(h[split]) for h in history for split in ("train", "val")), name
        # Untrained, a rung guesses about uniformly; 50 steps take it well below that guess.
        assert abs(first["val"] - math.log(65)) < 0.7, name
        assert last["val"] < math.log(65) - 0.3 and last["train"] < first["train"] - 0.3, name
        row = re.search(rf"^{re.escape(name)} +50 +(\d+\.\d{{4}}) +(\d+\.\d{{4}}) ", stdout, re.M)
        assert row and float(row[2]) == round(last["val"], 4), name  # the table prints what the loop measured


@pytest.mark.slow  # the notebook in a Python subprocess
def test_the_gpt_samples_the_requested_length(run):
    _, state = run
    sample = state["gpt_sample"]
    assert len(sample) == 301  # the start token and 300 new characters
    assert set(sample) <= set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@pytest.mark.slow  # the notebook in a Python subprocess
def test_encoder_form(run):
    _, state = run
    assert state["encoder_last_equal"] and not state["encoder_first_equal"]


@pytest.mark.slow  # the notebook in a Python subprocess
def test_the_compiled_run_of_the_lecture_config(run):
    stdout, state = run
    summary = state["summary"]
    assert summary["step"] == state["max_iters"] == 20 and not summary["interrupted"]
    assert math.isfinite(summary["best_val_loss"]) and summary["best_val_loss"] < math.log(65) - 0.3
    out_dir = pathlib.Path(state["out_dir"])
    evals = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "val_loss" in r] == [0, 10, 20]
    assert "done: step 20, best val loss" in stdout
