"""A quiet start: drop start-up chatter that is harmless here, then say in one line what a run uses.

On a CPU machine a run used to open with lines a user reads as errors:
  * `Unable to initialize backend 'tpu': ... libtpu.so` (jax probes every platform it knows;
    these probes are marked fail-quietly and logged at INFO),
  * `[transformers] PyTorch was not found. Models won't be available ...` (an advisory: we
    only use transformers' tokenizers and config classes at run time),
  * with the deviceless-planning CUDA plugin installed (requirements-gpu-plan.txt) and no NVIDIA
    GPU: three pairs of `cudart_stub.cc:31] Could not find cuda drivers` lines printed by C++
    code while `import jax` runs, and a 20-line `Jax plugin configuration error` traceback.
Only those are filtered, each by its own pattern. Everything else on stderr is passed on, and
the plugin error stays visible when an NVIDIA GPU is there (then it is a real error). Set
`OISD_JAX_VERBOSE_START=1` to see it all.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

VERBOSE_ENV = "OISD_JAX_VERBOSE_START"
# Lines that C++ code writes to fd 2 while `import jax` loads the CUDA plugin on a machine
# without CUDA drivers.
IMPORT_NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")
# Lines libtpu (installed for deviceless TPU planning) writes while jax probes for TPU chips
# on a machine that has none: its cloud-metadata look-ups fail. Dropped only when the run
# ends up on another platform; on a TPU they are kept.
LIBTPU_NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Logging before InitGoogle()",
                "=== Source Location Trace: ===", "libtpu_init_utils.cc")


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _HarmlessBackendRecords(logging.Filter):
    """Drops jax's fail-quietly backend probes, and the CUDA plugin's traceback when no NVIDIA
    GPU is visible (the plugin is installed for deviceless planning; it cannot run here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if record.levelno <= logging.INFO and msg.startswith("Unable to initialize backend"):
            return False
        if msg.startswith("Jax plugin configuration error") and not nvidia_gpu_visible():
            return False
        return True


def nvidia_gpu_visible() -> bool:
    """True when the machine shows an NVIDIA device node (jax's own test for the cuda backend)."""
    try:
        from jax._src import hardware_utils  # noqa: PLC0415
        return bool(hardware_utils.has_visible_nvidia_gpu())
    except Exception:  # noqa: BLE001 - a newer jax without the helper: keep the record
        return True


def _emit_kept(text: str, noise: tuple[str, ...] = IMPORT_NOISE) -> None:
    kept = [ln for ln in text.splitlines() if ln.strip() and not any(n in ln for n in noise)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()


class CaptureFd2:
    """Everything written to file descriptor 2 inside the block, as text (`.text`)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        return False


def quiet_import_jax() -> None:
    """Import jax with the known-harmless start-up lines dropped (a no-op once jax is imported).

    C++ code writes those lines straight to file descriptor 2, so stderr is captured at the
    descriptor while the import runs and every other line is written back afterwards, also
    when the import fails.
    """
    if _verbose():
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("jax._src.xla_bridge").addFilter(_HarmlessBackendRecords())
    if "jax" in sys.modules:
        return
    try:
        cap = CaptureFd2().__enter__()
    except OSError:  # no usable fd 2 (an embedded interpreter): import as is
        import jax  # noqa: F401, PLC0415
        return
    try:
        import jax  # noqa: F401, PLC0415
    finally:
        cap.__exit__(None, None, None)
        _emit_kept(cap.text)


def init_backends() -> str:
    """Initialise jax's backends (first use) with libtpu's probe chatter dropped unless the
    run is on a TPU; returns the default platform."""
    import jax  # noqa: PLC0415
    from jax._src import xla_bridge  # noqa: PLC0415
    if _verbose() or xla_bridge.backends_are_initialized():
        return jax.default_backend()
    platform = None
    cap = CaptureFd2().__enter__()
    try:
        platform = jax.default_backend()
    finally:  # a failed start-up keeps every line it printed
        cap.__exit__(None, None, None)
        _emit_kept(cap.text, IMPORT_NOISE + (LIBTPU_NOISE if platform not in (None, "tpu") else ()))
    return platform


def describe_backend() -> str:
    """One line: platform, device kind and count, processes (initialises jax's backends)."""
    import jax  # noqa: PLC0415
    init_backends()
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    procs = jax.process_count()
    return (f"backend {jax.default_backend()}: {len(devices)} device{'s' * (len(devices) != 1)} "
            f"({', '.join(kinds)}), {jax.local_device_count()} local, "
            f"{procs} process{'es' * (procs != 1)}; jax {jax.__version__}")
