"""TPU targets for deviceless compilation: v5e, v5p, v6e slices as compile-only devices.

With `libtpu` installed beside jax (requirements-tpu-plan.txt), jax builds a TPU topology
on a CPU-only machine (`jax.experimental.topologies.get_topology_desc(platform="tpu",
topology_name="v5p:2x2x1")`); its devices go into a `Mesh` and `jit(...).lower(...)
.compile()` runs the real TPU compiler (buffer assignment, Mosaic kernels, and its own
out-of-HBM check). Nothing is allocated.

Per chip (one JAX device per chip; v5p's two TensorCores act as one "megacore" device):

| target | HBM the compiler assigns | peak bf16 | HBM bandwidth | published (cloud.google.com/tpu/docs) |
|---|---:|---:|---:|---|
| v5e | 15.75 GiB | 197 TFLOP/s | 819 GB/s | 16 GB HBM2, 197 TFLOPs, 819 GBps |
| v5p | 95.73 GiB | 459 TFLOP/s | 2765 GB/s | 95 GB HBM2e, 459 TFLOPs, 2765 GBps |
| v6e | 31.24 GiB | 918 TFLOP/s | 1638 GB/s | 32 GB HBM, 918 TFLOPs, 1638 GBps |

The HBM column is what libtpu 0.0.51 reports as "available HBM" when a compile exceeds
it (CompileTimeHbmOom, measured here), i.e. the budget XLA itself enforces; FLOP/s and
bandwidth are the datasheet figures. Slice names count chips for v5e/v6e (v6e-8 = 8
chips) but TensorCores for v5p (v5p-8 = 4 chips): `--devices` is always chips.
"""
from __future__ import annotations

import dataclasses
import glob
import os

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    key: str               # "v5e" | "v5p" | "v6e"
    name: str              # jax device_kind, e.g. "TPU v5"
    memory_bytes: int      # HBM per chip the compiler may assign
    peak_bf16_flops: float
    bandwidth: float       # HBM bytes/s
    dims: int              # topology rank (2D torus, 3D for v5p)
    cores_per_chip: int    # TensorCores per chip (slice names count these)


TARGETS = {
    "v5e": TpuTarget("v5e", "TPU v5 lite", int(15.75 * GiB), 197e12, 819e9, 2, 1),
    "v5p": TpuTarget("v5p", "TPU v5", int(95.73 * GiB), 459e12, 2765e9, 3, 2),
    "v6e": TpuTarget("v6e", "TPU v6 lite", int(31.24 * GiB), 918e12, 1638e9, 2, 1),
}


def is_tpu_name(name: str) -> bool:
    """`v5p`, `v5p-8` (a slice name) or `v5p:2x2x1` (an explicit topology)."""
    return name.lower().split(":")[0].split("-")[0] in TARGETS


def resolve(name: str) -> TpuTarget:
    key = name.lower().split(":")[0].split("-")[0]
    if key not in TARGETS:
        raise ValueError(f"unknown TPU target {name!r}: known {sorted(TARGETS)}")
    return TARGETS[key]


def topology_name(target: TpuTarget, num_chips: int) -> str:
    """The standard slice shape of `num_chips` chips: 2D (v5e, v6e) 2x2, 2x4, 4x4, 4x8, ...;
    3D (v5p) 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (Cloud TPU's documented shapes)."""
    n = int(num_chips)
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n} TPU chips: slices have a power-of-two chip count (or pass --target=v5p:AxBxC)")
    k = n.bit_length() - 1
    if target.dims == 2:
        shape = [2 ** (k // 2), 2 ** (k - k // 2)]
    elif n < 4:
        shape = [1, n, 1]
    else:  # 2x2x1, then double the smallest axis (the last of equals): 2x2x2, 2x2x4, 2x4x4, ...
        shape = [2, 2, 1]
        for _ in range(k - 2):
            shape[min(range(3), key=lambda a: (shape[a], -a))] *= 2
    return f"{target.key}:" + "x".join(map(str, shape))


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def _on_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_env(target: TpuTarget, num_chips: int) -> None:
    """Off a TPU VM, tell libtpu what its metadata server would: no one answers here.

    libtpu starts its client by asking GCE metadata for the slice type and the worker
    list; on a CPU-only machine it prints two warnings (TPU_ACCELERATOR_TYPE,
    TPU_WORKER_HOSTNAMES) and an INVALID_ARGUMENT line, then compiles fine. The values
    only feed that start-up; the compile target is the topology name. Never set on a TPU
    VM, where they would override the real slice.
    """
    if _on_tpu_vm():
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.key}-{num_chips * target.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu also takes /tmp/libtpu_lockfile, which guards real chips: a second planner (or
    # test) on the same machine would abort. Compile-only clients share no chips.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compile_only_devices(name: str, num_chips: int) -> list:
    """`num_chips` compile-only TPU devices: `name` is v5e|v5p|v6e (standard slice shape for
    the count) or an explicit topology `v5p:2x2x2`."""
    from jax.experimental import topologies

    target = resolve(name)
    if not libtpu_available():
        raise RuntimeError("TPU targets need libtpu: pip install -r requirements-tpu-plan.txt "
                           "(libtpu matched to the installed jax)")
    topo = name if ":" in name else topology_name(target, num_chips)
    quiet_libtpu_env(target, num_chips)
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topo).devices)
    if len(devices) != num_chips:
        raise ValueError(f"topology {topo} has {len(devices)} chips, --devices={num_chips}")
    return devices
