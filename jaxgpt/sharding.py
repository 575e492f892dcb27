"""Many devices with JAX's own sharding: a ('data', 'fsdp') mesh, partition rules and multi-host start-up.

The training step is one `jax.jit` whose inputs and outputs carry `NamedSharding`s; XLA inserts the
collectives (gradient all-reduce, FSDP all-gather / reduce-scatter). Nothing here is `pmap`.

    mesh = make_mesh(data=-1, fsdp=1)   # -1: all devices left over
    state = shard_params(state, mesh)   # replicated, or FSDP-sharded over 'fsdp' when fsdp > 1
    x_BT = jax.device_put(x_BT, batch_sharding(mesh))   # batch split over ('data', 'fsdp')

Multi-host: every process runs the same `train.py`; `maybe_initialize_distributed()` joins them into
one JAX runtime, after which `jax.devices()` lists the devices of all hosts and the mesh spans them.
Each process then loads only its own rows of each global batch (`process_rows`) and
`from_process_rows` assembles the global array without any host sending data to another.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt.layout import is_stacked_layer

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism too


def mesh_sizes(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
    """(data, fsdp) with a -1 filled in from `n_devices`; ValueError naming the config keys when they do not fit."""
    sizes = {"data": data, "fsdp": fsdp}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"'mesh.{name}' must be a positive integer or -1, got {size!r}")
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of 'mesh.data' and 'mesh.fsdp' may be -1 (all remaining devices)")
    if -1 in (data, fsdp):
        name, known = ("fsdp", fsdp) if data == -1 else ("data", data)
        if n_devices % known:
            raise ValueError(f"'mesh.{name}'={known} does not divide the {n_devices} devices: "
                             "pick a divisor of the device count")
        data, fsdp = (n_devices // known, fsdp) if data == -1 else (data, n_devices // known)
    if data * fsdp != n_devices:
        raise ValueError(f"'mesh.data'={data} x 'mesh.fsdp'={fsdp} = {data * fsdp} devices, but there are "
                         f"{n_devices}: make the product equal the device count, or set one of them to -1")
    return data, fsdp


def use_cpu_devices(n: int) -> str | None:
    """Makes JAX's CPU backend `n` devices, so that a CPU's cores train data-parallel, each device a part of the batch.

    Why: XLA runs one device's program with its many small kernels (a 12 x 64-token batch's attention, LayerNorms,
    AdamW) mostly on one core at a time; two devices on two cores each run half the batch at once, which shortens
    the CPU recipe's step (measured in benchmarks/RESULTS.md). Only before JAX's first computation: returns None
    when done or not asked (n <= 0), else one line saying why not. On a GPU or TPU it changes nothing (the CPU is
    not used).
    """
    if not isinstance(n, int) or n <= 0:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX is running already
        have = len(jax.devices("cpu"))
        if have == n or jax.default_backend() != "cpu":
            return None
        return (f"config key 'mesh.cpu_devices'={n} not applied: JAX already runs with {have} CPU device(s); "
                "it takes effect when set before JAX's first computation (as train.py does)")
    return None


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh with axes ('data', 'fsdp'); one of the sizes may be -1 (all remaining devices).

    data * fsdp must equal the number of devices (all of them, across hosts).
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_sizes(data, fsdp, len(devices))
    # Auto axes: XLA propagates shardings from the step's in/out annotations (the model code stays unannotated).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the mesh's batch axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Axis `batch_axis` (the batch) split over ('data', 'fsdp'); the other axes whole."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def constrain_batch(x_B: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a jitted step: marks a batch drawn on the device (from a replicated dataset) as split over
    ('data', 'fsdp'), so each device computes only its rows."""
    return jax.lax.with_sharding_constraint(x_B, batch_sharding(mesh, x_B.ndim))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """A clear error when the batch cannot be split evenly over the data-parallel devices."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the data-parallel size {n} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}): use a multiple of {n}"
        )


def param_spec(shape: Sequence[int], fsdp: int, skip_leading: bool = False) -> PartitionSpec:
    """FSDP rule: the largest axis divisible by `fsdp` is split over 'fsdp'; replicated otherwise.

    `skip_leading` keeps axis 0 whole (the layer axis of a `scan_layers` stack: the scan walks it).
    Ties go to the earliest axis. With fsdp == 1 everything is replicated (pure data parallelism).
    """
    spec: list[str | None] = [None] * len(shape)
    if fsdp > 1:
        candidates = [i for i, d in enumerate(shape) if d % fsdp == 0 and not (skip_leading and i == 0)]
        if candidates:
            spec[max(candidates, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*spec)


def state_shardings(tree, mesh: Mesh, scan_layers: bool = False):
    """A NamedSharding for every array leaf of `tree` (params, optimizer state, ...), by `param_spec`.

    Scalars (Adam's count, the step) are replicated. Works on concrete arrays and ShapeDtypeStructs.
    """
    fsdp = mesh.shape["fsdp"]

    def rule(path, leaf):
        shape = getattr(leaf, "shape", ())
        skip = scan_layers and is_stacked_layer(path)
        return NamedSharding(mesh, param_spec(shape, fsdp, skip_leading=skip))

    return jax.tree_util.tree_map_with_path(rule, tree)


def shard_params(tree, mesh: Mesh, scan_layers: bool = False):
    """Places `tree` (an nnx.State, optimizer state, or any pytree of arrays) on `mesh` by the FSDP rule."""
    return jax.device_put(tree, state_shardings(tree, mesh, scan_layers=scan_layers))


def sharded_shapes(tree, mesh: Mesh, scan_layers: bool = False):
    """`tree`'s leaves as `jax.ShapeDtypeStruct`s with the shardings `shard_params` gives them: what a program
    compiled before the arrays exist is compiled for."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                                          weak_type=getattr(x, "weak_type", False)),
                        tree, state_shardings(tree, mesh, scan_layers=scan_layers))


