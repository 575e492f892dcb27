"""Turns a text corpus into nanoGPT's dataset format: `train.bin`, `val.bin` and `meta.pkl`.

    python -m jaxgpt.prepare --input corpus.txt --tokenizer char|PATH|gpt2 --out data/mycorpus

`train.bin` / `val.bin` are flat arrays of token ids (uint16, or uint32 when an id does not fit), read
back with `np.memmap` as nanoGPT's train.py does. `meta.pkl` is nanoGPT's dict: for 'char' its
`vocab_size`, `itos`, `stoi`; jaxgpt adds `tokenizer` (the tokenizer's `to_dict()`, the whole
tokenizer JSON for BPE, so sampling can decode without the original file), `dtype` and token counts.

The split is nanoGPT's: the first 90% of the *characters* of the text train, the rest validate, and
each part is encoded on its own (as nanoGPT's shakespeare_char and shakespeare prepare.py do). The
file is read twice, in chunks, so a corpus larger than memory works: once to count characters (and
collect the vocabulary for 'char'), once to encode. Text is read as UTF-8 with Python's universal
newlines ('\\r\\n' becomes '\\n'), like nanoGPT's `open(path).read()`.

BPE chunks are cut just after a newline that is followed by a non-space character. That is a
pre-token boundary for GPT-2-style byte-level and whitespace pre-tokenizers, so the streamed ids are
the ids of encoding each split in one go. A line longer than a chunk simply grows the chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxgpt.safe_pickle import UnsafePickleError, load_pickle
from jaxgpt.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer, tokenizer_from_meta

OUTPUTS = ("train.bin", "val.bin", "meta.pkl")
DEFAULT_CHUNK_CHARS = 1 << 22  # 4 Mi characters: a few tens of MB of Python str at most


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits, as nanoGPT; uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _read_chunks(path: Path, chunk_chars: int, bar: tqdm | None = None) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        while True:
            try:
                chunk = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason} in a chunk): convert it to UTF-8") from None
            if not chunk:
                return
            if bar is not None:
                bar.update(len(chunk))
            yield chunk


def _scan(path: Path, chunk_chars: int, want_chars: bool, progress: bool) -> tuple[int, set[str]]:
    """Pass 1: the number of characters and, for 'char', the set of them."""
    n_chars, chars = 0, set()
    with tqdm(desc="scan", unit="char", unit_scale=True, disable=not progress) as bar:
        for chunk in _read_chunks(path, chunk_chars, bar):
            n_chars += len(chunk)
            if want_chars:
                chars.update(chunk)
    return n_chars, chars


def _safe_cut(buf: str) -> int:
    """The last index i with buf[i-1] == '\\n' and buf[i] not whitespace (0 when there is none)."""
    pos = buf.rfind("\n", 0, len(buf) - 1)
    while pos >= 0 and buf[pos + 1].isspace():
        pos = buf.rfind("\n", 0, pos)
    return pos + 1


def _safe_pieces(text: str, target: int) -> list[str]:
    """`text` cut at safe places (see `_safe_cut`) into pieces of about `target` characters or more.

    Encoding pieces in a batch is as exact as encoding the whole, and keeps the tokenizer's per-call
    bookkeeping (offsets, token strings) small.
    """
    pieces, start = [], 0
    while len(text) - start > target:
        window = target
        cut = _safe_cut(text[start : start + window])
        while cut == 0 and start + window < len(text):  # one long line: widen until a boundary shows
            window *= 2
            cut = _safe_cut(text[start : start + window])
        if cut == 0:
            break
        pieces.append(text[start : start + cut])
        start += cut
    pieces.append(text[start:])
    return pieces


class _Writer:
    """Encodes text pieces of one split and appends their ids to a file, cutting only at safe places."""

    def __init__(self, path: Path, tokenizer: Tokenizer, dtype: np.dtype, anywhere: bool, chunk_chars: int):
        self.f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.tokenizer, self.dtype, self.anywhere, self.chunk_chars = tokenizer, dtype, anywhere, chunk_chars
        self.buf, self.n_tokens, self.offset = "", 0, 0

    def write(self, text: str, final: bool = False) -> None:
        self.buf += text
        if final:
            cut = len(self.buf)
        elif self.anywhere:
            cut = len(self.buf)
        elif len(self.buf) < self.chunk_chars:
            return
        else:
            cut = _safe_cut(self.buf)
        if cut == 0:
            return
        piece, self.buf = self.buf[:cut], self.buf[cut:]
        try:
            if self.anywhere or not isinstance(self.tokenizer, HFTokenizer):  # the one with a batch encoder
                ids = self.tokenizer.encode(piece)
            else:
                ids = np.concatenate(self.tokenizer.encode_batch(_safe_pieces(piece, 1 << 16)))
        except ValueError as e:
            raise ValueError(f"at character {self.offset} of this split: {e}") from None
        self.offset += len(piece)
        if ids.size and (ids.min() < 0 or ids.max() >= np.iinfo(self.dtype).max + 1):
            raise ValueError(f"token id {ids.max()} does not fit {self.dtype}")
        self.f.write(ids.astype(self.dtype).tobytes())
        self.n_tokens += int(ids.size)

    def finish(self) -> int:
        self.write("", final=True)
        self.f.close()
        return self.n_tokens


def prepare(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str = "char",
    *,
    train_fraction: float = 0.9,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Writes `train.bin`, `val.bin` and `meta.pkl` for `input_path` into `out_dir`; returns the meta dict.

    `tokenizer` is a `load_tokenizer` spec: 'char' (the corpus's own characters), 'gpt2' (tiktoken),
    or the path of a tokenizer.json / CharTokenizer JSON / meta.pkl. Existing outputs are kept unless
    `overwrite`; nothing is renamed into place until every file is complete.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    if not input_path.is_file():
        raise FileNotFoundError(f"input {input_path} does not exist (or is not a file)")
    if input_path.stat().st_size == 0:
        raise ValueError(f"input {input_path} is empty: nothing to prepare")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {existing}: pass --overwrite or choose another --out")

    is_char = str(tokenizer) == "char"
    tok = None if is_char else load_tokenizer(tokenizer)  # fail on a bad spec before reading the corpus
    n_chars, chars = _scan(input_path, chunk_chars, is_char, progress)
    tok = CharTokenizer(sorted(chars)) if is_char else tok
    n_train = int(n_chars * train_fraction)  # nanoGPT: train_data = data[:int(n * 0.9)]
    if n_train == 0 or (train_fraction < 1.0 and n_train == n_chars):
        raise ValueError(f"input {input_path} has {n_chars} characters: too short to split into train and val")
    dtype = token_dtype(tok.vocab_size)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create --out {out_dir}: {e.strerror}") from None
    tmp = {name: out_dir / f".{name}.tmp" for name in OUTPUTS}
    try:
        anywhere = isinstance(tok, CharTokenizer)  # characters never merge across a cut
        writers = {s: _Writer(tmp[f"{s}.bin"], tok, dtype, anywhere, chunk_chars) for s in ("train", "val")}
        seen = 0
        with tqdm(total=n_chars, desc="encode", unit="char", unit_scale=True, disable=not progress) as bar:
            for chunk in _read_chunks(input_path, chunk_chars, bar):
                head = max(0, min(len(chunk), n_train - seen))
                if head:
                    writers["train"].write(chunk[:head])
                if head < len(chunk):
                    writers["val"].write(chunk[head:])
                seen += len(chunk)
        counts = {s: w.finish() for s, w in writers.items()}
        meta: dict = {"vocab_size": tok.vocab_size}
        if isinstance(tok, CharTokenizer):  # nanoGPT's shakespeare_char keys
            meta["itos"] = dict(tok.itos)
            meta["stoi"] = dict(tok.stoi)
        meta.update(
            tokenizer=tok.to_dict(),
            dtype=dtype.name,
            train_tokens=counts["train"],
            val_tokens=counts["val"],
            train_fraction=train_fraction,
            source=str(input_path),
        )
        with open(tmp["meta.pkl"], "wb") as f:
            pickle.dump(meta, f)
        for name in OUTPUTS:
            os.replace(tmp[name], out_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return meta


@dataclasses.dataclass
class PreparedData:
    """A prepared dataset folder: memory-mapped `train` / `val` ids, its tokenizer and meta dict."""

    train: np.memmap
    val: np.memmap
    tokenizer: Tokenizer | None
    vocab_size: int | None
    meta: dict


def load_prepared(data_dir: str | os.PathLike) -> PreparedData:
    """Opens a folder written by `prepare` or by nanoGPT's own prepare.py scripts.

    Without a meta.pkl (nanoGPT's openwebtext, shakespeare) the ids are uint16 GPT-2 BPE: the tokenizer
    and vocab_size are None and the caller decides (nanoGPT uses 50304).
    """
    data_dir = Path(data_dir)
    missing = [name for name in ("train.bin", "val.bin") if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir} has no {missing}: run python -m jaxgpt.prepare --out {data_dir} first")
    from jaxgpt.data_meta import check_meta

    meta_path = data_dir / "meta.pkl"
    meta = load_pickle(meta_path) if meta_path.is_file() else {}  # plain values only: nothing in a folder runs
    checked = check_meta(meta, meta_path)  # every value, before one is used
    tokenizer = tokenizer_from_meta(meta_path, meta=meta) if meta else None
    vocab_size = checked["vocab_size"]
    if tokenizer is not None and vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{meta_path}: its tokenizer has {tokenizer.vocab_size} tokens but vocab_size "
                         f"is {vocab_size}; re-create the folder with python -m jaxgpt.prepare")
    train, val = (np.memmap(data_dir / name, dtype=checked["dtype"], mode="r") for name in ("train.bin", "val.bin"))
    return PreparedData(train=train, val=val, tokenizer=tokenizer, vocab_size=vocab_size, meta=meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a UTF-8 text file")
    parser.add_argument("--tokenizer", default="char", help="'char' (default), 'gpt2', or a tokenizer.json path")
    parser.add_argument("--out", required=True, help="the dataset folder to write (e.g. data/mycorpus)")
    parser.add_argument("--train_fraction", type=float, default=0.9, help="leading share of characters for train")
    parser.add_argument("--chunk_chars", type=int, default=DEFAULT_CHUNK_CHARS, help="characters read at a time")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train.bin/val.bin/meta.pkl")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        meta = prepare(
            args.input,
            args.out,
            args.tokenizer,
            train_fraction=args.train_fraction,
            chunk_chars=args.chunk_chars,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except UnsafePickleError as e:  # a --tokenizer meta.pkl that would run code: bad input, refused
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: vocab_size {meta['vocab_size']:,}, train {meta['train_tokens']:,} tokens, "
        f"val {meta['val_tokens']:,} tokens ({meta['dtype']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
