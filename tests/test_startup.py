"""The quiet start: harmless start-up chatter is dropped, everything else is kept."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from oisd_jax import startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         "I0000 00:00:1796155637.887501    5144 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")


def _import_with_fake_jax(tmp_path, body: str, **env):
    """`import oisd_jax` in a fresh interpreter whose `jax` is a stand-in that writes to fd 2."""
    fake = tmp_path / "fake" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent(body))
    environ = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{REPO}", **env}
    environ.pop(startup.VERBOSE_ENV, None)
    environ.update(env)
    return subprocess.run([sys.executable, "-c", "import oisd_jax, jax; print('imported')"], cwd=tmp_path,
                          env=environ, capture_output=True, text=True, timeout=120)


FAKE = f"""
import os
os.write(2, {NOISE!r}.encode())
os.write(2, b"a real problem the user must see\\n")
"""


def test_import_drops_only_the_known_lines(tmp_path):
    r = _import_with_fake_jax(tmp_path, FAKE)
    assert r.returncode == 0, r.stderr
    assert "imported" in r.stdout
    assert "a real problem the user must see" in r.stderr
    assert "cudart_stub" not in r.stderr and "absl::InitializeLog" not in r.stderr


def test_verbose_env_keeps_everything(tmp_path):
    r = _import_with_fake_jax(tmp_path, FAKE, **{startup.VERBOSE_ENV: "1"})
    assert r.returncode == 0, r.stderr
    assert "cudart_stub" in r.stderr and "a real problem the user must see" in r.stderr


def test_a_failing_import_still_shows_its_output(tmp_path):
    body = FAKE + "\nraise ImportError('libfoo.so: cannot open shared object file')\n"
    r = _import_with_fake_jax(tmp_path, body)
    assert r.returncode != 0
    assert "a real problem the user must see" in r.stderr
    assert "libfoo.so: cannot open shared object file" in r.stderr
    assert "cudart_stub" not in r.stderr


@pytest.mark.parametrize("msg,level,kept", [
    ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so", logging.INFO, False),
    ("Unable to initialize backend 'cuda': out of memory", logging.WARNING, True),
    ("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed.",
     logging.WARNING, True),
])
def test_backend_record_filter(msg, level, kept):
    rec = logging.LogRecord("jax._src.xla_bridge", level, __file__, 1, msg, None, None)
    assert startup._HarmlessBackendRecords().filter(rec) is kept  # noqa: SLF001


def test_plugin_error_kept_when_a_gpu_is_visible(monkeypatch):
    rec = logging.LogRecord("jax._src.xla_bridge", logging.ERROR, __file__, 1,
                            "Jax plugin configuration error: Exception when calling initialize()", None, None)
    monkeypatch.setattr(startup, "nvidia_gpu_visible", lambda: True)
    assert startup._HarmlessBackendRecords().filter(rec)  # noqa: SLF001
    monkeypatch.setattr(startup, "nvidia_gpu_visible", lambda: False)
    assert not startup._HarmlessBackendRecords().filter(rec)  # noqa: SLF001


def test_describe_backend_names_platform_and_devices():
    import jax
    line = startup.describe_backend()
    assert line.startswith(f"backend {jax.default_backend()}: {jax.device_count()} devices")
    assert "1 process;" in line and jax.__version__ in line


def test_cli_help_starts_quietly():
    """The real CLI with this environment's packages (the CUDA planning plugin included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", startup.VERBOSE_ENV)}
    r = subprocess.run([sys.executable, "-m", "oisd_jax.train", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--workdir" in r.stdout + r.stderr
    for noise in ("cudart_stub", "Jax plugin configuration error", "PyTorch was not found", "Traceback"):
        assert noise not in r.stderr, r.stderr


def test_backend_start_drops_libtpu_probe_lines_off_tpu():
    """With libtpu installed (the TPU planning requirements) on a machine without TPU chips,
    jax's backend start makes libtpu print metadata-lookup errors; a CPU run drops them."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", startup.VERBOSE_ENV)}
    code = "from oisd_jax import startup; print(startup.describe_backend()); print('real line', flush=True)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("backend ")
    if not r.stdout.startswith("backend tpu"):
        for noise in startup.LIBTPU_NOISE + ("cudart_stub",):
            assert noise not in r.stderr, r.stderr
