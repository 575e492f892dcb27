"""notebooks/colab_tpu.ipynb runs: its code cells (all but the one tagged 'install') execute in a fresh
Python on CPU with JAXGPT_NOTEBOOK_SMOKE=1 (a few steps of a tiny model), so the notebook cannot rot; the install
cell runs with pip recorded instead of executed (CI's oldest-versions environment runs it for real: .ci/run)."""

import importlib.metadata
import json
import os
import pathlib
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


def test_no_invented_address():
    """jaxgpt has no published repository: the notebooks install from the uploaded project folder, and no file
    names an address the project does not own."""
    for path in ("notebooks/colab_tpu.ipynb", "notebooks/lets_build_gpt.ipynb", "README.md", "pyproject.toml"):
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        assert "github.com/jaxgpt" not in text and "git clone" not in text and "git+" not in text, path


def _run_install_cell(monkeypatch, jaxgpt_dir, *, pip_rc=0):
    """Executes the install cell with pip replaced by a recorder; returns the commands (SystemExit propagates)."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        pins = pathlib.Path(cmd[cmd.index("-c") + 1]).read_text()
        calls[-1].append(pins)
        return subprocess.CompletedProcess(cmd, pip_rc, "", "ResolutionImpossible: flax")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("JAXGPT_DIR", str(jaxgpt_dir))
    exec(compile(install_cell(), "install-cell", "exec"), {})
    return calls


def test_install_cell_installs_the_uploaded_folder_keeping_the_runtimes_jax(monkeypatch, capsys):
    calls = _run_install_cell(monkeypatch, ROOT)  # the checkout stands for the folder uploaded to Colab
    assert len(calls) == 1
    cmd, pins = calls[0][:-1], calls[0][-1]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and ROOT in cmd
    for name in ("jax", "jaxlib", "libtpu"):  # libtpu where the runtime has it (Colab's TPU image does)
        if name == "libtpu" and not _installed(name):
            continue
        assert f"{name}=={importlib.metadata.version(name)}" in pins.split()
    printed = capsys.readouterr().out
    assert f"jax                {importlib.metadata.version('jax')}" in printed and "flax" in printed


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_install_cell_says_where_to_upload_the_folder(monkeypatch, tmp_path):
    target = tmp_path / "jaxgpt"
    with pytest.raises(SystemExit, match="upload the project folder") as e:
        _run_install_cell(monkeypatch, target)
    assert str(target) in str(e.value)


def test_install_cell_names_the_runtimes_jax_when_pip_cannot_fit_it(monkeypatch):
    with pytest.raises(SystemExit, match=f"jax=={importlib.metadata.version('jax')}.*ResolutionImpossible"):
        _run_install_cell(monkeypatch, ROOT, pip_rc=1)


def test_the_device_check_stops_on_a_cpu_outside_smoke_mode(monkeypatch, capsys):
    """Never silently a CPU: the cell after the install says so, and stops unless ALLOW_CPU."""
    cells = [c for c in json.load(open(NOTEBOOK))["cells"] if c["cell_type"] == "code"]
    check = "".join(cells[1]["source"])
    assert "jax.devices()" in check
    monkeypatch.delenv("JAXGPT_NOTEBOOK_SMOKE", raising=False)
    with pytest.raises(SystemExit, match="Change runtime type"):
        exec(compile(check, "device-cell", "exec"), {})
    assert "NOT A TPU: this runtime's jax sees CPU devices only" in capsys.readouterr().out


@pytest.mark.slow  # a Python subprocess
@pytest.mark.parametrize("n_devices", [1, 8])
def test_notebook_trains_plots_and_samples_on_cpu(tmp_path, shakespeare_path, n_devices):
    """The notebook in smoke mode, on one CPU device and on eight (a v5e-8's data-parallel mesh)."""
    env = dict(
        os.environ,
        JAXGPT_NOTEBOOK_SMOKE="1",
        JAXGPT_NOTEBOOK_OUT=str(tmp_path / "out"),
        JAXGPT_SHAKESPEARE=str(shakespeare_path),
        JAXGPT_DIR=ROOT,  # the project folder, where the notebook finds configs/shakespeare_char.py
        MPLBACKEND="Agg",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}",
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
    assert "NOT A TPU: this runtime's jax sees CPU devices only" in proc.stdout  # said plainly, not silent
    assert f"{n_devices} device(s), {8 // n_devices} sequences each per step; compute float32" in proc.stdout
    if n_devices > 1:
        assert f"mesh: data {n_devices} x fsdp 1 over {n_devices} cpu devices" in proc.stdout
