"""Shared test settings: full float32 matmul precision in both frameworks, and the corpus path."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = pathlib.Path(
    os.environ.get("JAXGPT_SHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
)


@pytest.fixture(scope="session", autouse=True)
def _torch_highest_precision():
    import torch

    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shakespeare_path() -> pathlib.Path:
    assert SHAKESPEARE.exists(), f"tiny Shakespeare not found at {SHAKESPEARE} (set JAXGPT_SHAKESPEARE)"
    return SHAKESPEARE
