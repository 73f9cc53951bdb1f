"""Multi-host runs: start `jax.distributed` from the environment, put host data on the
global mesh, share out host work (rewards), and let process 0 alone write files.

Where the settings come from, first match wins:
  1. explicit arguments (`--coordinator=host:port --num_processes=N --process_id=i`),
  2. `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`,
  3. SLURM (`srun`: one task per node owning all its GPUs, or one task per GPU),
  4. Cloud TPU slices (every worker runs the same command): from TPU_WORKER_HOSTNAMES /
     TPU_PROCESS_ADDRESSES + TPU_WORKER_ID (+ MEGASCALE_* for multislice) where set
     (GKE), else jax reads the GCE TPU VM metadata,
  5. Open MPI (`mpirun`),
otherwise one process: `initialize()` does nothing, so the same entry point runs on a
laptop and on a cluster. Call it before anything touches a jax backend.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    source: str            # explicit | env | slurm | tpu | ompi | single
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    coordinator: str | None


def _int_env(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def detect() -> str:
    """Which launcher started this process (without initializing anything)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if "SLURM_JOB_ID" in os.environ and (_int_env("SLURM_NTASKS") or _int_env("SLURM_NPROCS") or 1) > 1:
        return "slurm"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 \
            or os.environ.get("OISD_TPU_POD") == "1" or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    return "single"


def _slurm_local_devices() -> list[int] | None:
    """With one SLURM task per node, the task owns all of the node's GPUs.

    (jax's SLURM detection assumes one task per GPU and would give each task only GPU
    SLURM_LOCALID.) None = let jax decide.
    """
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS_PER_NODE", "").split(":")[-1]
    if per_node == "1" and gpus and gpus.isdigit() and int(gpus) > 1:
        return list(range(int(gpus)))
    return None


def tpu_env_settings() -> tuple[str, int, int] | None:
    """(coordinator host:port, processes, this process) from a TPU slice's environment,
    computed as jax's GKE TPU cluster does; None where the variables are absent (GCE TPU
    VMs, whose metadata jax reads itself).

    Done here rather than left to jax because jax only looks at these variables once
    libtpu has found local TPU chips; the same numbers computed here are what a test with
    a faked environment can check. The port is jax's default 8476 (OISD_COORDINATOR_PORT
    overrides it).
    """
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    worker = _int_env("TPU_WORKER_ID")
    if not hosts or worker is None:
        return None
    workers = [h.split(":")[0] for h in hosts.split(",") if h]
    slices, slice_id = _int_env("MEGASCALE_NUM_SLICES", 1), _int_env("MEGASCALE_SLICE_ID", 0)
    host = (os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or workers[0]).split(":")[0]
    port = _int_env("OISD_COORDINATOR_PORT", 8476)
    return f"{host}:{port}", len(workers) * slices, worker + slice_id * len(workers)


_INFO: DistInfo | None = None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, *, cpu_collectives: str = "gloo",
               timeout_s: int = 300) -> DistInfo:
    """Start jax.distributed when this is one process of many; a no-op otherwise.

    Idempotent. `cpu_collectives` picks the cross-process collectives of the CPU backend
    (tests and CPU clusters); GPUs use NCCL and TPUs ICI/DCN regardless.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    source = "explicit" if explicit else detect()
    if source == "explicit" and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("explicit multi-process settings need coordinator, num_processes and process_id")
    if source != "single":
        if source == "env":
            coordinator = os.environ["JAX_COORDINATOR_ADDRESS"]
            num_processes = _int_env("JAX_NUM_PROCESSES", num_processes)
            process_id = _int_env("JAX_PROCESS_ID", process_id)
        if source == "tpu" and coordinator is None and (tpu := tpu_env_settings()) is not None:
            coordinator, num_processes, process_id = tpu
        if source == "slurm" and local_device_ids is None:
            local_device_ids = _slurm_local_devices()
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
    _INFO = DistInfo(source=source, process_index=jax.process_index(), process_count=jax.process_count(),
                     local_device_count=jax.local_device_count(), device_count=jax.device_count(),
                     coordinator=coordinator)
    if source != "single":
        log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", source,
                 _INFO.process_index, _INFO.process_count, _INFO.local_device_count, _INFO.device_count)
    return _INFO


def define_flags() -> None:
    """absl flags --coordinator / --num_processes / --process_id for an entry point
    (unset = from the environment); `initialize_from_flags()` reads them."""
    from absl import flags
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit multi-process runs).")
    flags.DEFINE_integer("num_processes", None, "Processes in an explicit multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in an explicit multi-process run.")


def initialize_from_flags() -> DistInfo:
    from absl import flags
    f = flags.FLAGS
    return initialize(f.coordinator, f.num_processes, f.process_id)


# ----------------------------------------------------------------------------- process 0 writes
def is_main() -> bool:
    return jax.process_index() == 0


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run `fn` on process 0 only (metrics, JSON, plots); others get None.

    Never wrap anything with collectives inside (orbax saves, jitted steps): every
    process must call those.
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None
    return wrapped


def sync(name: str) -> None:
    """Barrier across processes (e.g. before process 0 reads what all wrote)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_from_main(tree: Any) -> Any:
    """Process 0's value of a pytree of arrays/scalars, on every process (e.g. a seed, a resume step)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(tree)


# ----------------------------------------------------------------------------- host data
# Every process holds the same host-side batch (prompts, rollouts, rewards, packed rows):
# they are small next to the model, so the run is identical for any process count (same
# data order, same packing, same sampling) and a checkpoint resumes on another topology.
# Each device is then filled from its own slice of the host copy; nothing is gathered.
def put_global(tree: Any, shardings: Any) -> Any:
    """Global jax.Arrays from host arrays that every process holds in full.

    `shardings`: one Sharding for every leaf, or a matching pytree (None leaves stay None).
    Each process reads only the slices its devices own (`make_array_from_callback`).
    """
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def split_map(fn: Callable[[list], Sequence[float]], items: Sequence, dtype=np.float32) -> np.ndarray:
    """`fn` over a host list, each process doing a strided share; the full result on all.

    For expensive host work whose inputs every process already has (reward checks): with
    P processes each runs `fn` on items[i::P], then the shares are exchanged.
    """
    n = jax.process_count()
    if n == 1:
        return np.asarray(fn(list(items)), dtype)
    i, per = jax.process_index(), -(-len(items) // n)
    mine = np.zeros(per, dtype)
    share = list(items[i::n])
    mine[:len(share)] = np.asarray(fn(share), dtype) if share else []
    from jax.experimental import multihost_utils
    shares = np.asarray(multihost_utils.process_allgather(mine))  # [P, per]
    out = np.empty(len(items), dtype)
    for j in range(n):
        k = len(range(j, len(items), n))
        out[j::n] = shares[j, :k]
    return out


def to_host(tree: Any) -> Any:
    """Full NumPy copies of (possibly multi-process) global arrays on every process.

    For small results (metrics, rewards, generated tokens); never for parameters.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
