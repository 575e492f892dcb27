"""Train/val split and random batches of (context, next-token) pairs, as pure functions.

`get_batch` is the lecture's `get_batch` without the Python loop over the batch: the start offsets
come from a `jax.random` key and the windows are gathered in one indexing op, so it can run inside
a jitted train step with the dataset already on the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.data_meta import MAX_VOCAB_SIZE, TOKEN_DTYPES, DataError, check_meta  # noqa: F401 - the data API
from jaxgpt.tokenizer import CharTokenizer, Tokenizer

ArrayLike = jax.Array | np.ndarray


def split(data: ArrayLike, train_fraction: float = 0.9) -> tuple[ArrayLike, ArrayLike]:
    """The first `train_fraction` of the tokens for training, the rest for validation (as the lecture)."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def check_length(data: ArrayLike, block_size: int, what: str = "data") -> None:
    """Raises a clear `ValueError` when `data` cannot hold one (block_size + 1)-token window."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"{what} has {len(data)} tokens but block_size={block_size} needs at least "
            f"{block_size + 1}: use more text or a smaller block_size"
        )


def batch_starts(key: jax.Array, batch_size: int, n_tokens: int | jax.Array, block_size: int) -> jax.Array:
    """Where `batch_size` random windows of `block_size + 1` tokens start in `n_tokens` tokens: the lecture's
    `torch.randint(len(data) - block_size, (batch_size,))`. The one rule for batches, on the device and on the host."""
    return jax.random.randint(key, (batch_size,), 0, n_tokens - block_size)


def windows(data: ArrayLike, starts: ArrayLike, block_size: int) -> tuple[ArrayLike, ArrayLike]:
    """x, y int32 of shape (*starts.shape, block_size): the windows of `data` at `starts`, y shifted one token
    on. Numpy in, numpy out (a memmap reads only the windows); a jax array in, one gather on the device."""
    tokens = data[starts[..., None] + np.arange(block_size + 1)].astype(np.int32)
    return tokens[..., :-1], tokens[..., 1:]


@partial(jax.jit, static_argnames=("batch_size", "block_size"))
def gather_batch(key: jax.Array, data: jax.Array, batch_size: int, block_size: int, *,
                 start: int | jax.Array = 0, length: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`get_batch` without its host-side checks, for use inside a jitted step (the caller checked `data`).

    With `start` and `length` (traced or not) the windows come from `data[start:start + length]`, drawn as
    `get_batch` would draw them from that slice alone: the evaluation keeps its splits in one array.
    """
    length = data.shape[0] if length is None else length
    return windows(data, start + batch_starts(key, batch_size, length, block_size), block_size)


