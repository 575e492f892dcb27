"""Accelerators that are not here: their descriptions for XLA, their peak numbers, and what a compiled program shows.

XLA compiles for a TPU or an NVIDIA GPU that the host does not have (`jax.experimental.topologies`), given the
compiler packages: libtpu for TPUs, the CUDA plugin (and cuDNN, for its fused attention) for GPUs. `install`
puts the set matching the installed jax into a folder; a process that has it on `sys.path`, with
`JAX_PLATFORMS=cpu`, can then compile for every target below while it computes on the CPU.

Peak numbers are the vendors' dense figures per chip: bf16 matmul (TPUs and GPUs), float32 as a float32 program
runs by default (TF32 tensor cores on A100 / H100; TPUs pass float32 matmuls through the bf16 MXU at default
precision; a T4 has neither bf16 nor TF32 units), and HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import subprocess
import sys
from collections import Counter


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # 'tpu' | 'cuda'
    chips: int
    hbm_bytes: float  # per chip
    peak_bf16: float | None  # FLOP/s per chip; None: no bf16 units
    peak_f32: float  # FLOP/s per chip, a float32 program at default precision
    bandwidth: float  # HBM bytes/s per chip
    topology: str = ""  # TPU: 'v5e:1x1'
    gpu: dict | None = None  # GPU: the GpuTargetConfigProto's gpu_device_info fields


def _gpu_info(*, cc: tuple[int, int], sms: int, fpus: int, smem_core: int, smem_optin: int, threads_core: int,
              bandwidth: float, l2: int, clock: float, memory: int, name: str) -> dict:
    return dict(cc=cc, sms=sms, fpus=fpus, smem_core=smem_core, smem_optin=smem_optin, threads_core=threads_core,
                bandwidth=bandwidth, l2=l2, clock=clock, memory=memory, name=name)


TARGETS = {
    t.name: t
    for t in [
        # Colab's free TPU and a Cloud / Kaggle v5e-8 (2x4 chips), and Trillium.
        Target("tpu-v5e-1", "tpu", 1, 16e9, 197e12, 197e12, 819e9, topology="v5e:1x1"),
        Target("tpu-v6e-1", "tpu", 1, 32e9, 918e12, 918e12, 1640e9, topology="v6e:1x1"),
        Target("tpu-v5e-8", "tpu", 8, 16e9, 197e12, 197e12, 819e9, topology="v5e:2x4"),
        Target("h100", "cuda", 1, 80e9, 989e12, 495e12, 3.35e12, gpu=_gpu_info(
            cc=(9, 0), sms=132, fpus=128, smem_core=233472, smem_optin=232448, threads_core=2048,
            bandwidth=3352320000000, l2=52428800, clock=1.98, memory=84942979072, name="NVIDIA H100 80GB HBM3")),
        Target("a100", "cuda", 1, 80e9, 312e12, 156e12, 2.04e12, gpu=_gpu_info(
            cc=(8, 0), sms=108, fpus=64, smem_core=167936, smem_optin=166912, threads_core=2048,
            bandwidth=2039000000000, l2=41943040, clock=1.41, memory=85899345920, name="NVIDIA A100-SXM4-80GB")),
        # Colab's free GPU: Turing, float16 tensor cores only.
        Target("t4", "cuda", 1, 15e9, None, 8.1e12, 320e9, gpu=_gpu_info(
            cc=(7, 5), sms=40, fpus=64, smem_core=65536, smem_optin=65536, threads_core=1024,
            bandwidth=320064000000, l2=4194304, clock=1.59, memory=15835660288, name="Tesla T4")),
    ]
}


def gpu_target_config(info: dict) -> str:
    """The GpuTargetConfigProto text XLA compiles a GPU program for."""
    major, minor = info["cc"]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {info['smem_core']} threads_per_core_limit: {info['threads_core']}
  core_count: {info['sms']} fpus_per_core: {info['fpus']}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {info['bandwidth']} l2_cache_size: {info['l2']} clock_rate_ghz: {info['clock']}
  device_memory_size: {info['memory']} shared_memory_per_block_optin: {info['smem_optin']}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{info['name']}"
"""


def devices(target: Target) -> list:
    """The target's devices, described for the compiler (nothing runs on them)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        bounds = (2, 4, 1) if target.chips == 8 else (1, 1, 1)  # v5e-8: one host, 2x4 chips
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                            chips_per_host_bounds=bounds)
    else:
        topo = topologies.get_topology_desc(topology_name="", platform="cuda", topology="1x1x1",
                                            target_config=gpu_target_config(target.gpu))
    found = list(topo.devices)
    if len(found) != target.chips:
        raise RuntimeError(f"{target.name}: the topology has {len(found)} devices, expected {target.chips}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# The compiler packages
# ---------------------------------------------------------------------------------------------------------------


def compiler_packages() -> list[str]:
    """pip requirements of the compile-only set matching the installed jax: libtpu as `jax[tpu]` pins it, the CUDA 12
    plugin of the same version (without the CUDA runtime: nothing runs) and cuDNN (its fused attention compiles
    against the library)."""
    version = importlib.metadata.version("jax")
    libtpu = next(r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or []
                  if r.startswith("libtpu") and "extra == \"tpu\"" in r)
    return [libtpu, f"jax-cuda12-plugin=={version}", f"jax-cuda12-pjrt=={version}", "nvidia-cudnn-cu12>=9.8,<10"]


def install(folder: str, tpu_only: bool = False) -> None:
    """pip-installs `compiler_packages()` (with `tpu_only`, libtpu alone) into `folder`, not into the environment:
    the tests' JAX stays CPU-only."""
    packages = compiler_packages()[:1] if tpu_only else compiler_packages()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", folder,
                    *packages], check=True)


