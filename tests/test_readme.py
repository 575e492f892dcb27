"""The README and docs/ say what works: every ```python block runs as written, every shell command's
`train.py` / `sample.py` / `jaxgpt.prepare` options exist, and the README's first commands train and sample.

The python blocks run in a fresh Python in a scratch folder that holds what a user would have there: the
corpus in the download cache ($JAXGPT_CACHE), a run of the CPU config trained by the README's own command
(shrunk to a tiny model), a nanoGPT out_dir and a local GPT-2 folder (for docs/interop.md).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = [
    "--config.max_iters=4", "--config.eval_interval=4", "--config.steps_per_call=2", "--config.eval_iters=2",
    "--config.warmup_iters=1", "--config.lr_decay_iters=4", "--config.model.n_layer=1", "--config.model.n_head=2",
    "--config.model.n_embd=16", "--config.model.block_size=16", "--config.batch_size=4",
    "--config.sample_tokens=10", "--config.progress=False",
]


def blocks(page: pathlib.Path, *langs: str) -> list[str]:
    """The fenced code blocks of `page` whose info string is one of `langs`."""
    found = re.findall(r"^```(\w*)\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return [code for lang, code in found if lang in langs]


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block as argument lists: continuation lines joined, comments, `VAR=value`
    prefixes and a trailing `&` dropped, `a && b` split."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            cmd, words = words[:cut], words[cut + 1:]
            while cmd and re.fullmatch(r"[A-Z_]+=.*", cmd[0]):
                cmd = cmd[1:]
            if cmd and cmd[-1] == "&":
                cmd = cmd[:-1]
            if cmd:
                out.append(cmd)
    return out


def shell_commands(script: str) -> list[tuple[str, list[str]]]:
    """(page name, command) for every `python <script>` command in the shell blocks of the README and docs/."""
    found = []
    for page in PAGES:
        for code in blocks(page, "bash", "sh"):
            found += [(page.name, cmd) for cmd in commands(code) if cmd[:2] == ["python", script]]
    return found


def python_blocks() -> list[tuple[str, str]]:
    return [(f"{page.name}#{i}", code) for page in PAGES for i, code in enumerate(blocks(page, "python"))]


def test_the_pages_have_what_this_file_checks():
    assert len(shell_commands("train.py")) >= 5 and len(shell_commands("sample.py")) >= 3
    assert len(python_blocks()) >= 4
    readme = ROOT.joinpath("README.md").read_text()
    assert len(readme.splitlines()) <= 150  # one first screen
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", readme))
    assert linked == {f"docs/{p.name}" for p in PAGES[1:]}  # every page is linked, every link has a page


@pytest.mark.parametrize("page, cmd", shell_commands("train.py"), ids=lambda v: " ".join(v) if isinstance(v, list)
                         else v)
def test_train_commands_name_existing_configs_and_keys(page, cmd):
    import train
    from jaxgpt import config as config_lib

    argv = train.translate_argv(["train.py", *cmd[2:]])
    path = train._config_path(argv)
    assert path is not None and (ROOT / path).is_file(), f"{page}: {' '.join(cmd)}"
    config = config_lib.load_config_file(ROOT / path)
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            assert config_lib.unknown_key(config, key) is None, f"{page}: {arg}"


@pytest.mark.parametrize("page, cmd", shell_commands("sample.py"), ids=lambda v: " ".join(v) if isinstance(v, list)
                         else v)
def test_sample_commands_parse(page, cmd):
    import sample

    args = sample.parse_args(cmd[2:])
    if args.config is not None:
        assert (ROOT / args.config).is_file(), f"{page}: {' '.join(cmd)}"


def test_prepare_commands_use_existing_options():
    source = (ROOT / "jaxgpt" / "prepare.py").read_text()
    cmds = [cmd for page in PAGES for code in blocks(page, "bash", "sh") for cmd in commands(code)
            if cmd[:3] == ["python", "-m", "jaxgpt.prepare"]]
    assert cmds
    for cmd in cmds:
        for arg in cmd[3:]:
            if arg.startswith("--"):
                assert f'"{arg.split("=")[0]}"' in source, " ".join(cmd)


def test_ci_runs_the_readmes_install_and_test_commands():
    """`.ci/run` does what the README tells a newcomer: the same installs (the project, then the compile-only packages
    of the accelerator checks), then pytest."""
    readme = commands(next(code for code in blocks(ROOT / "README.md", "bash") if "pytest" in code))
    assert [c[0] for c in readme] == ["pip", "pip", "python", "pytest"], readme
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith(("pip ", "pytest", "python benchmarks/"))]
    ci = [[w for w in cmd if w != "-q"] for cmd in commands("\n".join(lines))]
    assert len(ci) == 4 and [c[:len(r)] for c, r in zip(ci, readme)] == readme, ci

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shakespeare_path):
    """A scratch folder and environment in which the README's commands and snippets run as written."""
    ws = tmp_path_factory.mktemp("readme")
    cache = ws / "cache"
    (cache / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(shakespeare_path, cache / "tinyshakespeare" / "input.txt")  # as jaxgpt's download leaves it
    (ws / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, JAXGPT_CACHE=str(cache), JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JAXGPT_SHAKESPEARE", None)
    return ws, env


def _run(workspace, args, timeout=300):
    ws, env = workspace
    return subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(workspace):
    """The README's first training command, shrunk to a tiny model, run in the workspace."""
    first = next(cmd for cmd in commands(blocks(ROOT / "README.md", "bash")[0]) if cmd[:2] == ["python", "train.py"])
    r = _run(workspace, [sys.executable, str(ROOT / "train.py"), *first[2:], *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    ws, _ = workspace
    assert (ws / "out-shakespeare-char-cpu" / "checkpoints" / "best").is_dir()
    return workspace


@pytest.mark.slow
def test_readme_quickstart_trains_then_samples_that_run(trained):
    """The first block: train the CPU config, then `sample.py --config` finds its out_dir, and prints no
    Orbax notes and no traceback."""
    sample_cmd = next(cmd for cmd in commands(blocks(ROOT / "README.md", "bash")[0]) if cmd[:2] == ["python",
                                                                                                 "sample.py"])
    r = _run(trained, [sys.executable, str(ROOT / "sample.py"), *sample_cmd[2:], "--max_new_tokens=12"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ROMEO:") and r.stdout.count("---------------") == 3
    assert "WARNING:absl" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def interop_files(trained, shakespeare_path):
    """docs/interop.md's inputs: a nanoGPT out_dir with meta.pkl, and a local GPT-2 folder with tokenizer.json."""
    from flax import nnx

    import jaxgpt
    from tests.test_interop import _hf_gpt2
    from tests.test_tokenizer_bpe import train_bpe

    ws, _ = trained
    text = shakespeare_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    run = ws / "nanoGPT" / "out-shakespeare-char"
    model = jaxgpt.GPT(jaxgpt.GPTConfig(vocab_size=len(chars), block_size=16, n_layer=1, n_head=2, n_embd=16),
                       rngs=nnx.Rngs(0))
    jaxgpt.save_nanogpt_checkpoint(model, run / "ckpt.pt", iter_num=100, config={"dataset": "shakespeare_char"})
    with open(run / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    gpt2 = ws / "path" / "to" / "gpt2"
    _hf_gpt2().save_pretrained(gpt2)
    train_bpe(text[:20_000]).save(str(gpt2 / "tokenizer.json"))
    return trained


@pytest.mark.slow
@pytest.mark.parametrize("name, code", python_blocks(), ids=[name for name, _ in python_blocks()])
def test_python_blocks_run_as_written(interop_files, name, code):
    r = _run(interop_files, [sys.executable, "-c", code])
    assert r.returncode == 0, f"{name}:\n{code}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr


def test_submodules_are_reachable_as_attributes_and_imported_on_first_use():
    code = ("import sys, jaxgpt\n"
            "assert 'jaxgpt.training' not in sys.modules and 'jaxgpt.prepare' not in sys.modules\n"
            "assert jaxgpt.data.get_batch and jaxgpt.training.train and jaxgpt.prepare.load_prepared\n"
            "assert {'data', 'training', 'checkpoint'} <= set(dir(jaxgpt))\n"
            "try:\n    jaxgpt.no_such_thing\nexcept AttributeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "module 'jaxgpt' has no attribute 'no_such_thing'"


def test_the_docs_say_that_config_files_run_as_code():
    """A config file is a Python script: the README, the training docs and both --help texts say to trust it as one."""
    import sample
    import train

    for text in [(ROOT / "README.md").read_text(), (ROOT / "docs" / "training.md").read_text(), train.__doc__,
                 sample.build_parser().format_help()]:
        flat = " ".join(text.split())
        assert "runs as code" in flat or "run it as code" in flat, flat[:300]
        assert "trust a config file as you would trust a script" in flat or "trust it as you would trust a script" \
            in flat
