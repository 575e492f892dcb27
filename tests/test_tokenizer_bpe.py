"""BPE adapters of jaxgpt/tokenizer.py: HFTokenizer, tiktoken's 'gpt2', load_tokenizer, tokenizer_from_dict."""

import json
import pickle

import numpy as np
import pytest

from jaxgpt.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    tokenizer_from_dict,
    tokenizer_from_meta,
)

VOCAB_SIZE = 400


def train_bpe(text: str, vocab_size: int = VOCAB_SIZE):
    """A small GPT-2-style byte-level BPE trained on `text` with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path) -> str:
    return shakespeare_path.read_text()


@pytest.fixture(scope="module")
def bpe_json(shakespeare, tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(shakespeare[:20_000]).save(str(path))
    return path


def test_hf_tokenizer_round_trips_unseen_text(bpe_json, shakespeare):
    tok = HFTokenizer.from_file(bpe_json)
    unseen = shakespeare[500_000:510_000]  # far from the 20 kB it was trained on

    ids = tok.encode(unseen)

    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tok.vocab_size == VOCAB_SIZE
    assert 0 <= ids.min() and ids.max() < VOCAB_SIZE
    assert len(ids) < 0.6 * len(unseen)  # merges were learned: far fewer tokens than characters
    assert tok.decode(ids) == unseen
    assert tok.token_id("<|endoftext|>") == 0


def test_hf_tokenizer_to_dict_carries_the_whole_tokenizer(bpe_json, shakespeare, tmp_path):
    tok = HFTokenizer.from_file(bpe_json)
    d = json.loads(json.dumps(tok.to_dict()))  # JSON-safe, as a checkpoint's metadata must be
    bpe_json.rename(tmp_path / "moved.json")  # the original file is no longer needed
    try:
        again = tokenizer_from_dict(d)
        assert isinstance(again, HFTokenizer) and again == tok
        text = shakespeare[1000:3000]
        np.testing.assert_array_equal(again.encode(text), tok.encode(text))
    finally:
        (tmp_path / "moved.json").rename(bpe_json)


def test_hf_decode_rejects_ids_outside_the_vocabulary(bpe_json):
    tok = HFTokenizer.from_file(bpe_json)
    with pytest.raises(ValueError, match=f"token id {VOCAB_SIZE} is outside the vocabulary"):
        tok.decode([1, VOCAB_SIZE])


def test_load_tokenizer_specs(bpe_json, shakespeare, tmp_path):
    text = shakespeare[:2000]
    assert load_tokenizer("char", text=text) == CharTokenizer.from_text(text)
    assert load_tokenizer(bpe_json) == HFTokenizer.from_file(bpe_json)
    assert load_tokenizer(bpe_json.parent) == HFTokenizer.from_file(bpe_json)  # a model folder
    char_json = tmp_path / "char.json"
    CharTokenizer.from_text(text).save(char_json)
    assert load_tokenizer(char_json) == CharTokenizer.from_text(text)
    chars = sorted(set(text))
    with open(tmp_path / "meta.pkl", "wb") as f:  # nanoGPT's shakespeare_char meta.pkl
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    assert load_tokenizer(tmp_path / "meta.pkl") == CharTokenizer(chars)
    assert tokenizer_from_meta(tmp_path / "meta.pkl").decode([0, 1]) == chars[0] + chars[1]


def test_load_tokenizer_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pass text="):
        load_tokenizer("char")
    with pytest.raises(FileNotFoundError, match="no such file; use 'char', 'gpt2' or the path"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON tokenizer file"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "other.json")
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        tokenizer_from_dict({"type": "sentencepiece"})
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3}, f)
    with pytest.raises(ValueError, match="neither 'itos'"):
        tokenizer_from_meta(tmp_path / "meta.pkl")


def test_tiktoken_gpt2_never_downloads(tmp_path, monkeypatch):
    """Without tiktoken, or without its files in the cache, 'gpt2' says what to install or set."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    with pytest.raises((ImportError, FileNotFoundError), match="tiktoken") as e:
        load_tokenizer("gpt2")
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) or "pip install tiktoken" in str(e.value)
    with pytest.raises((ImportError, FileNotFoundError), match="tiktoken"):
        TiktokenTokenizer.from_dict({"type": "tiktoken", "name": "gpt2"})
