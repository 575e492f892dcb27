"""notebooks/colab_tpu.ipynb runs: its code cells (all but the one tagged 'install') execute in a fresh
Python on CPU with JAXGPT_NOTEBOOK_SMOKE=1 (a few steps of a tiny model), so the notebook cannot rot; the install
cell runs with git and pip recorded instead of executed."""

import importlib.metadata
import json
import os
import pathlib
import re
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


def install_cell(path: str = NOTEBOOK) -> str:
    cells = json.load(open(path))["cells"]
    install = [c for c in cells if "install" in c["metadata"].get("tags", [])]
    assert len(install) == 1
    return "".join(install[0]["source"])


def repository_url() -> str:
    """pyproject.toml's [project.urls] Repository: the one place the project's address is written."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # tomllib is Python >= 3.11; jaxgpt supports 3.10
        urls = f.read().split("[project.urls]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^Repository = "([^"]+)"', urls, re.M).group(1)


def test_install_cell_clones_the_projects_own_repository():
    repository = repository_url()
    source = install_cell()
    assert f'JAXGPT_REPO = "{repository}"' in source
    assert "<" not in repository and "<org>" not in source  # nothing left for the user to fill in


def _run_install_cell(monkeypatch, jaxgpt_dir, *, clone_rc=0, pip_rc=0):
    """Executes the install cell with git and pip replaced by recorders; returns the commands and the cell's
    namespace (SystemExit propagates)."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        if cmd[0] == "git":
            return subprocess.CompletedProcess(cmd, clone_rc, "", "fatal: repository not found")
        pins = pathlib.Path(cmd[cmd.index("-c") + 1]).read_text()
        calls[-1].append(pins)
        return subprocess.CompletedProcess(cmd, pip_rc, "", "ResolutionImpossible: flax")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("JAXGPT_DIR", str(jaxgpt_dir))
    namespace = {}
    exec(compile(install_cell(), "install-cell", "exec"), namespace)
    return calls, namespace


def test_install_cell_installs_an_uploaded_folder_keeping_the_runtimes_jax(monkeypatch, capsys):
    calls, _ = _run_install_cell(monkeypatch, ROOT)  # the checkout stands for a folder uploaded to Colab
    assert [c[0] for c in calls] == [sys.executable]  # no clone: the upload is used
    cmd, pins = calls[0][:-1], calls[0][-1]
    assert cmd[1:4] == ["-m", "pip", "install"] and ROOT in cmd
    assert f"jax=={importlib.metadata.version('jax')}" in pins.split()
    assert f"jaxlib=={importlib.metadata.version('jaxlib')}" in pins.split()
    printed = capsys.readouterr().out
    assert f"jax                {importlib.metadata.version('jax')}" in printed and "flax" in printed


def test_install_cell_clones_when_nothing_is_uploaded_and_says_what_to_do_when_it_cannot(monkeypatch, tmp_path):
    target = tmp_path / "jaxgpt"
    with pytest.raises(SystemExit, match="upload the project folder") as e:
        _run_install_cell(monkeypatch, target, clone_rc=128)
    assert str(target) in str(e.value) and "github.com" in str(e.value)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 0, "", ""))
    namespace = {}
    exec(compile(install_cell(), "install-cell", "exec"), namespace)
    assert calls[0][:2] == ["git", "clone"] and calls[0][-1] == str(target)
    assert str(target) in calls[1]


def test_install_cell_names_the_runtimes_jax_when_pip_cannot_fit_it(monkeypatch):
    with pytest.raises(SystemExit, match=f"jax=={importlib.metadata.version('jax')}.*ResolutionImpossible"):
        _run_install_cell(monkeypatch, ROOT, pip_rc=1)


@pytest.mark.slow  # a Python subprocess
def test_notebook_trains_plots_and_samples_on_cpu(tmp_path, shakespeare_path):
    env = dict(
        os.environ,
        JAXGPT_NOTEBOOK_SMOKE="1",
        JAXGPT_NOTEBOOK_OUT=str(tmp_path / "out"),
        JAXGPT_SHAKESPEARE=str(shakespeare_path),
        JAXGPT_DIR=ROOT,  # the project folder, where the notebook finds configs/shakespeare_char.py
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
