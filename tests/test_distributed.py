"""Launcher detection and host-data placement (the two-process run is test_multiprocess)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oisd_jax import distributed, parallel

_LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
                "OISD_TPU_POD", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS_PER_NODE",
                "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")


@pytest.fixture
def clean_env(monkeypatch):
    for v in _LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, want", [
    ({}, "single"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, "env"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),  # an interactive one-task allocation
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "a"}, "single"),  # a single-host TPU VM
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "env"),  # explicit env wins
])
def test_detect(clean_env, env, want):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert distributed.detect() == want


@pytest.mark.parametrize("env, want", [
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_NTASKS_PER_NODE": "1(x2)", "SLURM_GPUS_PER_NODE": "h100:4"}, list(range(4))),
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}, None),  # one task per GPU: jax's default
    ({"SLURM_NTASKS_PER_NODE": "1"}, None),
])
def test_slurm_task_owns_its_node_gpus(clean_env, env, want):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert distributed._slurm_local_devices() == want


def test_explicit_settings_must_be_complete():
    if distributed._INFO is not None:
        pytest.skip("jax.distributed already initialised in this process")
    with pytest.raises(ValueError, match="coordinator, num_processes and process_id"):
        distributed.initialize("localhost:1", num_processes=2)


@pytest.mark.parametrize("spec", [P(("data", "fsdp")), P(None, "tensor"), P()])
def test_put_global_gives_each_device_its_slice(spec):
    mesh = parallel.make_mesh((2, 2, 2))
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    sharding = NamedSharding(mesh, spec)
    tree = distributed.put_global({"a": x, "b": x[:, :2].astype(np.int32)}, sharding)
    for leaf, ref in ((tree["a"], x), (tree["b"], x[:, :2].astype(np.int32))):
        assert leaf.sharding == sharding and leaf.dtype == ref.dtype
        np.testing.assert_array_equal(np.asarray(leaf), ref)
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), ref[shard.index])


def test_split_map_one_process_is_fn():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [len(s) for s in items]
    out = distributed.split_map(fn, ["a", "bb", "ccc"])
    assert out.dtype == np.float32 and out.tolist() == [1, 2, 3] and calls == [["a", "bb", "ccc"]]
    assert jax.process_count() == 1


def _fake_tool(tmp_path, name: str) -> str:
    """A stand-in for srun / gcloud on PATH that records its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" >> {tmp_path}/{name}.args\n'
                    f'echo "$JAX_COMPILATION_CACHE_DIR" > {tmp_path}/{name}.cache_dir\n')
    tool.chmod(0o755)
    return str(bin_dir)


