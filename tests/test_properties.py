"""Bad input, tried systematically with hypothesis: the tokenizer, get_batch, config values, sample.py options."""

from __future__ import annotations

import io
import re

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sample
from jaxgpt import config as config_lib
from jaxgpt import data
from jaxgpt.tokenizer import CharTokenizer

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------ tokenizer


@SETTINGS
@given(vocab=st.text(min_size=1, max_size=40), data_=st.data())
def test_any_text_over_the_vocabulary_round_trips(vocab, data_):
    tok = CharTokenizer.from_text(vocab)
    text = data_.draw(st.text(alphabet=sorted(set(vocab)), max_size=60))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ((0 <= ids) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == text


@SETTINGS
@given(vocab=st.text(min_size=1, max_size=40), data_=st.data())
def test_a_character_outside_the_vocabulary_is_named(vocab, data_):
    tok = CharTokenizer.from_text(vocab)
    stranger = data_.draw(st.characters().filter(lambda c: c not in tok.stoi))
    known = data_.draw(st.text(alphabet=sorted(set(vocab)), max_size=10))
    pos = data_.draw(st.integers(0, len(known)))
    text = known[:pos] + stranger + known[pos:]
    with pytest.raises(ValueError, match=re.escape(f"character {stranger!r} at position {pos} ")):
        tok.encode(text)
    assert tok.unknown_chars(text) == [stranger]


# ------------------------------------------------------------------------------------------ get_batch

TOKENS = np.arange(40, dtype=np.int32) * 3  # distinct tokens: a window's position is its first token / 3


@settings(SETTINGS, max_examples=12)  # each new (batch_size, block_size) compiles the gather
@given(batch_size=st.integers(1, 4), block_size=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_get_batch_shapes_and_shift(batch_size, block_size, seed):
    x, y = data.get_batch(jax.random.PRNGKey(seed), TOKENS, batch_size, block_size)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape == (batch_size, block_size) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    start = x[:, 0] // 3
    assert ((0 <= start) & (start <= len(TOKENS) - block_size - 1)).all()
    np.testing.assert_array_equal(x, TOKENS[start[:, None] + np.arange(block_size)])  # contiguous windows
    np.testing.assert_array_equal(y, TOKENS[start[:, None] + np.arange(1, block_size + 1)])


@SETTINGS
@given(n_tokens=st.integers(0, 12), block_size=st.integers(-2, 12), batch_size=st.integers(-2, 3))
def test_get_batch_rejects_impossible_sizes(n_tokens, block_size, batch_size):
    assume(not (block_size >= 1 and n_tokens >= block_size + 1 and batch_size >= 1))  # possible: covered above
    with pytest.raises(ValueError, match="block_size|batch_size|tokens"):
        data.get_batch(jax.random.PRNGKey(0), np.arange(n_tokens, dtype=np.int32), batch_size, block_size)


# ------------------------------------------------------------------------------------------ config values

BASE = config_lib.base_config()
LEAVES = {f"{prefix}{k}": v for prefix, group in (("", BASE), ("model.", BASE.model), ("data.", BASE.data))
          for k, v in group.items() if not isinstance(v, ml_collections.ConfigDict)}
SIZES = ["batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "log_interval",
         "steps_per_call", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size"]


def _with(changes: dict) -> ml_collections.ConfigDict:
    """A config built from a plain dict, so that any value gets in (ConfigDict's setters check types)."""
    d = BASE.to_dict()
    for key, value in changes.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict(d)


def _assert_config_error(config: ml_collections.ConfigDict, key: str) -> None:
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    message = str(e.value)
    assert "\n" not in message and key.rsplit(".", 1)[-1] in message, message


def _wrong_type(value):
    """Values of any type but the key's (ints are fine where floats are expected)."""
    others = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans(), st.integers(),
                       st.floats(allow_nan=False))
    if isinstance(value, bool):
        return others.filter(lambda v: not isinstance(v, bool))
    if isinstance(value, float):
        return others.filter(lambda v: isinstance(v, (str, list, bool)))
    if isinstance(value, int):
        return others.filter(lambda v: isinstance(v, (str, list, bool, float)))
    return others.filter(lambda v: not isinstance(v, str))


@SETTINGS
@given(data_=st.data())
def test_a_wrong_type_is_one_error_naming_the_key(data_):
    key = data_.draw(st.sampled_from(sorted(k for k, v in LEAVES.items() if v is not None)))
    _assert_config_error(_with({key: data_.draw(_wrong_type(LEAVES[key]))}), key)


@SETTINGS
@given(key=st.from_regex(r"(model\.|data\.)?[a-z][a-z_]{0,12}", fullmatch=True), value=st.integers())
def test_an_unknown_key_is_one_error_naming_it(key, value):
    assume(key not in LEAVES and key not in ("model", "data"))
    d = BASE.to_dict()
    node = d
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    _assert_config_error(ml_collections.ConfigDict(d), key)


@SETTINGS
@given(key=st.sampled_from(SIZES), value=st.integers(-10**6, 0))
def test_a_size_below_one_is_one_error_naming_it(key, value):
    _assert_config_error(_with({key: value}), key)


@SETTINGS
@given(n_head=st.integers(1, 16), n_embd=st.integers(1, 512))
def test_n_embd_must_divide_by_n_head(n_head, n_embd):
    config = _with({"model.n_head": n_head, "model.n_embd": n_embd})
    if n_embd % n_head:
        _assert_config_error(config, "model.n_head")
    else:
        config_lib.validate(config)


@SETTINGS
@given(changes=st.fixed_dictionaries({
    "batch_size": st.integers(1, 64), "max_iters": st.integers(1, 10**6), "learning_rate": st.floats(1e-8, 1.0),
    "beta2": st.floats(0.0, 0.999), "model.n_layer": st.integers(1, 12), "model.block_size": st.integers(1, 2048),
    "data.train_fraction": st.floats(0.01, 0.99), "skip_nonfinite": st.booleans(),
}))
def test_valid_values_pass(changes):
    config_lib.validate(_with(changes))


# ------------------------------------------------------------------------------------------ sample.py

VOCAB = CharTokenizer.from_text("abcdefgh \n")


def _not_a(kind):
    def parses(s):
        try:
            kind(s)
            return True
        except ValueError:
            return False

    return st.text(max_size=6).filter(lambda s: not parses(s))


BAD_OPTIONS = st.one_of(
    st.tuples(st.sampled_from(["num_samples", "chunk_size"]), st.integers(-100, 0).map(str)),
    st.tuples(st.sampled_from(["max_new_tokens", "top_k"]), st.integers(-100, -1).map(str)),
    st.tuples(st.sampled_from(["num_samples", "max_new_tokens", "top_k", "chunk_size", "seed"]), _not_a(int)),
    st.tuples(st.sampled_from(["temperature", "top_p"]), _not_a(float)),
    st.tuples(st.just("temperature"), st.sampled_from(["-0.5", "-1e9", "nan", "inf", "-inf"])),
    st.tuples(st.just("top_p"), st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                          st.just(float("nan"))).map(repr)),
    st.tuples(st.just("which"), st.text(max_size=8).filter(lambda s: s not in ("best", "latest"))),
    st.tuples(st.just("start"), st.just("")),
    st.tuples(st.just("start"), st.text(min_size=1, max_size=8).filter(lambda s: VOCAB.unknown_chars(s)
                                                                         and not s.startswith("FILE:"))),
    st.tuples(st.just("start"), st.text(max_size=12).map(lambda s: "FILE:/nonexistent/" + s)),
    st.tuples(st.sampled_from(["nosuch", "x", "tempo"]), st.text(max_size=4)),  # unknown options
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sample_run")


@SETTINGS
@given(bad=BAD_OPTIONS, good=st.lists(st.sampled_from(["--num_samples=2", "--top_k=5", "--temperature=0.5"])))
def test_every_bad_sample_option_is_exit_2_and_one_line(run_dir, bad, good):
    name, value = bad
    loaded = []

    def fake_loader(out_dir, which):
        loaded.append(which)
        return object(), VOCAB, {}

    out, err = io.StringIO(), io.StringIO()
    status = sample.main([f"--out_dir={run_dir}", *good, f"--{name}={value}"], load_model=fake_loader,
                         out=out, err=err)
    assert status == 2
    assert err.getvalue().startswith("sample.py: error: ") and err.getvalue().count("\n") == 1, err.getvalue()
    assert "Traceback" not in err.getvalue() and out.getvalue() == ""


def test_a_missing_checkpoint_is_exit_2_and_one_line(tmp_path):
    err = io.StringIO()
    assert sample.main(["--out_dir", str(tmp_path / "none")], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and "no checkpoint" in err.getvalue()
