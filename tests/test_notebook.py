"""notebooks/colab_tpu.ipynb runs: its code cells (all but the one tagged 'install') execute in a fresh
Python on CPU with JAXGPT_NOTEBOOK_SMOKE=1 (a few steps of a tiny model), so the notebook cannot rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")


def notebook_code(path: str = NOTEBOOK) -> str:
    """The notebook's code cells joined into one script, without the cells tagged 'install'."""
    cells = json.load(open(path))["cells"]
    code = []
    for cell in cells:
        if cell["cell_type"] != "code" or "install" in cell["metadata"].get("tags", []):
            continue
        source = "".join(cell["source"])
        # IPython magics cannot run in plain Python: only the install cell may hold them.
        assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), source
        code.append(source)
    return "\n\n".join(code)


def test_install_cell_is_tagged_and_has_a_repository_placeholder():
    cells = json.load(open(NOTEBOOK))["cells"]
    install = [c for c in cells if "install" in c["metadata"].get("tags", [])]
    assert len(install) == 1
    source = "".join(install[0]["source"])
    assert "JAXGPT_REPO =" in source and "%pip install" in source


@pytest.mark.slow  # a Python subprocess
def test_notebook_trains_plots_and_samples_on_cpu(tmp_path, shakespeare_path):
    env = dict(
        os.environ,
        JAXGPT_NOTEBOOK_SMOKE="1",
        JAXGPT_NOTEBOOK_OUT=str(tmp_path / "out"),
        JAXGPT_SHAKESPEARE=str(shakespeare_path),
        MPLBACKEND="Agg",
        JAX_PLATFORMS="cpu",
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = notebook_code() + "\n\nprint('NOTEBOOK-SUMMARY', json.dumps({'step': summary['step'], "
    script += "'sample': summary['sample'], 'n_train': len(train)}))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("NOTEBOOK-SUMMARY")][-1]
    out = json.loads(line.split(" ", 1)[1])
    assert out["step"] == 5
    assert out["n_train"] == 5  # one loss per step reached the plot
    assert len(out["sample"]) > 0
    assert (tmp_path / "out" / "metrics.jsonl").exists()
