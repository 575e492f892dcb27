"""sample.py's command line, with the checkpoint loader replaced by an in-memory model."""

import io

import jax
import numpy as np
import pytest
from flax import nnx

import jaxgpt
import sample

TOK = jaxgpt.CharTokenizer.from_text("\n !ABCDEFGHIJKLMNOPQRSTUVWXYZ:abcdefghijklmnopqrstuvwxyz")


def fake_loader(calls=None):
    config = jaxgpt.GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = jaxgpt.GPT(config, rngs=nnx.Rngs(0))

    def load(out_dir, which):
        if calls is not None:
            calls.append((out_dir, which))
        return model, TOK, {}

    return load, model


def run(argv, tmp_path, loader=None):
    out, err = io.StringIO(), io.StringIO()
    loader = loader or fake_loader()[0]
    code = sample.main([f"--out_dir={tmp_path}", *argv], load_model=loader, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_streams_the_same_text_as_generate(tmp_path):
    calls = []
    loader, model = fake_loader(calls)
    argv = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=20", "--top_k=5", "--seed=3", "--chunk_size=3"]
    code, out, err = run([*argv, "--which=latest"], tmp_path, loader)
    assert code == 0 and err == ""
    assert calls == [(str(tmp_path), "latest")]
    samples = out.split("\n---------------\n")[:2]
    keys = jax.random.split(jax.random.key(3), 2)
    for text, key in zip(samples, keys):
        ids = jaxgpt.generate(model, TOK.encode("ROMEO:")[None], 20, key=key, temperature=0.8, top_k=5)
        assert text == TOK.decode(ids[0])


def test_prompt_from_file(tmp_path):
    (tmp_path / "prompt.txt").write_text("KING:\nAB", encoding="utf-8")
    code, out, _ = run([f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=1", "--max_new_tokens=4"], tmp_path)
    assert code == 0 and out.startswith("KING:\nAB") and len(out) == len("KING:\nAB") + 4 + 17


def test_unknown_prompt_characters_are_listed_on_one_line(tmp_path):
    code, out, err = run(["--start=ROMEO: é 3 é", "--max_new_tokens=4"], tmp_path)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "'é'" in err and "'3'" in err


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    code, out, err = run([f"--out_dir={missing}"], tmp_path)
    assert code != 0 and out == "" and err.count("\n") == 1 and str(missing) in err

    def raising(out_dir, which):
        raise FileNotFoundError(f"{out_dir}/ckpt")

    code, _, err = run([], tmp_path, raising)
    assert code != 0 and err.count("\n") == 1 and str(tmp_path) in err


@pytest.mark.parametrize(
    "arg, word",
    [
        ("--max_new_tokens=-5", "max_new_tokens"),
        ("--temperature=-1", "temperature"),
        ("--temperature=abc", "temperature"),
        ("--top_p=2", "top_p"),
        ("--num_samples=0", "num_samples"),
        ("--top_k=-3", "top_k"),
        ("--which=middle", "which"),
    ],
)
def test_bad_numbers_are_one_line_errors(arg, word, tmp_path):
    code, out, err = run([arg], tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1 and word in err


def test_greedy_and_no_cache_agree(tmp_path):
    a = run(["--temperature=0", "--num_samples=1", "--max_new_tokens=20"], tmp_path)
    b = run(["--temperature=0", "--num_samples=1", "--max_new_tokens=20", "--no_cache"], tmp_path)
    assert a[0] == b[0] == 0 and a[1] == b[1]
    assert np.all([c in TOK.stoi or c == "-" for c in a[1]])


def test_a_run_without_checkpoints_is_one_line_saying_each_thing_once(tmp_path):
    (tmp_path / "run").mkdir()
    code, out, err = run([f"--out_dir={tmp_path / 'run'}"], tmp_path, sample._default_load_model)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.count("no best checkpoint") == 1 and err.count("no latest checkpoint") == 1
    assert err.count("train first") == 1


def test_without_which_an_unusable_best_falls_back_to_latest_with_a_note(tmp_path):
    calls = []
    loader, _ = fake_loader(calls)

    def best_is_corrupt(out_dir, which):
        if which == "best":
            raise sample.UsageError("no usable checkpoint in run/checkpoints: best/300: a file is corrupt")
        return loader(out_dir, which)

    code, out, err = run(["--start=AB", "--num_samples=1", "--max_new_tokens=2"], tmp_path, best_is_corrupt)
    assert code == 0 and out.startswith("AB")
    assert err.count("\n") == 1 and "note: " in err and "best/300" in err and "latest" in err
    code, out, err = run(["--which=best", "--start=AB"], tmp_path, best_is_corrupt)  # asked for: no fallback
    assert code == 2 and out == "" and "best/300" in err and "note" not in err


def test_greedy_sampling_of_several_samples_says_they_are_the_same(tmp_path):
    code, out, err = run(["--start=AB", "--num_samples=3", "--max_new_tokens=4", "--temperature=0"], tmp_path)
    samples = out.split("\n---------------\n")[:3]
    assert code == 0 and len(set(samples)) == 1
    assert err.count("\n") == 1 and "--temperature=0 is greedy, so the 3 samples are the same" in err
    code, out, err = run(["--start=AB", "--num_samples=1", "--max_new_tokens=4", "--temperature=0"], tmp_path)
    assert code == 0 and err == ""
