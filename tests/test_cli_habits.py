"""A newcomer's command lines: nanoGPT's forms accepted where their meaning is plain, nanoGPT options without a
counterpart refused with the jaxgpt way, mistyped or broken config files in one line, `sample.py --config`."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

import train
from jaxgpt import checkpoint
from tests.test_training import tiny_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU_CONFIG = "configs/shakespeare_char_cpu.py"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, JAXGPT_CACHE=str(cache), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def _run(env, script, *args, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def test_translate_argv_maps_nanogpts_forms():
    argv = ["train.py", CPU_CONFIG, "--max_iters=300", "--n_layer=4", "--dtype=bfloat16", "--bias=True",
            "--gradient_accumulation_steps=2", "--config.model.n_head=2", "--init_from=nanogpt:run"]
    assert train.translate_argv(argv) == [
        "train.py", f"--config={CPU_CONFIG}", "--config.max_iters=300", "--config.model.n_layer=4",
        "--config.model.dtype=bfloat16", "--config.model.bias=True", "--config.grad_accum_steps=2",
        "--config.model.n_head=2", "--config.init_from=nanogpt:run",
    ]
    # `--config FILE` and `--config.key VALUE` keep their values; absl's own flags pass through
    assert train.translate_argv(["t", "--config", CPU_CONFIG, "--config.max_iters", "3", "--verbosity=1"],
                                {"verbosity"}) == ["t", "--config", CPU_CONFIG, "--config.max_iters", "3",
                                                   "--verbosity=1"]


@pytest.mark.parametrize("argv", [["a.py", "b.py"], ["notes.txt"], ["--config", CPU_CONFIG, "configs/bigram.py"]])
def test_translate_argv_refuses_stray_positionals(argv):
    with pytest.raises(ValueError, match="config"):
        train.translate_argv(["train.py", *argv])


@pytest.mark.slow
@pytest.mark.parametrize(
    "arg, hint",
    [
        ("--device=cpu", "JAX_PLATFORMS=cpu"),
        ("--compile=False", "always compiles with XLA"),
        ("--init_from=resume", "--config.resume=True"),
        ("--init_from=gpt2-medium", "--config.init_from=gpt2:PATH"),
        ("--wandb_log=True", "out_dir/metrics.jsonl"),
        ("--dataset=shakespeare_char", "--config.data.path=data/<dataset>"),
        ("--backend=nccl", "jax.distributed"),
    ],
)
def test_nanogpt_options_without_a_counterpart_name_the_jaxgpt_way(env, tmp_path, arg, hint):
    start = time.perf_counter()
    r = _run(env, "train.py", CPU_CONFIG, arg, f"--out_dir={tmp_path / 'out'}")
    line = _one_error_line(r)
    assert arg.split("=")[0] in line and hint in line
    assert time.perf_counter() - start < 30  # refused before JAX starts (generous: a loaded 2-core machine)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_mistyped_config_file_is_one_line_naming_it(env, tmp_path):
    for args in (["--config", "configs/shakespeare_char_cpuu.py"], ["configs/shakespeare_char_cpuu.py"]):
        line = _one_error_line(_run(env, "train.py", *args, f"--config.out_dir={tmp_path / 'out'}"))
        assert "'configs/shakespeare_char_cpuu.py' not found" in line
        assert "did you mean 'configs/shakespeare_char_cpu.py'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_config_file_that_fails_to_load_is_one_line(env, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    line = _one_error_line(_run(env, "train.py", str(broken)))
    assert str(broken) in line and "SyntaxError" in line
    no_function = tmp_path / "empty.py"
    no_function.write_text("x = 1\n")
    line = _one_error_line(_run(env, "train.py", str(no_function)))
    assert str(no_function) in line and "get_config" in line


@pytest.mark.slow
def test_an_unknown_top_level_key_in_nanogpt_form_names_the_closest(env, tmp_path):
    line = _one_error_line(_run(env, "train.py", CPU_CONFIG, "--max_iterz=3", f"--out_dir={tmp_path / 'out'}"))
    assert "unknown config key 'max_iterz' (did you mean 'max_iters'?)" in line


@pytest.mark.slow
def test_nanogpt_forms_train_and_sample_config_finds_the_run(env, tmp_path, shakespeare_path):
    text = tiny_text(tmp_path, shakespeare_path)
    out = tmp_path / "run"
    r = _run(env, "train.py", CPU_CONFIG, "--max_iters=4", "--n_layer=1", "--n_head=2", "--n_embd=16",
             "--block_size=8", "--batch_size=4", "--eval_iters=2", "--eval_interval=4", "--steps_per_call=2",
             "--warmup_iters=1", "--lr_decay_iters=4", "--progress=False", "--sample_tokens=5",
             f"--config.data.path={text}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    _, _, info = checkpoint.load_model(out, "latest")
    assert info["step"] == 4 and info["config"]["model"]["n_layer"] == 1 and info["config"]["batch_size"] == 4

    config = tmp_path / "my_config.py"  # a user's config: the CPU recipe with its own out_dir
    config.write_text(f"from jaxgpt.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                      f"    c.out_dir = {str(out)!r}\n    return c\n")
    r = _run(env, "sample.py", "--config", str(config), "--start=ROMEO:", "--num_samples=1",
             "--max_new_tokens=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.split("\n---")[0]) == len("ROMEO:") + 6
    assert "WARNING:absl" not in r.stderr, r.stderr  # Orbax's read-only notes are not the user's business

    r = _run(env, "sample.py", "--config", str(tmp_path / "nope.py"), cwd=tmp_path)
    assert r.returncode == 2 and "nope.py' not found" in r.stderr and "Traceback" not in r.stderr


def _offline(env: dict, cache: pathlib.Path) -> dict:
    """`env` without a local tiny Shakespeare and without internet: https goes to a closed local port."""
    env = {k: v for k, v in env.items() if k not in ("JAXGPT_SHAKESPEARE", "no_proxy", "NO_PROXY")}
    return dict(env, JAXGPT_CACHE=str(cache), https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")


@pytest.mark.slow
def test_offline_train_fails_in_seconds_saying_how_to_point_at_a_local_copy(env, tmp_path, shakespeare_path):
    start = time.perf_counter()
    r = _run(_offline(env, tmp_path / "cache"), "train.py", CPU_CONFIG, f"--out_dir={tmp_path / 'out'}")
    line = _one_error_line(r)
    assert "could not download" in line and "set JAXGPT_SHAKESPEARE=/path/to/input.txt" in line
    assert time.perf_counter() - start < 30 and not (tmp_path / "out").exists()
    # the same run pointed at a local copy: trains from it, nothing downloaded
    text = tiny_text(tmp_path, shakespeare_path)
    r = _run(dict(_offline(env, tmp_path / "cache"), JAXGPT_SHAKESPEARE=str(text)), "train.py", CPU_CONFIG,
             f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_iters=1", "--n_layer=1", "--block_size=8",
             "--batch_size=2", "--sample_tokens=0", "--config.progress=False")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"from {text}" in r.stdout and not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()


@pytest.mark.slow
def test_offline_test_suite_stops_at_once_with_one_line(env, tmp_path):
    """The README's test command offline, without a local corpus: one line at the start, not an error per test."""
    tests = tmp_path / "checkout" / "tests"  # no sibling shared/ folder beside this checkout
    tests.mkdir(parents=True)
    (tests / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tests / "test_nothing.py").write_text("def test_nothing(shakespeare_path):\n    pass\n")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tests)],
                       env=_offline(env, tmp_path / "cache"), capture_output=True, text=True, timeout=120,
                       cwd=tmp_path / "checkout")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "set JAXGPT_SHAKESPEARE=/path/to/input.txt" in r.stdout + r.stderr
    assert "passed" not in r.stdout and "error" in (r.stdout + r.stderr).lower()
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_help_lists_every_config_key_with_its_default_and_exits_0(env):
    from jaxgpt.config_help import KEY_HELP

    r = _run(env, "train.py", "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    for key, text in KEY_HELP.items():
        assert f"--config.{key}=" in r.stdout and text in r.stdout
    assert "--config.max_iters=600000" in r.stdout  # base_config's defaults without a config file
    r = _run(env, "train.py", CPU_CONFIG, "-h")
    assert r.returncode == 0 and "--config.max_iters=2000" in r.stdout and f"defaults from {CPU_CONFIG}" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arg, said", [
    ("config/train_shakespeare_char.py", "did you mean 'configs/shakespeare_char.py'?"),  # nanoGPT's path
    ("config/train_gpt2.py", "did you mean 'configs/gpt2_124m.py'?"),
    ("--config.max_iters=abc", "--config.max_iters=abc: max_iters takes a whole number (this config has 2000), "
                               "not 'abc'"),
    ("--max_iters=1e3", "max_iters takes a whole number"),
    ("--config.learning_rate=fast", "learning_rate takes a number (this config has 0.001), not 'fast'"),
    ("--config.resume=maybe", "resume takes True or False"),
    ("--config.model.vocab_size=x", "model.vocab_size takes a whole number"),
])
def test_a_bad_path_or_value_is_answered_in_jaxgpts_words(env, tmp_path, arg, said):
    args = [arg] if arg.endswith(".py") else [CPU_CONFIG, arg]
    line = _one_error_line(_run(env, "train.py", *args, f"--out_dir={tmp_path / 'out'}"))
    assert said in line and "invalid literal" not in line and "could not convert" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_one_character_vocabulary_trains_and_samples_by_default(env, tmp_path):
    """Every loss is 0, so no evaluation improves on step 0's: the first trained state is still 'best'."""
    text = tmp_path / "a.txt"
    text.write_text("a" * 400)
    out = tmp_path / "run"
    r = _run(env, "train.py", CPU_CONFIG, "--max_iters=4", "--n_layer=1", "--n_head=2", "--n_embd=16",
             "--block_size=8", "--batch_size=4", "--eval_iters=2", "--eval_interval=2", "--steps_per_call=2",
             "--warmup_iters=1", "--lr_decay_iters=4", "--progress=False", "--sample_tokens=5",
             "--always_save_checkpoint=False", f"--config.data.path={text}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.load_model(out, "best")[2]["step"] == 2
    r = _run(env, "sample.py", f"--out_dir={out}", "--start=a", "--num_samples=1", "--max_new_tokens=3")
    assert r.returncode == 0 and r.stdout.startswith("aaaa"), r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("inside", ["checkpoints/latest/300/inner", "checkpoints/best", "checkpoints/new"])
def test_an_out_dir_inside_another_runs_checkpoints_is_refused(env, tmp_path, inside):
    outer = tmp_path / "outer"
    (outer / "checkpoints" / "latest" / "300").mkdir(parents=True)  # a run's step, as has_checkpoint sees one
    out = outer / inside
    existed = out.exists()
    line = _one_error_line(_run(env, "train.py", CPU_CONFIG, f"--out_dir={out}"))
    assert f"is inside the checkpoints of the run in {outer}" in line and "outside" in line
    assert out.exists() == existed and sorted(p.name for p in (outer / "checkpoints").iterdir()) == ["latest"]
    # a run's own sub-folder that is not among its checkpoints, or a folder merely named checkpoints, is fine
    from jaxgpt.run_dir import check_out_dir

    check_out_dir(outer / "elsewhere", resume=False, overwrite=False)
    check_out_dir(tmp_path / "checkpoints" / "run1", resume=False, overwrite=False)
