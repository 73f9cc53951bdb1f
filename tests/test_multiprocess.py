"""Two real processes on localhost with jax.distributed (CPU collectives, gloo), 4 fake
devices each, run the tiny config's train step on a (2, 2, 2) mesh spanning both, feed
their own rows of the batch, save and restore an orbax checkpoint together, and must
match the same steps run by this single process over its 8 devices.

This file is also the worker: `python tests/test_multiprocess.py worker ID PORT OUT`.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py") + ":oisd"  # the OISD step, whatever tiny defaults to
STEPS = 3


def synthetic_batch(rng_seed: int = 0):
    """A fixed packed batch (host NumPy): 2 micro-batches x 8 rows x 80 tokens, OISD probes."""
    from oisd_jax.rl.batch import build_train_batch
    r = np.random.default_rng(rng_seed)
    n = 20
    prompts = [r.integers(1, 64, r.integers(4, 12)) for _ in range(n)]
    responses = [r.integers(1, 64, 30) for _ in range(n)]
    lengths = r.integers(3, 30, n)
    adv = r.normal(size=n)
    return build_train_batch(prompts, responses, lengths, adv, row_len=80, rows_per_micro=8, num_micro=2,
                             attn_steps=4, attn_window=8, attn_stride=8, max_seqs_per_row=4, rng=1)


def run_steps(ckpt_dir: str | None = None) -> dict:
    """STEPS updates of the tiny OISD config on a (data, fsdp, tensor) = (2, 2, 2) mesh.

    Each process builds only its rows of the batch and only its shards of the params.
    Returns host copies (on every process) of the per-step metrics and the final params.
    """
    import jax

    from oisd_jax import distributed, parallel
    from oisd_jax.config_files import load_config_file
    from oisd_jax.model import ModelConfig, init_params
    from oisd_jax.rl.step import StepConfig, batch_shardings, init_train_state, make_logprob_fn, make_train_step

    config = load_config_file(TINY)
    m = config.model
    cfg = ModelConfig.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy,
                             attn_impl=m.attn_impl)
    step_cfg = StepConfig.from_config(config)
    assert step_cfg.think_weight > 0 and step_cfg.attn_weight > 0  # the OISD step, not plain GRPO
    mesh = parallel.make_mesh((2, 2, 2))
    params = init_params(cfg, jax.random.key(0), mesh=mesh, std=0.1)
    state = init_train_state(params, step_cfg, mesh, cfg)

    batch = synthetic_batch()
    rows = distributed.process_rows(batch.tokens.shape[1])
    local = jax.tree.map(lambda x: None if x is None else x[:, rows], batch)
    gb = distributed.make_global(local, batch_shardings(mesh), axis=1)
    gb = gb.replace(old_logp=make_logprob_fn(cfg, step_cfg, mesh)(state.params, gb))

    step = make_train_step(cfg, step_cfg, mesh)
    history = []
    for _ in range(STEPS):
        state, metrics = step(state, gb)
        history.append({k: float(v) for k, v in distributed.to_host(metrics).items()})
    out = {"metrics": history, "params": distributed.to_host(state.params)}

    if ckpt_dir is not None:
        from oisd_jax.checkpoint import Checkpointer
        from oisd_jax.rl.step import abstract_train_state
        with Checkpointer(ckpt_dir, max_to_keep=1) as ck:
            ck.save(STEPS, state, data_state={"process_count": jax.process_count()})
            ck.wait_until_finished()
            distributed.sync("saved")
            restored = ck.restore(STEPS, abstract_train_state(cfg, step_cfg, mesh))
        out["restored"] = distributed.to_host(restored.state.params)
        out["restored_sharding_ok"] = all(
            a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)))
    return out


def _flat(params) -> dict[str, np.ndarray]:
    import jax
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def worker(pid: int, port: int, out_dir: str) -> None:
    from oisd_jax import distributed
    info = distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import jax
    res = run_steps(os.path.join(out_dir, "ckpt"))
    with open(os.path.join(out_dir, f"info{pid}.json"), "w") as f:
        json.dump({"source": info.source, "process_index": jax.process_index(), "process_count": jax.process_count(),
                   "local": jax.local_device_count(), "global": jax.device_count(),
                   "restored_sharding_ok": res["restored_sharding_ok"]}, f)

    @distributed.main_only
    def write():
        np.savez(os.path.join(out_dir, "result.npz"), metrics=json.dumps(res["metrics"]),
                 **{"p" + k: v for k, v in _flat(res["params"]).items()},
                 **{"r" + k: v for k, v in _flat(res["restored"]).items()})
    write()
    distributed.sync("done")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(i), str(port), str(tmp_path)],
                              cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        # The single-process reference runs here (8 devices) while the workers compile.
        want = run_steps()
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        logs[i].seek(0)
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i].read()[-4000:]}"
    for i in range(2):
        info = json.loads((tmp_path / f"info{i}.json").read_text())
        assert info == {"source": "explicit", "process_index": i, "process_count": 2, "local": 4, "global": 8,
                        "restored_sharding_ok": True}
    got = np.load(tmp_path / "result.npz")
    got_metrics = json.loads(str(got["metrics"]))
    assert len(got_metrics) == STEPS
    for g, w in zip(got_metrics, want["metrics"]):
        assert g["update_skipped"] == 0 and w["update_skipped"] == 0
        for k in ("loss", "grad_norm", "tokens", "packed_tokens"):
            np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert got_metrics[0]["loss"] != got_metrics[-1]["loss"]  # the updates did something
    for k, v in _flat(want["params"]).items():
        np.testing.assert_allclose(got["p" + k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(got["r" + k], got["p" + k])  # orbax round trip, exact


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
