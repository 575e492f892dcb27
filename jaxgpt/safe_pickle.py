"""Opening pickled files (`meta.pkl`, nanoGPT's `ckpt.pt`) without running code from them.

A pickle can name any importable callable (`os.system`, `builtins.open`, ...) and have the loader call
it, so `pickle.load` on a downloaded file runs whatever its author chose. nanoGPT's and jaxgpt's files
never need that: `meta.pkl` is a dict of plain values and `ckpt.pt` holds tensors and plain values.

- `load_pickle` reads a `meta.pkl` through an unpickler that resolves no global at all: dict, list,
  tuple, str, int, float, bool and None have opcodes of their own (so do bytes and, from protocol 4,
  sets), and anything that names a class or function is refused before it is imported. (Pickle's
  EXT opcodes go through the same refusal unless `copyreg.add_extension` was called in this process.)
- `load_torch_checkpoint` is `torch.load(weights_only=True)`: PyTorch's own allow-list of tensor,
  storage and plain-value globals.

Both raise `UnsafePickleError`, a `ValueError` that names the file and the refused global, so the
command lines report it as their other bad input: one `error:` line and exit status 2.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

__all__ = ["UnsafePickleError", "load_pickle", "load_torch_checkpoint"]

# PyTorch's weights-only refusal names the global as "GLOBAL module.name" (torch 2.4 .. 2.13 at least).
_TORCH_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_TORCH_REFUSAL = "Weights only load failed"


class UnsafePickleError(ValueError):
    """A pickled file asks for a class or function to be imported and called; it was refused, not loaded.

    `path` is the file and `refused` the global it names (e.g. 'posix.system').
    """

    def __init__(self, path: str | os.PathLike, refused: str, holds: str):
        self.path = Path(path)
        self.refused = refused
        super().__init__(
            f"{self.path}: refused to unpickle {refused}: a pickle that names a class or function runs code when "
            f"loaded, and this file should hold only {holds}; nothing from it was run (re-create the file, or "
            "get it from a source you trust)"
        )


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler for plain values: every global (class, function) a pickle names is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):  # pickle calls this before it imports anything
        raise UnsafePickleError(self._path, f"{module}.{name}", _PLAIN)

    def persistent_load(self, pid):  # plain pickles have no persistent ids
        raise UnsafePickleError(self._path, f"a persistent id {pid!r}", _PLAIN)


_PLAIN = "plain values (dict, list, tuple, str, int, float, bool, None)"


def load_pickle(path: str | os.PathLike) -> object:
    """The plain Python value pickled in `path` (nanoGPT's / jaxgpt's `meta.pkl`), loaded without running code.

    Raises `UnsafePickleError` when the pickle names any global (the `__reduce__` trick), and a one-line
    `ValueError` when the file is not a pickle at all. `OSError` (missing, unreadable) passes through.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _PlainUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or garbled pickle fails in many ways, all the same to the user
            raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None


def load_torch_checkpoint(path: str | os.PathLike) -> object:
    """`torch.load(path, map_location='cpu', weights_only=True)`, its refusal turned into `UnsafePickleError`.

    PyTorch's weights-only unpickler admits tensors, storages and plain values, which is everything
    nanoGPT's `ckpt.pt` (model, optimizer state, model_args, iter_num, best_val_loss, config) holds.
    Other failures (not a checkpoint, truncated) propagate as torch raises them, PyTorch's many-line
    weights-only message cut to its one line of reason.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if _TORCH_REFUSAL not in message:
            raise
        found = _TORCH_GLOBAL.search(message)
        if found:
            raise UnsafePickleError(path, found.group(1), "tensors and plain values") from None
        # Not a pickle of globals at all (an opcode it does not know, garbage): torch's reason, on one line.
        raise pickle.UnpicklingError(_torch_reason(message)) from None


def _torch_reason(message: str) -> str:
    """The line of PyTorch's many-line weights-only message that says what went wrong."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    boilerplate = (_TORCH_REFUSAL, "Please file an issue", "Check the documentation")
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[0] if reasons else lines[-1]
