"""The train step's SPMD partitioning on meshes with tensor > 1 (and data, fsdp > 1).

XLA's partitioner falls back to "Involuntary full rematerialization" (replicate, then
re-partition) when it cannot move an array between two shardings. The embedding lookup
did that on (data, fsdp, tensor) = (2, 2, 2): its [rows, T, D] output and cotangent were
all-gathered over every row of the micro-batch. Here the OISD step and the log-prob pass
compile on such meshes and must neither warn nor all-gather activations.

The vocabulary is large next to the activations, as in real models (Qwen3-4B's table is
~10x a [8, 2048, D] micro-batch): with the tiny preset's 64 tokens XLA rightly prefers
moving the table to moving activations, which is not the case under test.

The compiles run in a subprocess: the partitioner warns from C++ on fd 2, which pytest's
capture does not see, and a persistent compilation cache hit (conftest.py turns one on)
compiles, and so warns, nothing. A control program with the old lookup must warn, so a
silenced log cannot pass the test. `python tests/test_sharding.py worker OUT` runs it.
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "Involuntary full rematerialization"
T, D, V = 40, 128, 4096  # row length, the tiny preset's hidden size, a vocabulary 12x the activations
MARK = "=== section "
SECTIONS = ("step_2x2x2", "logprob_2x2x2", "step_1x4x2")


def _control(mesh) -> None:
    """The old lookup: a (vocab: tensor, embed: fsdp) table indexed by rows over (data, fsdp)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    def f(table, tok):
        x = jax.lax.with_sharding_constraint(table[tok], P(("data", "fsdp"), None, None))
        return jnp.sum(jnp.sin(x))
    sh = (NamedSharding(mesh, P("tensor", "fsdp")), NamedSharding(mesh, P(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        jax.jit(jax.grad(f), in_shardings=sh).lower(
            jax.ShapeDtypeStruct((64, D), jnp.float32), jax.ShapeDtypeStruct((8, T), jnp.int32)).compile()


def worker(out_dir: str) -> None:
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_compilation_cache", False)

    from oisd_jax import parallel
    from oisd_jax.model import ModelConfig
    from oisd_jax.model.params import abstract
    from oisd_jax.rl.batch import TrainBatch
    from oisd_jax.rl.step import StepConfig, make_logprob_fn, make_train_step
    from oisd_jax.rl.train_state import abstract_train_state, row_sharding

    cfg = ModelConfig.preset("tiny", vocab_size=V, remat_policy="none")
    assert cfg.hidden_size == D
    sc = StepConfig(tap_layer=2, think_weight=1.0, attn_weight=0.5, logit_chunk=16)

    def batch(mesh, M=2, R=8, Q=4, K=8):
        sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=row_sharding(mesh))  # noqa: E731
        i32, f32 = jnp.int32, jnp.float32
        return TrainBatch(tokens=sds((M, R, T), i32), positions=sds((M, R, T), i32),
                          segment_ids=sds((M, R, T), i32), loss_mask=sds((M, R, T), f32),
                          advantages=sds((M, R, T), f32), old_logp=sds((M, R, T), f32),
                          attn_queries=sds((M, R, Q), i32), attn_keys=sds((M, R, Q, K), i32),
                          attn_weight=sds((M, R, Q), f32), attn_valid=sds((M, R, Q), f32))

    def section(name: str, compile_fn) -> None:
        print(MARK + name, file=sys.stderr, flush=True)
        with open(os.path.join(out_dir, name + ".hlo"), "w") as f:
            f.write(compile_fn().as_text())

    m222, m142 = parallel.make_mesh((2, 2, 2)), parallel.make_mesh((1, 4, 2))
    print(MARK + "control", file=sys.stderr, flush=True)
    _control(m222)
    section("step_2x2x2", lambda: make_train_step(cfg, sc, m222).lower(
        abstract_train_state(cfg, sc, m222), batch(m222)).compile())
    section("logprob_2x2x2", lambda: make_logprob_fn(cfg, sc, m222).lower(
        abstract(cfg, m222), batch(m222)).compile())
    section("step_1x4x2", lambda: make_train_step(cfg, sc, m142).lower(
        abstract_train_state(cfg, sc, m142), batch(m142)).compile())
    print(MARK + "end", file=sys.stderr, flush=True)


def _sections(stderr: str) -> dict[str, str]:
    parts = re.split("^" + MARK + r"(\S+)$", stderr, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def activation_gathers(hlo: str) -> list[str]:
    """All-gathers and permutes of float [r, T, ...] activations in compiled HLO. (The
    designed lookup moves them only by an all-to-all and sums over "tensor".)"""
    pat = re.compile(rf"= (f32|bf16)\[\d+,{T}(,\d+)+\]\S* (all-gather|collective-permute)(-start)?\(")
    return [line.strip()[:200] for line in hlo.splitlines() if pat.search(line)]


def test_tensor_parallel_step_partitions_without_rematerialization(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = _sections(proc.stderr)
    assert "end" in logs, proc.stderr[-4000:]
    assert WARNING in logs["control"], "the control program's partitioner warning was not captured"
    for name in SECTIONS:
        assert WARNING not in logs[name], f"{name}:\n{logs[name][-3000:]}"
        hlo = (tmp_path / (name + ".hlo")).read_text()
        assert not activation_gathers(hlo), f"{name}: {activation_gathers(hlo)}"


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
