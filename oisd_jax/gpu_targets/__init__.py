"""GPU target descriptions for deviceless compilation, and the compile-only devices they make.

Each `*.txtpb` here is an XLA `GpuTargetConfig` text proto written from the GPU's
published properties (SM count, clocks, memory size and bandwidth, shared memory,
compute capability). With `jax-cuda12-pjrt` and `jax-cuda12-plugin` installed at exactly
the jaxlib version (requirements-gpu-plan.txt), XLA compiles for that GPU on a CPU-only
machine: `compile_only_devices()` returns devices that `jax.jit(...).lower(...).compile()`
accepts through a `Mesh`, and `memory_analysis()` then reports the GPU buffer assignment.

Nothing here allocates or needs a GPU or NVIDIA libraries. Peak FLOP rates are not in
XLA's proto; `GpuTarget.peak_bf16_flops` carries the datasheet's dense bf16 figure for
analytic step-time estimates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import re

_DIR = pathlib.Path(__file__).resolve().parent

# key -> (datasheet dense bf16 tensor-core FLOP/s, aliases)
_KNOWN = {
    "a100_80gb": (312e12, ("a100", "a100-80gb", "a100_80g")),
    "h100_80gb": (989e12, ("h100", "h100-80gb", "h100_80g", "h100_sxm")),
    "h200": (989e12, ("h200_141gb", "h200-141gb")),
}


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    key: str                # file stem, e.g. "h100_80gb"
    name: str               # device_description_str, e.g. "NVIDIA H100 80GB HBM3"
    memory_bytes: int       # device_memory_size
    bandwidth: float        # HBM bytes/s
    peak_bf16_flops: float  # dense bf16 FLOP/s per GPU (datasheet)
    compute_capability: tuple[int, int]
    dnn_version: tuple[int, int, int]
    text: str               # the text proto passed to XLA as `target_config`


def names() -> tuple[str, ...]:
    """Shipped target keys (file stems)."""
    return tuple(sorted(p.stem for p in _DIR.glob("*.txtpb")))


def resolve(name: str) -> str:
    """A key from a key, alias ("h100") or path to a .txtpb file."""
    n = name.lower().strip()
    if n in names():
        return n
    for key, (_, aliases) in _KNOWN.items():
        if n in aliases:
            return key
    raise ValueError(f"unknown GPU target {name!r}: known {names()} "
                     f"(aliases {sorted(a for _, al in _KNOWN.values() for a in al)}) or a .txtpb path")


def _field(text: str, name: str, cast=int, default=None):
    m = re.search(rf"^\s*{name}:\s*\"?([^\"\n]+)\"?\s*$", text, re.M)
    if m is None:
        if default is None:
            raise ValueError(f"GPU target proto lacks {name}")
        return default
    return cast(m.group(1))


def _block(text: str, name: str) -> str:
    m = re.search(rf"{name}\s*\{{([^}}]*)\}}", text)
    return m.group(1) if m else ""


def parse(text: str, key: str = "custom", peak_bf16_flops: float = 0.0) -> GpuTarget:
    cc, dnn = _block(text, "cuda_compute_capability"), _block(text, "dnn_version_info")
    return GpuTarget(
        key=key, name=_field(text, "device_description_str", str, key),
        memory_bytes=_field(text, "device_memory_size"), bandwidth=_field(text, "memory_bandwidth", float),
        peak_bf16_flops=peak_bf16_flops,
        compute_capability=(_field(cc, "major", default=0), _field(cc, "minor", default=0)),
        dnn_version=tuple(_field(dnn, f, default=0) for f in ("major", "minor", "patch")),
        text=text)


@functools.cache
def load(name: str) -> GpuTarget:
    """A shipped target by key or alias, or any GpuTargetConfig .txtpb file by path."""
    p = pathlib.Path(name)
    if p.suffix == ".txtpb" and p.exists():
        return parse(p.read_text(), key=p.stem)
    key = resolve(name)
    return parse((_DIR / f"{key}.txtpb").read_text(), key=key, peak_bf16_flops=_KNOWN.get(key, (0.0,))[0])


def plugin_available() -> bool:
    """Whether jax's CUDA PJRT plugin is installed (it need not find a GPU)."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


def compile_only_devices(target: GpuTarget | str, num_devices: int, num_hosts: int = 1) -> list:
    """`num_devices` compile-only GPU devices of `target` (needs requirements-gpu-plan.txt).

    They go into a `jax.sharding.Mesh` like real devices; arrays cannot be placed on them,
    but `jit(f).lower(ShapeDtypeStructs).compile()` compiles for the GPU.
    """
    from jax.experimental import topologies

    target = load(target) if isinstance(target, str) else target
    if not plugin_available():
        raise RuntimeError("GPU targets need the CUDA PJRT plugin: pip install -r requirements-gpu-plan.txt "
                           "(jax-cuda12-pjrt and jax-cuda12-plugin at exactly the installed jaxlib version)")
    if num_devices % num_hosts:
        raise ValueError(f"{num_devices} devices do not split over {num_hosts} hosts")
    # "partitions x hosts per partition x devices per host".
    topo = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=target.text,
                                        topology=f"1x{num_hosts}x{num_devices // num_hosts}")
    return list(topo.devices)


@contextlib.contextmanager
def assume_cudnn(target: GpuTarget):
    """Let jax build cuDNN attention without a local cuDNN library.

    jax asks the installed libcudnn for its version before emitting the fused-attention
    custom call; on a CPU-only machine there is none. While compiling for `target`, answer
    with the target's cuDNN version instead (a private jax hook; planning only).
    """
    from jax._src.cudnn import fused_attention_stablehlo as fa

    major, minor, patch = target.dnn_version
    saved = fa.check_cudnn_version
    fa.check_cudnn_version = lambda: major * 10000 + minor * 100 + patch
    try:
        yield
    finally:
        fa.check_cudnn_version = saved
