"""Where the programs being built will run: the platform that decides how jaxgpt computes.

A few choices depend on the hardware: cuDNN's fused attention exists only on NVIDIA GPUs, jaxgpt's Triton kernels
(`flash_dropout`) only on those of compute capability 8.0 and up, and the dense layers take a CPU-shaped backward
pass on CPUs. They are made from `platform()` and `gpu_compute_capability()`, of the devices a program is
compiled for. That is the host's JAX backend, except inside `compiling_for(devices)`, which compiles ahead of time
for devices the host does not have (a TPU or GPU program compiled on a CPU: `benchmarks/bench_targets.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax

# A stack of (platform, GPU compute capability): the innermost `compiling_for` wins (shared by threads on purpose).
_compiling_for: list[tuple[str, tuple[int, int] | None]] = []


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices the programs traced now will run on."""
    return _compiling_for[-1][0] if _compiling_for else jax.default_backend()


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the NVIDIA GPU the programs traced now will run on (9.0 for an H100, 7.5 for a T4); None
    off NVIDIA GPUs, or when unknown (`compiling_for` given a platform name)."""
    if _compiling_for:
        return _compiling_for[-1][1]
    return _capability(jax.devices()) if jax.default_backend() == "gpu" else None


@contextlib.contextmanager
def compiling_for(devices: Sequence[jax.Device] | str) -> Iterator[str]:
    """Programs traced inside are built for `devices` (or a platform name), whatever the host's backend is."""
    if isinstance(devices, str):
        name, capability = devices, None
    else:
        name, capability = _platform_of(devices), _capability(devices)
    _compiling_for.append((name, capability))
    try:
        yield name
    finally:
        _compiling_for.pop()


def _capability(devices: Sequence[jax.Device]) -> tuple[int, int] | None:
    """The lowest compute capability among NVIDIA `devices` ("8.0" on the device), None when they do not say."""
    found = [getattr(d, "compute_capability", None) for d in devices]
    if not found or None in found:
        return None
    return min(tuple(int(x) for x in str(c).split(".")[:2]) for c in found)


def _platform_of(devices: Sequence[jax.Device]) -> str:
    kinds = {d.platform for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"devices of one platform expected, got {sorted(kinds)}")
    name = kinds.pop()
    return "gpu" if name in ("cuda", "rocm") else name
