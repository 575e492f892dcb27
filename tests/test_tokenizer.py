"""CharTokenizer: the lecture's vocabulary, round trips, clear errors, JSON persistence."""

import numpy as np
import pytest

from jaxgpt.tokenizer import CharTokenizer


def test_vocabulary_is_sorted_distinct_characters_of_shakespeare(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert "".join(tok.chars) == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    # The lecture's printed encoding of "hii there".
    assert tok.encode("hii there").tolist() == [46, 47, 47, 1, 58, 46, 43, 56, 43]
    ids = tok.encode(text[:1000])
    assert ids.dtype == np.int32 and ids.shape == (1000,)
    assert ids[:9].tolist() == [18, 47, 56, 57, 58, 1, 15, 47, 58]
    assert tok.decode(ids) == text[:1000]


def test_unknown_character_names_character_and_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z' at position 2"):
        tok.encode("abz")
    assert tok.unknown_chars("xaxyb") == ["x", "y"]


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 3])


def test_save_load_round_trip(tmp_path):
    tok = CharTokenizer.from_text("héllo wörld\n")
    path = tmp_path / "tok.json"
    tok.save(path)
    again = CharTokenizer.load(path)
    assert again == tok
    assert again.decode(again.encode("wörld")) == "wörld"


def test_empty_text_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")
