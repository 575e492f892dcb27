"""A data folder's `meta.pkl`, checked value by value before any is used (numpy only: no JAX to import).

`jaxgpt.data` (reading a folder), `jaxgpt.prepare` and `jaxgpt.tokenizer` (loading its tokenizer) share these checks
and `DataError`, their one-line error; `jaxgpt.data` re-exports both.
"""

from __future__ import annotations

import os

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be used (missing, empty, too short, corrupt); the message is one line."""


# The largest vocabulary a meta.pkl may declare: 16x GPT-2's, far beyond any tokenizer jaxgpt trains with, small
# enough that checking the vocabulary allocates nothing to speak of.
MAX_VOCAB_SIZE = 1 << 20
TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # what train.bin / val.bin may hold (nanoGPT: uint16)
_TOKENIZER_KEYS = {"char": "chars", "hf": "json", "tiktoken": "name"}  # each type's one str-valued field


def _type(value: object) -> str:
    return type(value).__name__


def check_meta(meta: object, path: str | os.PathLike) -> dict:
    """The values of a data folder's `meta.pkl` (nanoGPT's or jaxgpt.prepare's), each checked before use.

    Returns {'dtype': np.dtype, 'vocab_size': int | None, 'itos': dict | None, 'tokenizer': dict | None}:
    `dtype` one of TOKEN_DTYPES (uint16 when absent), `vocab_size` an int in [1, MAX_VOCAB_SIZE], `itos` a
    map of every id in [0, vocab_size) to one character (with `stoi` its inverse when present), `tokenizer` a
    `to_dict()` of a known type. Raises `DataError` (one line naming the key) for anything else, before any
    value is used to allocate or to read the token files.
    """
    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}; re-create the folder with python -m jaxgpt.prepare")

    if not isinstance(meta, dict):
        raise bad(f"holds a {_type(meta)}, not nanoGPT's meta dict")
    dtype = meta.get("dtype", "uint16")
    if not isinstance(dtype, str) or dtype not in TOKEN_DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {list(TOKEN_DTYPES)}")
    vocab_size = meta.get("vocab_size")
    if vocab_size is not None and (type(vocab_size) is not int or not 1 <= vocab_size <= MAX_VOCAB_SIZE):
        raise bad(f"vocab_size {vocab_size!r} is not an int in [1, {MAX_VOCAB_SIZE:,}]")
    itos = meta.get("itos")
    if itos is not None:
        if not isinstance(itos, dict) or not 1 <= len(itos) <= MAX_VOCAB_SIZE:
            what = f"a dict of {len(itos):,} entries" if isinstance(itos, dict) else f"a {_type(itos)}"
            raise bad(f"itos is {what}, not a dict of 1 to {MAX_VOCAB_SIZE:,} ids")
        vocab_size = len(itos) if vocab_size is None else vocab_size
        if len(itos) != vocab_size:
            raise bad(f"itos has {len(itos)} entries but vocab_size is {vocab_size}")
        if any(type(i) is not int or not 0 <= i < vocab_size for i in itos):
            raise bad(f"itos's keys are not the ids 0 to {vocab_size - 1}")
        if any(not isinstance(c, str) or len(c) != 1 for c in itos.values()) or len(set(itos.values())) != len(itos):
            raise bad("itos's values are not distinct single characters")
        stoi = meta.get("stoi")
        if stoi is not None and (not isinstance(stoi, dict) or len(stoi) != len(itos)
                                 or any(type(i) is not int or itos.get(i) != c for c, i in stoi.items())):
            raise bad("stoi is not the inverse of itos")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None:
        kind = tokenizer.get("type", "char") if isinstance(tokenizer, dict) else None
        field = _TOKENIZER_KEYS.get(kind) if isinstance(kind, str) else None
        if field is None or not isinstance(tokenizer.get(field), str):
            raise bad("tokenizer is not a tokenizer's to_dict() (type 'char' with a 'chars' string, 'hf' with "
                      "'json' or 'tiktoken' with 'name')")
        if kind == "char" and vocab_size is not None and len(tokenizer["chars"]) > vocab_size:
            raise bad(f"the tokenizer has {len(tokenizer['chars'])} characters but vocab_size is {vocab_size}")
    return {"dtype": np.dtype(dtype), "vocab_size": vocab_size, "itos": itos, "tokenizer": tokenizer}