def _env_without_cache_dir() -> dict:
    """os.environ less the test session's own compilation cache (conftest), so the
    launchers' defaults show."""
    import os
    return {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


@pytest.mark.parametrize("entry", [None, "oisd_jax.evaluate"])
def test_slurm_launcher_command(tmp_path, entry):
    import os
    import subprocess
    env = dict(_env_without_cache_dir(), PATH=_fake_tool(tmp_path, "srun") + os.pathsep + os.environ["PATH"],
               SLURM_JOB_NAME="oisd", SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", WORKDIR=str(tmp_path / "run"))
    if entry:
        env["ENTRY"] = entry
    subprocess.run(["bash", "launch/slurm_gpu.sbatch", "configs/tiny.py", "--config.train.steps=3"], env=env,
                   check=True, capture_output=True)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[args.index("python"):] == ["python", "-m", entry or "oisd_jax.train", "--config=configs/tiny.py",
                                           f"--workdir={tmp_path / 'run'}", "--config.train.steps=3"]
    assert "--kill-on-bad-exit=1" in args
    # every task inherits the persistent compilation cache, inside the (shared) workdir
    assert (tmp_path / "srun.cache_dir").read_text().strip() == str(tmp_path / "run" / "xla_cache")


def test_tpu_launcher_runs_one_command_on_all_workers(tmp_path):
    import os
    import subprocess
    env = dict(_env_without_cache_dir(), PATH=_fake_tool(tmp_path, "gcloud") + os.pathsep + os.environ["PATH"],
               WORKDIR="gs://bucket/run", ENTRY="oisd_jax.evaluate")
    subprocess.run(["bash", "launch/tpu_pod.sh", "run", "my-v5p", "us-east5-a", "configs/qwen3_8b.py",
                    "--benchmarks=aime24"], env=env, check=True, capture_output=True)
    args = (tmp_path / "gcloud.args").read_text().splitlines()
    assert "--worker=all" in args
    command = next(a for a in args if a.startswith("--command="))
    assert "OISD_TPU_POD=1" in command
    # every worker shares one persistent compilation cache, inside the (gs://) workdir
    assert "JAX_COMPILATION_CACHE_DIR=gs://bucket/run/xla_cache " in command
    assert ("python -m oisd_jax.evaluate --config=configs/qwen3_8b.py --workdir=gs://bucket/run "
            "--config.model.attn_impl=splash  --benchmarks=aime24") in command


def test_tpu_launcher_dry_run_prints_and_runs_nothing(tmp_path):
    import os
    import subprocess
    env = dict(_env_without_cache_dir(), PATH=_fake_tool(tmp_path, "gcloud") + os.pathsep + os.environ["PATH"],
               WORKDIR="gs://bucket/run", DRY_RUN="1")
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "run", "my-v5p", "us-east5-a", "configs/qwen3_4b.py",
                          "--config.train.steps=3"], env=env, check=True, capture_output=True, text=True).stdout
    assert not (tmp_path / "gcloud.args").exists()  # gcloud was never called
    lines = out.splitlines()
    i = lines.index("[dry-run] every worker of my-v5p (--worker=all) runs:")
    assert "python -m oisd_jax.train --config=configs/qwen3_4b.py --workdir=gs://bucket/run " \
           "--config.model.attn_impl=splash  --config.train.steps=3" in lines[i + 1]
    assert "OISD_TPU_POD=1" in lines[i + 1] and "JAX_COMPILATION_CACHE_DIR=gs://bucket/run/xla_cache" in lines[i + 1]
    assert any(ln.startswith("[dry-run] gcloud compute tpus tpu-vm ssh my-v5p") for ln in lines)


def test_tpu_env_settings(clean_env):
    for k in ("TPU_WORKER_ID", "TPU_PROCESS_ADDRESSES", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
              "OISD_COORDINATOR_PORT"):
        clean_env.delenv(k, raising=False)
    assert distributed.tpu_env_settings() is None  # a GCE TPU VM: jax reads the metadata
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4")
    clean_env.setenv("TPU_WORKER_ID", "2")
    assert distributed.tpu_env_settings() == ("10.0.0.1:8476", 4, 2)
    # Multislice (2 slices of 4 workers): slice 1's worker 2 is process 6; megascale's coordinator.
    clean_env.setenv("MEGASCALE_NUM_SLICES", "2")
    clean_env.setenv("MEGASCALE_SLICE_ID", "1")
    clean_env.setenv("MEGASCALE_COORDINATOR_ADDRESS", "10.0.9.9:8080")
    assert distributed.tpu_env_settings() == ("10.0.9.9:8476", 8, 6)


def test_initialize_from_a_faked_tpu_slice(tmp_path):
    """Two processes given what a 2-worker TPU slice's environment says (GKE's variables,
    CPU devices standing in for chips): both join one jax.distributed run of 4 devices."""
    import json
    import os
    import subprocess
    import sys
    from test_multiprocess import _free_port
    port = _free_port()
    code = ("import json, jax; from oisd_jax import distributed; i = distributed.initialize(); "
            "print(json.dumps([i.source, i.process_index, i.process_count, i.device_count, i.coordinator]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for wid in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   TPU_WORKER_HOSTNAMES="localhost,localhost", TPU_WORKER_ID=str(wid),
                   OISD_COORDINATOR_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert got == [["tpu", 0, 2, 4, f"localhost:{port}"], ["tpu", 1, 2, 4, f"localhost:{port}"]]
