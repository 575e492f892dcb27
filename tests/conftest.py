"""Shared test settings: full float32 matmul precision (JAX here, PyTorch via `torch_highest`), the corpus path."""

import functools
import os
import pathlib

# The suite compiles some thousand small XLA programs, and on a CPU most of its time went to compiling them. Tests
# compile at LLVM's level 0 and with XLA's older CPU fusion code generator (its newer one, through MLIR, takes longer
# to compile the same fusions): the whole suite's worker time fell 3,382 -> 2,228 s with the first, 2,183 -> 1,826 s
# with the second (AMD EPYC). Floats round differently in the last bits (a tiny GPT's loss of 4.18: 9.5e-7, two
# float32 ulps; its gradients: 3.7e-8), far inside the PyTorch comparisons' 1e-5; bit-exact tests compare runs
# compiled alike.
# Set before jax starts its backend, so the xdist workers and every train.py / sample.py the tests start inherit it.
# JAXGPT_TEST_XLA_OPT=default keeps XLA's own settings.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("JAXGPT_TEST_XLA_OPT", "0") != "default" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# jaxgpt's one rule (jaxgpt.data.default_text_path): JAXGPT_SHAKESPEARE names a local copy of tiny Shakespeare, else
# the cache's copy, else the download. The tests add one step: a sibling shared/ checkout's copy names itself, so
# that every test and every train.py / sample.py they start read it.
SIBLING_SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
if not os.environ.get("JAXGPT_SHAKESPEARE") and SIBLING_SHAKESPEARE.is_file():
    os.environ["JAXGPT_SHAKESPEARE"] = str(SIBLING_SHAKESPEARE)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist starts its workers: they inherit the environment set here
def pytest_sessionstart(session):
    """Finds tiny Shakespeare once, or ends the session at once with one line saying how to point at a local copy
    (offline, every test that reads it would otherwise wait for its own download to fail)."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller has looked already
        return
    from jaxgpt.data import DataError, default_text_path

    try:
        os.environ["JAXGPT_SHAKESPEARE"] = str(default_text_path())
    except DataError as e:
        pytest.exit(f"error: tiny Shakespeare is needed by the tests: {e}", returncode=2)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist hands out tests one by one (`-n 2`), except that a module with a module-scoped fixture goes to one
    worker whole: each worker that ran one of its tests would set the fixture up again (the compile check, a
    gpu_check.sh run, a trained run: minutes each). Such modules start first (xdist orders groups by size)."""
    from xdist.scheduler import LoadGroupScheduling

    class ModuleFixturesStayTogether(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if _has_module_fixture(path) else nodeid

    return ModuleFixturesStayTogether(config, log)


@functools.cache
def _has_module_fixture(path: str) -> bool:
    file = ROOT / path
    return file.is_file() and 'scope="module"' in file.read_text(encoding="utf-8")


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
    """Tiny Shakespeare as jaxgpt finds it: $JAXGPT_SHAKESPEARE (a sibling shared/ checkout's copy when unset), or
    jaxgpt's own download (size and sha256 checked, kept in $JAXGPT_CACHE) so that a fresh clone's tests need nothing
    else."""
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
