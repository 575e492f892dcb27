"""Where the programs being built will run: the platform that decides how jaxgpt computes.

A few choices depend on the hardware: cuDNN's fused attention exists only on NVIDIA GPUs, and the dense layers
take a CPU-shaped backward pass on CPUs. They are made from `platform()`, the platform of the devices a program is
compiled for. That is the host's JAX backend, except inside `compiling_for(devices)`, which compiles ahead of time
for devices the host does not have (a TPU or GPU program compiled on a CPU: `benchmarks/bench_targets.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax

_compiling_for: list[str] = []  # a stack: the innermost `compiling_for` wins (shared by threads on purpose)


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices the programs traced now will run on."""
    return _compiling_for[-1] if _compiling_for else jax.default_backend()


@contextlib.contextmanager
def compiling_for(devices: Sequence[jax.Device] | str) -> Iterator[str]:
    """Programs traced inside are built for `devices` (or a platform name), whatever the host's backend is."""
    name = devices if isinstance(devices, str) else _platform_of(devices)
    _compiling_for.append(name)
    try:
        yield name
    finally:
        _compiling_for.pop()


def _platform_of(devices: Sequence[jax.Device]) -> str:
    kinds = {d.platform for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"devices of one platform expected, got {sorted(kinds)}")
    name = kinds.pop()
    return "gpu" if name in ("cuda", "rocm") else name
