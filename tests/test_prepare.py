"""jaxgpt/prepare.py: corpus -> nanoGPT's train.bin / val.bin / meta.pkl, streamed."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from jaxgpt.prepare import load_prepared, main, prepare, token_dtype
from jaxgpt.tokenizer import CharTokenizer, HFTokenizer
from tests.test_tokenizer_bpe import train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bin(path, dtype=np.uint16) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


def test_char_prepare_reproduces_nanogpt_shakespeare_char(shakespeare_path, tmp_path):
    # An odd chunk size, so chunk edges fall everywhere, one of them across the train/val boundary.
    meta = prepare(shakespeare_path, tmp_path / "sc", "char", chunk_chars=99_991, progress=False)

    train, val = _bin(tmp_path / "sc" / "train.bin"), _bin(tmp_path / "sc" / "val.bin")
    assert (len(train), len(val), meta["vocab_size"]) == (1_003_854, 111_540, 65)  # nanoGPT's printed numbers
    text = shakespeare_path.read_text()
    tok = CharTokenizer.from_text(text)
    n = int(len(text) * 0.9)
    np.testing.assert_array_equal(train, tok.encode(text[:n]))
    np.testing.assert_array_equal(val, tok.encode(text[n:]))
    with open(tmp_path / "sc" / "meta.pkl", "rb") as f:
        on_disk = pickle.load(f)
    assert on_disk["itos"] == tok.itos and on_disk["stoi"] == tok.stoi  # what nanoGPT's sample.py reads
    assert on_disk["dtype"] == "uint16"
    data = load_prepared(tmp_path / "sc")
    assert data.tokenizer == tok and data.vocab_size == 65
    np.testing.assert_array_equal(data.val, val)


def test_bpe_prepare_round_trips_and_streams_exactly(shakespeare_path, tmp_path):
    text = shakespeare_path.read_text()
    bpe_path = tmp_path / "tokenizer.json"
    train_bpe(text[:20_000]).save(str(bpe_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[:60_000])

    # 997-character chunks: cuts land mid-word unless the writer moves them to a safe boundary.
    meta = prepare(corpus, tmp_path / "out", bpe_path, chunk_chars=997, progress=False)

    tok = HFTokenizer.from_file(bpe_path)
    train, val = _bin(tmp_path / "out" / "train.bin"), _bin(tmp_path / "out" / "val.bin")
    np.testing.assert_array_equal(train, tok.encode(text[:54_000]))  # 90% of 60,000 characters
    np.testing.assert_array_equal(val, tok.encode(text[54_000:60_000]))
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    data = load_prepared(tmp_path / "out")
    assert isinstance(data.tokenizer, HFTokenizer) and data.vocab_size == tok.vocab_size
    assert data.tokenizer.decode(data.train) + data.tokenizer.decode(data.val) == text[:60_000]


def test_big_vocabulary_uses_uint32(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000]
    corpus = tmp_path / "wide.txt"
    corpus.write_text("".join(chars * 2), encoding="utf-8")

    meta = prepare(corpus, tmp_path / "out", "char", chunk_chars=10_000, progress=False)

    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars) > 65_536
    data = load_prepared(tmp_path / "out")
    assert data.train.dtype == np.uint32 and int(data.train.max()) >= 65_536
    assert data.tokenizer.decode(data.train) + data.tokenizer.decode(data.val) == "".join(chars * 2)


def test_windows_newlines_read_as_nanogpt_does(tmp_path):
    corpus = tmp_path / "crlf.txt"
    corpus.write_bytes(b"First Citizen:\r\nBefore we proceed\r\nany further, hear me speak.\r\n")
    prepare(corpus, tmp_path / "out", "char", progress=False)
    data = load_prepared(tmp_path / "out")
    with open(corpus) as f:  # nanoGPT: open(input_file_path, 'r').read()
        text = f.read()
    assert data.tokenizer.decode(data.train) + data.tokenizer.decode(data.val) == text
    assert "\r" not in data.tokenizer.chars


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_give_one_clear_line_and_non_zero_exit(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--no_progress"]) == 1
    assert "missing.txt does not exist" in _error_line(capsys)

    (tmp_path / "empty.txt").write_text("")
    assert main(["--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), "--no_progress"]) == 1
    assert "is empty" in _error_line(capsys)

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello jax\n" * 10)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["--input", str(corpus), "--out", str(blocker / "sub"), "--no_progress"]) == 1
    assert "cannot create --out" in _error_line(capsys)

    assert (
        main(["--input", str(corpus), "--out", str(tmp_path / "o"), "--tokenizer", "nope.json", "--no_progress"]) == 1
    )
    assert "tokenizer 'nope.json': no such file" in _error_line(capsys)

    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    assert main(["--input", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "l"), "--no_progress"]) == 1
    assert "is not UTF-8 text" in _error_line(capsys)
    assert not (tmp_path / "l" / "train.bin").exists()


def test_existing_outputs_are_not_overwritten(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 10)
    assert main(["--input", str(corpus), "--out", str(tmp_path / "o"), "--no_progress"]) == 0
    capsys.readouterr()
    before = (tmp_path / "o" / "train.bin").read_bytes()
    corpus.write_text("zyxw" * 10)

    assert main(["--input", str(corpus), "--out", str(tmp_path / "o"), "--no_progress"]) == 1
    assert "already holds" in _error_line(capsys)
    assert (tmp_path / "o" / "train.bin").read_bytes() == before

    assert main(["--input", str(corpus), "--out", str(tmp_path / "o"), "--no_progress", "--overwrite"]) == 0
    assert (tmp_path / "o" / "train.bin").read_bytes() != before
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["meta.pkl", "train.bin", "val.bin"]  # no temps


@pytest.mark.slow  # a Python subprocess
def test_module_entry_point(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 50)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "jaxgpt.prepare", "--input", str(corpus), "--out", str(tmp_path / "d")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train 855 tokens, val 95 tokens" in done.stdout  # 950 characters, split 90/10
    assert "encode" in done.stderr  # the progress bar
    missing = subprocess.run(cmd[:4] + ["nowhere.txt", "--out", "x"], capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error:")


def test_long_bpe_chunks_are_encoded_in_pieces_cut_only_at_pre_token_boundaries(shakespeare_path, tmp_path,
                                                                               monkeypatch):
    """A chunk far longer than one batch piece, holding a line longer than a piece and indented lines: the writer
    encodes it in many pieces, each cut after a newline that a non-space follows, so the ids are those of
    encoding each split whole."""
    text = shakespeare_path.read_text()
    bpe_path = tmp_path / "tokenizer.json"
    train_bpe(text[:10_000]).save(str(bpe_path))
    corpus = text[:100_000] + "x" * 70_000 + "\n  indented\nend\n" + text[100_000:250_000]
    (tmp_path / "corpus.txt").write_text(corpus)
    batches = []
    real_encode_batch = HFTokenizer.encode_batch

    def encode_batch(self, texts):
        batches.append(list(texts))
        return real_encode_batch(self, texts)

    monkeypatch.setattr(HFTokenizer, "encode_batch", encode_batch)
    prepare(tmp_path / "corpus.txt", tmp_path / "out", bpe_path, chunk_chars=1_000_000, progress=False)

    n_train = int(len(corpus) * 0.9)
    assert ["".join(batch) for batch in batches] == [corpus[:n_train], corpus[n_train:]]  # one batch a split
    assert len(batches[0]) > 3
    for batch in batches:
        for left, right in zip(batch, batch[1:]):
            assert left.endswith("\n") and not right[0].isspace()
    tok = HFTokenizer.from_file(bpe_path)
    np.testing.assert_array_equal(_bin(tmp_path / "out" / "train.bin"), tok.encode(corpus[:n_train]))
    np.testing.assert_array_equal(_bin(tmp_path / "out" / "val.bin"), tok.encode(corpus[n_train:]))