def get_batch(key: jax.Array, data: ArrayLike, batch_size: int, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Draws `batch_size` random windows of `block_size` tokens from `data`.

    Returns x_BT (int32) and y_BT, where y is x shifted one token to the left: y[b, t] is the token
    that follows x[b, :t+1]. Pure in `key`: the same key gives the same batch.
    """
    check_length(data, block_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_BT, y_BT = gather_batch(key, jnp.asarray(data), batch_size, block_size)
    chex.assert_shape([x_BT, y_BT], (batch_size, block_size))
    return x_BT, y_BT


# ---------------------------------------------------------------------------------------------------
# Datasets on disk: a text file (character level), a nanoGPT data directory, or tiny Shakespeare
# downloaded into a cache directory on first use.
# ---------------------------------------------------------------------------------------------------

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_BYTES = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclasses.dataclass
class Dataset:
    """Token ids of the train and val splits (numpy arrays or memmaps) and the tokenizer, if any."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer | None  # None: a nanoGPT folder without meta.pkl (GPT-2 BPE ids)
    vocab_size: int
    source: str


def cache_dir() -> pathlib.Path:
    """Where downloads go: $JAXGPT_CACHE, else ~/.cache/jaxgpt."""
    return pathlib.Path(os.environ.get("JAXGPT_CACHE") or pathlib.Path.home() / ".cache" / "jaxgpt")


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (downloads and checkpoint manifests check with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, *, size: int | None, sha256: str | None, timeout: float = 30.0,
             offline_hint: str = "set --config.data.path to a local text file") -> pathlib.Path:
    """Fetches `url` into `dest`, checked against `size` and `sha256`.

    The bytes go to a temporary file beside `dest`, renamed onto `dest` only when they check, so a
    failed or interrupted download never leaves a corrupt file where the next run would trust it.
    Raises `DataError` (one line) when the network fails or the check does not pass.
    """
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                announced = response.headers.get("Content-Length")
                shutil.copyfileobj(response, out)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as e:  # IncompleteRead: cut mid-stream
            raise DataError(f"could not download {url} ({e}); {offline_hint}") from None
        got_size = tmp.stat().st_size
        if announced is not None and announced.isdigit() and got_size != int(announced):  # a connection cut short
            raise DataError(f"download of {url} stopped after {got_size} of {announced} bytes; not saved")
        if size is not None and got_size != size:
            raise DataError(f"download of {url} has {got_size} bytes, expected {size}; not saved")
        if sha256 is not None and (digest := sha256_file(tmp)) != sha256:
            raise DataError(f"download of {url} has sha256 {digest}, expected {sha256}; not saved")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


SHAKESPEARE_ENV = "JAXGPT_SHAKESPEARE"  # names a local copy of tiny Shakespeare's input.txt
OFFLINE_HINT = (f"without internet, set {SHAKESPEARE_ENV}=/path/to/input.txt (a local copy of tiny Shakespeare) "
                "or --config.data.path to a text file")


def default_text_path(timeout: float = 15.0) -> pathlib.Path:
    """Tiny Shakespeare, by one rule everywhere (train.py, sample.py, the notebooks and the tests):
    $JAXGPT_SHAKESPEARE when set, else the cache directory's copy, else downloaded there and checked.

    Raises `DataError` (one line saying how to point at a local copy) when $JAXGPT_SHAKESPEARE is not a file or
    the download fails; `timeout` bounds each network wait, so an offline machine hears it in seconds.
    """
    named = os.environ.get(SHAKESPEARE_ENV)
    if named:
        path = pathlib.Path(named).expanduser()
        if not path.is_file():
            raise DataError(f"{SHAKESPEARE_ENV}={named} is not a file: point it at a local copy of tiny "
                            "Shakespeare's input.txt, or unset it to download one")
        return path
    path = cache_dir() / "tinyshakespeare" / "input.txt"
    if not path.exists():
        download(SHAKESPEARE_URL, path, size=SHAKESPEARE_BYTES, sha256=SHAKESPEARE_SHA256, timeout=timeout,
                 offline_hint=OFFLINE_HINT)
    return path


def _load_nanogpt_dir(path: pathlib.Path) -> Dataset:
    """A folder of nanoGPT's format (train.bin / val.bin, meta.pkl), written by nanoGPT or jaxgpt.prepare."""
    from jaxgpt.prepare import load_prepared  # prepare imports the tokenizers; only folders need it

    try:
        prepared = load_prepared(path)
    except FileNotFoundError as e:
        raise DataError(f"{e}; or give a text file") from None
    except DataError:
        raise
    except ImportError as e:  # its tokenizer's package is missing: say which folder needs it
        raise DataError(f"{path}: {e}") from None
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: cannot read the prepared data ({e})") from None
    if not len(prepared.train) or not len(prepared.val):
        raise DataError(f"{path}: train.bin or val.bin is empty")
    # Without meta.pkl nanoGPT means GPT-2's BPE, padded to 50304 entries.
    vocab_size = int(prepared.vocab_size or 50304)
    for name, ids in (("train.bin", prepared.train), ("val.bin", prepared.val)):
        check_ids(ids, vocab_size, path / name)
    return Dataset(prepared.train, prepared.val, prepared.tokenizer, vocab_size, str(path))


def check_ids(ids: np.ndarray, vocab_size: int, what: str | os.PathLike, chunk: int = 1 << 24) -> None:
    """Raises `DataError` naming the first token id of `ids` outside [0, vocab_size), and how many there are.

    Reads `ids` (a memmap, maybe larger than memory) in chunks of `chunk` tokens; an id the model has no
    embedding for would otherwise surface only as a non-finite loss.
    """
    if ids.dtype.kind == "u" and np.iinfo(ids.dtype).max < vocab_size:
        return  # every id the dtype can hold is in the vocabulary
    first, count = None, 0
    for start in range(0, len(ids), chunk):
        part = np.asarray(ids[start:start + chunk])
        bad = np.flatnonzero((part >= vocab_size) | (part < 0))
        if bad.size and first is None:
            first = (int(part[bad[0]]), start + int(bad[0]))
        count += int(bad.size)
    if first is not None:
        raise DataError(f"{what} holds {count:,} token id(s) outside the vocabulary [0, {vocab_size}), the first "
                        f"{first[0]} at position {first[1]:,}: the .bin files and meta.pkl do not belong together; "
                        "re-create the folder with python -m jaxgpt.prepare")


def load_dataset(path: str | os.PathLike | None, train_fraction: float = 0.9) -> Dataset:
    """Loads a text file (character-level, the lecture's split) or a nanoGPT data directory.

    `path` '' or None means tiny Shakespeare (`default_text_path`: $JAXGPT_SHAKESPEARE, else the cache's copy,
    else downloaded).
    """
    path = pathlib.Path(path) if path else default_text_path()
    if not path.exists():
        raise DataError(f"dataset {path} does not exist: set --config.data.path to a text file or data directory")
    if path.is_dir():
        return _load_nanogpt_dir(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"dataset {path} is not UTF-8 text") from None
    if not text:
        raise DataError(f"dataset {path} is empty")
    tokenizer = CharTokenizer.from_text(text)
    train, val = split(tokenizer.encode(text), train_fraction)
    return Dataset(np.asarray(train), np.asarray(val), tokenizer, tokenizer.vocab_size, str(path))
