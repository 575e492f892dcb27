"""Shared test settings: full float32 matmul precision (JAX here, PyTorch via `torch_highest`), the corpus path."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# JAXGPT_SHAKESPEARE names a local copy of tiny Shakespeare; else a sibling shared/ checkout's, else the download.
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
    """Tiny Shakespeare: $JAXGPT_SHAKESPEARE, a sibling shared/ checkout's copy, or jaxgpt's own download
    (size and sha256 checked, kept in $JAXGPT_CACHE) so that a fresh clone's tests need nothing else."""
    if "JAXGPT_SHAKESPEARE" in os.environ:
        assert SHAKESPEARE.is_file(), f"JAXGPT_SHAKESPEARE={SHAKESPEARE} is not a file: point it at input.txt"
        return SHAKESPEARE
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    from jaxgpt.data import default_text_path

    return default_text_path()


@pytest.fixture
def jax_compile_events():
    """`with jax_compile_events() as events:` collects the names of the JAX tracing, lowering and compiling done
    in its block (a program taken from a jit's in-memory cache records none)."""
    import contextlib

    @contextlib.contextmanager
    def collect():
        events: list[str] = []

        def listener(event: str, duration: float, **kwargs) -> None:
            if event.startswith("/jax/core/compile/"):
                events.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield events
        finally:
            _unregister_event_duration_listener(listener)

    return collect


def _unregister_event_duration_listener(listener) -> None:
    """`jax.monitoring.unregister_event_duration_listener`; older jax (0.7) has only its private form."""
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is None:
        from jax._src import monitoring

        unregister = monitoring._unregister_event_duration_listener_by_callback
    unregister(listener)