def compile_env(folder: str | os.PathLike) -> dict[str, str]:
    """The environment of a process that compiles for TPUs and GPUs with the packages in `folder`, JAX on the CPU.

    libtpu takes a lock file per host unless told that several processes may load it (tests run side by side), and
    looks for a TPU host's metadata unless told what it is on: a name and a worker, which the compile ignores."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-1", "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_WORKER_ID": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


# ---------------------------------------------------------------------------------------------------------------
# Reading a compiled GPU program
# ---------------------------------------------------------------------------------------------------------------

# Instructions that launch nothing: bookkeeping, control flow, aliasing.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-start", "copy-done",
         "custom-call-start", "custom-call-done", "async-start", "async-done", "async-update"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{$", re.M)
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?[\w.\-]+ = (\([^=]*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?) ([\w\-]+)\(", re.M)
_TYPE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8,
         "f64": 8}


def _computations(text: str) -> dict[str, str]:
    starts = [(m.group(1), m.start(), m.group(0).startswith("ENTRY")) for m in _COMPUTATION.finditer(text)]
    out = {}
    for i, (name, start, entry) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        out["ENTRY" if entry else name] = text[start:end]
    return out


def _executed(comps: dict[str, str], inside_loops: bool = False) -> list[str]:
    """The computations the host steps through (ENTRY, loop bodies and conditions, branches): not fusion bodies.
    `inside_loops`: only those a loop runs, at any depth."""
    seen, todo = [], ["ENTRY"]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.append(name)
        body = comps[name]
        todo += re.findall(r"(?:body|condition|true_computation|false_computation)=%?([\w.\-]+)", body)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", body):
            todo += [b.strip().lstrip("%") for b in group.split(",")]
        todo += re.findall(r" call\([^\n]*to_apply=%?([\w.\-]+)", body)
    if inside_loops:
        loops = [n for name in seen for n in re.findall(r"(?:body|condition)=%?([\w.\-]+)", comps[name])]
        inner = {n for loop in loops if loop in comps for n in _executed({**comps, "ENTRY": comps[loop]})} - {"ENTRY"}
        return [n for n in seen if n in inner or n in loops]
    return seen


def gpu_kernels(text: str) -> dict:
    """Kernels of an optimized GPU HLO text (each instruction that launches work, loops counted once) by kind:
    cuBLAS / cuDNN custom calls, Pallas kernels (Triton custom calls), XLA's Triton fusions, other fusions, others;
    `once`, those of them outside every loop (a training chunk launches them once a call, not once a step);
    and `convert`s to float32 (in fusions too)."""
    comps = _computations(text)
    kinds: Counter = Counter()
    once = 0
    looped = set(_executed(comps, inside_loops=True))
    for name in _executed(comps):
        for line in comps[name].splitlines():
            m = _INSTRUCTION.match(line)
            if not m or m.group(2) in _FREE:
                continue
            once += name not in looped
            op = m.group(2)
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                t = target.group(1) if target else ""
                kinds["cublas" if "cublas" in t else "cudnn" if "cudnn" in t else
                      "pallas" if t == "__gpu$xla.gpu.triton" else "custom"] += 1  # pallas: jaxgpt's own kernels
            elif op == "fusion":
                kinds["triton" if "__triton" in line else "fusion"] += 1
            else:
                kinds["other"] += 1
    f32_converts = len(re.findall(r"= f32\[[^\]]*\](?:\{[^}]*\})? convert\(", text))
    return {"kernels": sum(kinds.values()), "once": once,
            **{k: kinds[k] for k in ("cublas", "cudnn", "pallas", "triton", "fusion")}, "f32_converts": f32_converts}


def kernel_bytes(text: str) -> int:
    """Bytes the kernels of an optimized HLO text read and write: each kernel's operands and result once (loop bodies
    counted once, as XLA's own cost analysis counts them). The GPU compiler gives no cost analysis without a GPU."""
    comps = _computations(text)
    total = 0
    for name in _executed(comps):
        sizes: dict[str, int] = {}
        for line in comps[name].splitlines():
            m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?) ([\w\-]+)\(([^)]*)\)",
                         line)
            if not m:
                continue
            result, op, operands = m.group(1), m.group(3), m.group(4)
            sizes[result] = shape_bytes(m.group(2))
            if op in _FREE:
                continue
            total += sizes[result] + sum(sizes.get(o.strip().lstrip("%"), 0) for o in operands.split(","))
    return total


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape `bf16[4,256]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _TYPE.get(dtype, 4)
    return total
