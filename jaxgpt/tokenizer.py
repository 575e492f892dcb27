"""Tokenizers: the lecture's character-level `stoi` / `itos`, and adapters for BPE tokenizers.

`CharTokenizer`'s vocabulary is the sorted set of distinct characters of a text, exactly as in the
lecture (`chars = sorted(list(set(text)))`), so ids agree with the lecture's and nanoGPT's
`shakespeare_char`. `HFTokenizer` wraps a Hugging Face `tokenizer.json` (GPT-2's BPE among them) and
`TiktokenTokenizer` tiktoken's 'gpt2' when its files are local. All share `encode` (-> int32 array),
`decode`, `vocab_size` and `to_dict`; `tokenizer_from_dict` and `load_tokenizer` build any of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np


class CharTokenizer:
    """Maps characters to integer ids and back.

    Encoding a character that is not in the vocabulary raises a `ValueError` that names the
    character and its position, rather than silently mapping it somewhere.
    """

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character in its vocabulary.")
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters.")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary has repeated characters.")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(chars)}
        self.itos: dict[int, str] = dict(enumerate(chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Builds the vocabulary from every distinct character of `text` (sorted, as the lecture)."""
        if not text:
            raise ValueError("Cannot build a CharTokenizer from an empty text.")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as an int32 array of shape (len(text),)."""
        try:
            return np.fromiter((self.stoi[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in self.stoi)
            raise ValueError(
                f"character {text[pos]!r} at position {pos} is not in the tokenizer's vocabulary "
                f"of {self.vocab_size} characters"
            ) from None

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Turns ids back into text. An id outside [0, vocab_size) raises `ValueError`."""
        ids = np.asarray(ids).reshape(-1).tolist()
        try:
            return "".join(self.itos[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside the vocabulary [0, {self.vocab_size})") from None

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("type", "char") != "char":
            raise ValueError(f"not a character tokenizer: type={d.get('type')!r}")
        return cls(list(d["chars"]))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (a `tokenizer.json`: GPT-2's byte-level BPE and the like).

    Encodes without adding special tokens (the text is all there is, as nanoGPT's `encode_ordinary`).
    `to_dict` keeps the whole tokenizer JSON, so a checkpoint or meta.pkl can carry it and decode later
    without the original file.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        Tokenizer = _tokenizers().Tokenizer
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None

    @classmethod
    def from_str(cls, json_str: str) -> HFTokenizer:
        return cls(_tokenizers().Tokenizer.from_str(json_str))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of a token string such as '<|endoftext|>', or None."""
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as an int32 array."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of several texts at once (the Rust side runs them in parallel)."""
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets, which nobody here reads.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "hf", "json": self.tokenizer.to_str()}

    @classmethod
    def from_dict(cls, d: dict) -> HFTokenizer:
        if d.get("type") != "hf":
            raise ValueError(f"not a Hugging Face tokenizer: type={d.get('type')!r}")
        return cls.from_str(d["json"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.tokenizer.to_str() == other.tokenizer.to_str()

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("BPE tokenizers need the `tokenizers` package: pip install 'jaxgpt[interop]'") from None
    return tokenizers


# tiktoken caches each encoding file under sha1(url) in one of these folders (its own lookup order).
_TIKTOKEN_GPT2_FILES = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def _tiktoken_cache_dir() -> str:
    import tempfile

    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


class TiktokenTokenizer:
    """OpenAI's `tiktoken` encoding (nanoGPT's 'gpt2' BPE), used only when its files are already local.

    tiktoken would download the encoding on first use; jaxgpt does not download at run time, so a
    missing file raises with what to do instead.
    """

    def __init__(self, encoding, name: str = "gpt2"):
        self.encoding = encoding
        self.name = name

    @classmethod
    def gpt2(cls) -> TiktokenTokenizer:
        import hashlib

        try:
            import tiktoken
        except ImportError:
            raise ImportError(
                "tokenizer 'gpt2' needs tiktoken (pip install tiktoken) with its GPT-2 files cached locally; "
                "or give a GPT-2 tokenizer.json instead"
            ) from None
        cache = _tiktoken_cache_dir()
        missing = [
            u
            for u in _TIKTOKEN_GPT2_FILES
            if not os.path.isfile(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))
        ]
        if missing:
            raise FileNotFoundError(
                f"tiktoken's GPT-2 files are not in {cache} (missing {[u.rsplit('/', 1)[1] for u in missing]}): "
                "run tiktoken.get_encoding('gpt2') once online or set TIKTOKEN_CACHE_DIR to a folder holding them; "
                "or give a GPT-2 tokenizer.json"
            )
        return cls(tiktoken.get_encoding("gpt2"), "gpt2")

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self.encoding.decode(np.asarray(ids).reshape(-1).tolist())

    def to_dict(self) -> dict:
        return {"type": "tiktoken", "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> TiktokenTokenizer:
        if d.get("type") != "tiktoken" or d.get("name") != "gpt2":
            raise ValueError(f"not a tiktoken 'gpt2' tokenizer: {d!r}")
        return cls.gpt2()

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r})"


Tokenizer = CharTokenizer | HFTokenizer | TiktokenTokenizer


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuilds a tokenizer from its `to_dict()`: {'type': 'char' | 'hf' | 'tiktoken', ...}."""
    kinds = {"char": CharTokenizer, "hf": HFTokenizer, "tiktoken": TiktokenTokenizer}
    kind = d.get("type", "char")
    if kind not in kinds:
        raise ValueError(f"unknown tokenizer type {kind!r}: expected one of {sorted(kinds)}")
    return kinds[kind].from_dict(d)


def tokenizer_from_meta(path: str | os.PathLike, *, meta: dict | None = None) -> Tokenizer | None:
    """The tokenizer of a nanoGPT-format `meta.pkl` (`meta`: its contents, when already read).

    jaxgpt's prepare stores `tokenizer` (a `to_dict()`); nanoGPT's char datasets store `itos`
    (id -> character) and `vocab_size`, which make a `CharTokenizer` with the same ids. Every value is
    checked first (`jaxgpt.data_meta.check_meta`); a meta with neither raises, unless `meta` was given (None then).
    """
    from jaxgpt.data_meta import DataError, check_meta
    from jaxgpt.safe_pickle import load_pickle

    given = meta is not None
    if not given:
        meta = load_pickle(path)  # a downloaded meta.pkl: plain values only, nothing in it runs
    checked = check_meta(meta, path)
    if checked["tokenizer"] is not None:
        try:
            return tokenizer_from_dict(checked["tokenizer"])
        except (ValueError, OSError, ImportError):  # one line already (tiktoken's files missing, ...)
            raise
        except Exception as e:  # noqa: BLE001 - a garbled tokenizer JSON fails in Rust with a plain Exception
            raise DataError(f"{path}: its tokenizer cannot be rebuilt ({(str(e).splitlines() or [repr(e)])[0]}); "
                            "re-create the folder with python -m jaxgpt.prepare") from None
    itos = checked["itos"]
    if itos is None:
        if given:
            return None
        raise ValueError(f"{path} has neither 'itos' (nanoGPT's char vocabulary) nor 'tokenizer'")
    return CharTokenizer([itos[i] for i in range(len(itos))])


def load_tokenizer(spec: str | os.PathLike, *, text: str | None = None) -> Tokenizer:
    """A tokenizer from a spec string.

    - 'char': a `CharTokenizer` of `text`'s characters (so `text` is required);
    - 'gpt2': tiktoken's GPT-2 BPE, when tiktoken and its files are local;
    - a path to a Hugging Face `tokenizer.json`, or a folder holding one (a GPT-2 model folder);
    - a path to a jaxgpt `CharTokenizer.save` JSON, or a nanoGPT / jaxgpt `meta.pkl`.
    """
    spec = os.fspath(spec)
    if spec == "char":
        if text is None:
            raise ValueError("tokenizer 'char' is built from a text: pass text=...")
        return CharTokenizer.from_text(text)
    if spec == "gpt2":
        return TiktokenTokenizer.gpt2()
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such file; use 'char', 'gpt2' or the path of a tokenizer.json / meta.pkl"
        )
    if path.endswith(".pkl"):
        return tokenizer_from_meta(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a JSON tokenizer file") from None
    if isinstance(d, dict) and d.get("type") in ("char", "hf", "tiktoken"):
        return tokenizer_from_dict(d)
    return HFTokenizer.from_file(path)
