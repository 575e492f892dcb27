"""split and get_batch: the lecture's train/val split and a pure, jit-able batch sampler."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.data import get_batch, split


def test_split_is_the_lectures_ninety_ten(shakespeare_path):
    from jaxgpt.tokenizer import CharTokenizer

    text = shakespeare_path.read_text(encoding="utf-8")
    data = CharTokenizer.from_text(text).encode(text)
    train, val = split(data)
    assert (len(train), len(val)) == (1003854, 111540)  # the lecture's printed sizes
    np.testing.assert_array_equal(np.concatenate([train, val]), data)


def test_y_is_x_shifted_by_one_and_windows_are_contiguous():
    data = jnp.arange(1000, dtype=jnp.int32)  # token value == its position
    x, y = get_batch(jax.random.key(0), data, batch_size=16, block_size=8)
    chex.assert_shape([x, y], (16, 8))
    assert x.dtype == jnp.int32
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)
    np.testing.assert_array_equal(np.diff(np.asarray(x), axis=1), 1)
    assert int(y.max()) <= 999


def test_pure_in_key_and_jit_able():
    data = jnp.arange(500, dtype=jnp.int32)
    a = get_batch(jax.random.key(3), data, 4, 16)
    b = get_batch(jax.random.key(3), data, 4, 16)
    c = get_batch(jax.random.key(4), data, 4, 16)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    jitted = jax.jit(get_batch, static_argnames=("batch_size", "block_size"))
    np.testing.assert_array_equal(jitted(jax.random.key(3), data, batch_size=4, block_size=16)[0], a[0])


def test_every_start_offset_is_reachable():
    data = jnp.arange(11, dtype=jnp.int32)  # block 8: starts 0, 1, 2 are the only valid ones
    x, _ = get_batch(jax.random.key(0), data, batch_size=256, block_size=8)
    assert set(np.asarray(x[:, 0]).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("length", [0, 5, 8])
def test_data_shorter_than_block_plus_one_is_a_clear_error(length):
    with pytest.raises(ValueError, match=r"needs at least 9"):
        get_batch(jax.random.key(0), jnp.zeros(length, jnp.int32), batch_size=2, block_size=8)


# ------------------------------------------------------------------ a data folder's meta.pkl and token ids


CHARS = "abc \n"
GOOD_META = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}}


def data_folder(path, meta: object | None = GOOD_META, ids: np.ndarray | None = None):
    """A nanoGPT-format folder: train.bin / val.bin of `ids` (uint16, ids < 5 by default) and `meta` pickled."""
    import pickle

    path.mkdir(parents=True, exist_ok=True)
    ids = np.arange(400, dtype=np.uint16) % len(CHARS) if ids is None else ids
    ids.tofile(path / "train.bin")
    ids[:100].tofile(path / "val.bin")
    if meta is not None:
        with open(path / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return path


HOSTILE_META = {
    "dtype object": ({**GOOD_META, "dtype": "O"}, "dtype 'O'"),
    "dtype float": ({**GOOD_META, "dtype": "float64"}, "dtype 'float64'"),
    "dtype subarray": ({**GOOD_META, "dtype": "(1000000000,)u2"}, "dtype '(1000000000,)u2'"),
    "dtype not a str": ({**GOOD_META, "dtype": 2}, "dtype 2"),
    "vocab_size huge": ({**GOOD_META, "vocab_size": 10**9}, "vocab_size 1000000000"),
    "vocab_size huge alone": ({"vocab_size": 10**9}, "vocab_size 1000000000"),
    "vocab_size huge itos small": ({"vocab_size": 10**9, "itos": {0: "a"}}, "vocab_size 1000000000"),
    "vocab_size negative": ({"vocab_size": -1}, "vocab_size -1"),
    "vocab_size bool": ({"vocab_size": True}, "vocab_size True"),
    "vocab_size str": ({"vocab_size": "65"}, "vocab_size '65'"),
    "vocab_size float": ({"vocab_size": 5.0}, "vocab_size 5.0"),
    "itos a list": ({**GOOD_META, "itos": list(CHARS)}, "itos is a list"),
    "itos shorter": ({**GOOD_META, "itos": {0: "a"}}, "itos has 1 entries but vocab_size is 5"),
    "itos ids shifted": ({**GOOD_META, "itos": {i + 1: c for i, c in enumerate(CHARS)}}, "itos's keys"),
    "itos str ids": ({**GOOD_META, "itos": {str(i): c for i, c in enumerate(CHARS)}}, "itos's keys"),
    "itos long strings": ({**GOOD_META, "itos": {i: c * 2 for i, c in enumerate(CHARS)}}, "itos's values"),
    "itos repeated": ({**GOOD_META, "itos": dict.fromkeys(range(5), "a")}, "itos's values"),
    "stoi not inverse": ({**GOOD_META, "stoi": {"a": 1}}, "stoi is not the inverse of itos"),
    "stoi of lists": ({**GOOD_META, "stoi": {c: [i] for i, c in enumerate(CHARS)}}, "stoi is not the inverse"),
    "stoi a list": ({**GOOD_META, "stoi": list(CHARS)}, "stoi is not the inverse"),
    "tokenizer an int": ({**GOOD_META, "tokenizer": 3}, "tokenizer is not a tokenizer's to_dict()"),
    "tokenizer unknown type": ({"tokenizer": {"type": "exec", "chars": "ab"}}, "tokenizer is not"),
    "tokenizer chars a list": ({"tokenizer": {"type": "char", "chars": [1, 2]}}, "tokenizer is not"),
    "tokenizer bad json": ({"tokenizer": {"type": "hf", "json": "{"}}, "its tokenizer cannot be rebuilt"),
    "tokenizer larger": ({"vocab_size": 2, "tokenizer": {"type": "char", "chars": "abc"}}, "3 characters"),
    "a list": ([1, 2], "holds a list"),
}


@pytest.mark.parametrize("kind", HOSTILE_META)
def test_every_meta_value_is_checked_before_use(tmp_path, kind):
    from jaxgpt.data import DataError, load_dataset
    from jaxgpt.tokenizer import load_tokenizer

    meta, message = HOSTILE_META[kind]
    folder = data_folder(tmp_path / "data", meta)
    with pytest.raises(DataError, match="re-create the folder with python -m jaxgpt.prepare") as e:
        load_dataset(folder)
    assert message in str(e.value) and str(folder / "meta.pkl") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="re-create the folder"):  # sample.py's and prepare's route to a meta.pkl
        load_tokenizer(folder / "meta.pkl")


def test_good_meta_and_no_meta_still_load(tmp_path):
    from jaxgpt.data import load_dataset

    ds = load_dataset(data_folder(tmp_path / "char"))
    assert ds.vocab_size == 5 and ds.tokenizer.decode([0, 1, 2]) == "abc"
    ds = load_dataset(data_folder(tmp_path / "bpe", None))
    assert ds.vocab_size == 50304 and ds.tokenizer is None


@pytest.mark.parametrize("split_name, value", [("train.bin", 5), ("val.bin", 65535), ("train.bin", 9)])
def test_token_ids_outside_the_vocabulary_are_named(tmp_path, split_name, value):
    from jaxgpt.data import DataError, load_dataset

    ids = np.arange(400, dtype=np.uint16) % len(CHARS)
    ids[[7, 50]] = value  # both in val.bin's first 100 tokens too
    folder = data_folder(tmp_path / "data", ids=ids)
    if split_name == "val.bin":  # only val.bin is bad
        (np.arange(400, dtype=np.uint16) % len(CHARS)).tofile(folder / "train.bin")
    with pytest.raises(DataError, match=rf"{split_name} holds 2 token id\(s\) outside the vocabulary \[0, 5\), "
                                        rf"the first {value} at position 7:"):
        load_dataset(folder)


def test_token_ids_of_a_folder_without_meta_are_checked_against_gpt2s_vocabulary(tmp_path):
    from jaxgpt.data import DataError, check_ids, load_dataset

    ids = np.full(400, 50303, np.uint16)
    load_dataset(data_folder(tmp_path / "ok", None, ids))
    ids[399] = 50304
    with pytest.raises(DataError, match="the first 50304 at position 399"):
        load_dataset(data_folder(tmp_path / "bad", None, ids))
    check_ids(np.arange(300, dtype=np.uint8), 256, "x")  # uint8 cannot exceed 256: nothing to read
    with pytest.raises(DataError, match="1 token id"):
        check_ids(np.arange(10, dtype=np.uint32), 9, "x", chunk=3)  # the last chunk, counted across chunks
