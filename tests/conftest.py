"""Shared test settings: full float32 matmul precision (JAX here, PyTorch via `torch_highest`), the corpus path."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = pathlib.Path(
    os.environ.get("JAXGPT_SHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
)


@pytest.fixture(scope="session")
def torch_highest():
    """PyTorch at full float32 matmul precision on every core, for the tests that compare with it.

    Not autouse: the tests that do not touch PyTorch neither import it nor pay for its start-up.
    """
    import torch

    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch


@pytest.fixture(scope="session")
def shakespeare_path() -> pathlib.Path:
    assert SHAKESPEARE.exists(), f"tiny Shakespeare not found at {SHAKESPEARE} (set JAXGPT_SHAKESPEARE)"
    return SHAKESPEARE