def zeros(shapes):
    """Arrays of zeros with the shapes, dtypes and shardings of `shapes` (`jax.ShapeDtypeStruct` leaves, as
    `sharded_shapes` gives them, or arrays), made on the host and placed: no program compiles for them, where
    `jnp.zeros` or a jitted initialiser compiles one before the first step (AdamW's moments). Each process makes only
    its own shards."""

    def place(s: jax.ShapeDtypeStruct) -> jax.Array:
        return jax.make_array_from_callback(s.shape, s.sharding,
                                            lambda _: np.zeros(s.sharding.shard_shape(s.shape), s.dtype))

    return jax.tree.map(place, shapes)


# --------------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------------

def first_replica(tree):
    """In a single process, `tree`'s arrays (or `jax.ShapeDtypeStruct`s) that are replicated over several devices as
    their first device's copy (the buffer itself, nothing copied); all else, and every leaf with several processes,
    unchanged.

    For work that gains nothing from a mesh: a sample of one sequence, which every device of the mesh would compute,
    and a checkpoint, which Orbax would otherwise split over the replicas to write in parallel, compiling a slicing
    program per shape at the run's first save.
    """
    if jax.process_count() > 1:
        return tree

    def first(x):
        if not isinstance(x, jax.Array | jax.ShapeDtypeStruct) or x.sharding is None:
            return x
        if len(x.sharding.device_set) == 1 or not x.sharding.is_fully_replicated:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            device = min(x.sharding.device_set, key=lambda d: d.id)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
        return min(x.addressable_shards, key=lambda shard: shard.device.id).data

    return jax.tree.map(first, tree)


def is_multiprocess_env(environ: dict[str, str] | None = None) -> bool:
    """True when the environment says this run is one of several processes: JAX's own coordinator settings,
    SLURM's task layout, Open MPI's, or a Cloud TPU pod slice (where JAX detects everything itself)."""
    env = os.environ if environ is None else environ
    for name in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if name in env:
            try:
                return int(env[name]) > 1
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    if "JAX_COORDINATOR_ADDRESS" in env:
        return True
    # A TPU pod slice: more than one worker host listed by the TPU runtime.
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize_distributed(environ: dict[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when this is one of several processes; True if it did.

    jax.distributed reads its settings from the environment: on a Cloud TPU pod slice and under SLURM
    or Open MPI it finds the coordinator and process ids itself; elsewhere set
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
    Must run before anything touches a device.
    """
    env = os.environ if environ is None else environ
    if not is_multiprocess_env(env):
        return False
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> slice:
    """The rows along `axis` of a global array with `sharding` that live on this process's devices.

    With the batch split over ('data', 'fsdp') and each process owning a contiguous block of devices
    (as `jax.make_mesh` lays them out), they are one contiguous slice; every row, with one process.
    """
    axis %= len(global_shape)
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        held.update(range(*index[axis].indices(global_shape[axis])))
    lo, hi = min(held), max(held) + 1
    if len(held) != hi - lo:
        raise ValueError(f"this process's devices hold non-contiguous rows of axis {axis} (between {lo} and {hi}): "
                         "order the mesh's devices by process")
    return slice(lo, hi)


def from_process_rows(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's rows (`process_rows`) -> the global array with `sharding`, without any host sending
    data to another. With one process it is a plain `device_put`."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def sync_processes(name: str) -> None:
    """A barrier across the run's processes, so that what one process wrote is there for the others
    (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def first_failed_process(failed: bool) -> int | None:
    """Every process says whether a check failed on it; all get back the lowest failing process index
    (None when none failed), so that they stop together instead of waiting on each other forever."""
    if jax.process_count() == 1:
        return 0 if failed else None
    from jax.experimental import multihost_utils

    bad = np.flatnonzero(np.asarray(multihost_utils.process_allgather(np.int32(failed))))
    return int(bad[0]) if bad.size else None
