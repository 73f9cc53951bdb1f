"""Compiling a planned program for a target and reading its memory: the targets (deviceless
GPUs and TPUs, fake CPUs), XLA's per-device byte counts, the budget they are held against.

Shared by the `oisd_jax.plan` command and its searches (`plan_search`), which import it
rather than each other.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax

from oisd_jax.plan_programs import Phase
from oisd_jax.startup import CaptureFd2

GiB = 2 ** 30


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    kind: str                 # "gpu" | "tpu" | "cpu"
    name: str
    memory_bytes: int         # per device
    peak_flops: float         # per device, dense bf16 (0 = unknown)
    bandwidth: float          # HBM bytes/s (0 = unknown)
    gpu: Any = None           # gpu_targets.GpuTarget
    topology: str = ""        # TPU: "v5p" (standard slice for --devices) or "v5p:2x2x2"

    def devices(self, n: int) -> list:
        if self.kind == "tpu":
            from oisd_jax import tpu_targets
            return tpu_targets.compile_only_devices(self.topology, n)
        if self.kind == "gpu":
            from oisd_jax import gpu_targets
            return gpu_targets.compile_only_devices(self.gpu, n)
        cpus = jax.devices("cpu")
        if len(cpus) < n:
            raise RuntimeError(f"--target=cpu needs {n} CPU devices, jax has {len(cpus)}: run as "
                               f"`python -m oisd_jax.plan` (it sets jax_num_cpu_devices) or set "
                               f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return cpus[:n]


def get_target(name: str, cpu_memory_gib: float = 80.0) -> Target:
    if name == "cpu":
        return Target("cpu", "CPU (fake devices; indicative only)", int(cpu_memory_gib * GiB), 0.0, 0.0)
    from oisd_jax import tpu_targets
    if tpu_targets.is_tpu_name(name):
        t = tpu_targets.resolve(name)
        return Target("tpu", t.name, t.memory_bytes, t.peak_bf16_flops, t.bandwidth, topology=name.lower())
    from oisd_jax import gpu_targets
    t = gpu_targets.load(name)
    return Target("gpu", t.name, t.memory_bytes, t.peak_bf16_flops, t.bandwidth, t)


# ----------------------------------------------------------------------------- compiling
@dataclasses.dataclass
class Compiled:
    """One program's per-device memory as XLA assigned it."""
    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    xla_peak: int | None      # memory_analysis().peak_memory_in_bytes (GPU; CPU's ignores temps)
    compile_s: float
    warnings: list[str]
    cudnn_attention: int = 0  # cuDNN fused-attention calls in the compiled program
    tpu_kernels: int = 0      # Mosaic (Pallas TPU) kernel calls, e.g. splash attention
    oom: str = ""             # the TPU compiler's own out-of-HBM error (temporaries: what it needed)

    @property
    def total(self) -> int:
        own = self.arguments + self.outputs - self.aliased + self.temporaries
        return max(own, self.xla_peak or 0)


REMAT_WARNING = "Can't reduce memory use below"
# Deviceless-compile chatter that says nothing about memory (no GPU here; a sort algorithm
# XLA would pick with CUB data it lacks offline).
_NOISE = ("cudart_stub", "absl::InitializeLog", "deviceless CUB", "cub/data", "Missing deviceless")


def compile_program(name: str, lower: Callable[[], Any], target: Target) -> Compiled:
    """Lower + compile (nothing allocated) and read memory_analysis; keep XLA's remat warnings."""
    t0 = time.perf_counter()
    ctx = _assume_cudnn(target)
    try:
        with ctx, CaptureFd2() as cap:  # XLA logs its warnings from C++ straight to fd 2
            lowered = lower()
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- only the TPU compiler's HBM verdict is a result
        if "CompileTimeHbmOom" not in str(e):
            raise
        return _hbm_oom(name, str(e), target, time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    warn = [ln.strip() for ln in cap.text.splitlines() if REMAT_WARNING in ln]
    other = [ln for ln in cap.text.splitlines() if ln.strip() and REMAT_WARNING not in ln
             and not any(n in ln for n in _NOISE)]
    if other:  # not ours to swallow
        sys.stderr.write("\n".join(other) + "\n")
    m = compiled.memory_analysis()
    peak = getattr(m, "peak_memory_in_bytes", None) if target.kind == "gpu" else None
    fmha = compiled.as_text().count("custom_call_target=\"__cudnn$fmha") if target.kind == "gpu" else 0
    # Counted in the lowered StableHLO: the compiled TPU module of a Qwen3-4B step fails to
    # print (libtpu 0.0.51: "async-update instruction should have 1 operands but sees 3").
    mosaic = lowered.as_text().count("@tpu_custom_call") if target.kind == "tpu" else 0
    return Compiled(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                    int(m.temp_size_in_bytes), None if peak is None else int(peak), dt, warn, fmha, mosaic)


def _hbm_oom(name: str, msg: str, target: Target, dt: float) -> Compiled:
    """XLA:TPU refuses to compile a program over HBM ("... required for HLO temporaries
    (32.00G) exceeds available HBM (15.75G)"): a FAIL for the phase, with what it needed."""
    import re
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", msg)
    need = int(float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10)) if m else target.memory_bytes + 1
    line = next((ln for ln in msg.splitlines() if "CompileTimeHbmOom" in ln), msg[:300])
    return Compiled(name, 0, 0, 0, max(need, target.memory_bytes + 1), None, dt, [], oom=line.strip())


def _assume_cudnn(target: Target):
    import contextlib
    if target.kind != "gpu":
        return contextlib.nullcontext()
    from oisd_jax import gpu_targets
    return gpu_targets.assume_cudnn(target.gpu)


# ----------------------------------------------------------------------------- budget
@dataclasses.dataclass(frozen=True)
class Budget:
    device_bytes: int
    mem_fraction: float
    reserve_bytes: int

    @property
    def bytes(self) -> int:
        return int(self.device_bytes * self.mem_fraction) - self.reserve_bytes


@dataclasses.dataclass
class PhaseResult:
    phase: Phase
    compiled: Compiled

    @property
    def total(self) -> int:
        return self.phase.resident_bytes + self.compiled.total
