"""The planner's TPU targets: deviceless compiles for v5e / v5p / v6e slices.

Needs libtpu beside jax (requirements-tpu-plan.txt); CI's requirements-test.txt leaves
it out (~590 MB), so the compile tests skip there with the install line. The target
table and slice shapes are checked everywhere.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax import plan, plan_compile, tpu_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not tpu_targets.libtpu_available(),
                                  reason="TPU targets need libtpu: pip install -r requirements-tpu-plan.txt")
# tests/test_plan.py's tiny config in bf16, with the paper configs' cuDNN attention that a
# TPU plan must swap for splash; rows of 128 tokens.
TINY = os.path.join(ROOT, "configs", "tiny.py") + (
    ":oisd,data.max_prompt_len=64,sampler.max_new_tokens=64,sampler.batch_size=16,sampler.n=4,"
    "model.dtype=bfloat16,model.attn_impl=cudnn,rl.micro_batch_tokens=4096,"
    "train.prompts_per_step=16,train.mini_batch_prompts=8")


def test_targets_and_slice_shapes():
    t = {k: plan.get_target(k) for k in ("v5e", "v5p", "v6e")}
    # The HBM libtpu's compiler reports as available, and the datasheets' bf16 / bandwidth.
    assert [round(t[k].memory_bytes / 2 ** 30, 2) for k in t] == [15.75, 95.73, 31.24]
    assert [t[k].peak_flops for k in t] == [197e12, 459e12, 918e12]
    assert [t[k].bandwidth for k in t] == [819e9, 2765e9, 1638e9]
    assert all(x.kind == "tpu" for x in t.values()) and plan.get_target("v5p:2x2x2").topology == "v5p:2x2x2"
    v5p, v6e = tpu_targets.TARGETS["v5p"], tpu_targets.TARGETS["v6e"]
    assert [tpu_targets.topology_name(v5p, n) for n in (4, 8, 16, 32, 64)] == \
        ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4"]
    assert [tpu_targets.topology_name(v6e, n) for n in (1, 4, 8, 16, 32)] == \
        ["v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8"]
    with pytest.raises(ValueError, match="power-of-two"):
        tpu_targets.topology_name(v5p, 12)
    assert not tpu_targets.is_tpu_name("h100") and tpu_targets.is_tpu_name("v5p-8")


@needs_libtpu
def test_cli_tiny_v5p_passes_with_splash_and_no_libtpu_warnings(tmp_path):
    """The user's command on a CPU-only machine: PASS, cuDNN swapped for the splash
    kernel (Mosaic calls in the compiled train step), and libtpu's start-up warnings gone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")}
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "oisd_jax.plan", "--config", TINY, "--devices", "4",
                           "--target", "v5p", "--no_suggest", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "attn=splash" in proc.stdout and "topology v5p:2x2x1" in proc.stdout
    assert "TPU_ACCELERATOR_TYPE" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
    rec = json.loads(out.read_text())
    assert rec["ok"] and rec["target"] == "TPU v5" and rec["budget"] == int(95.73 * 2 ** 30) - 2 ** 29
    tr = rec["phases"]["train step"]
    # Forward, dq and dkv kernels (a scanned body counts once in the HLO text); the
    # sampler's prefill runs the forward kernel; no cuDNN anywhere.
    assert tr["tpu_kernels"] >= 3 and rec["phases"]["sampler"]["tpu_kernels"] >= 1
    assert all(p["cudnn_attention"] == 0 for p in rec["phases"].values())
    # TPU tiles arrays in (8, 128) layouts: the tiny model's 32-wide heads and [128] norms
    # are padded, so XLA's argument bytes exceed the logical ones (equal on GPU).
    assert tr["arguments"] >= tr["params_bytes"] + tr["opt_bytes"] + tr["other_arg_bytes"]
    assert tr["temporaries"] > 0 and tr["total"] <= rec["budget"]


@needs_libtpu
def test_fail_names_the_phase_over_budget(capsys):
    """A budget between the phases' totals: FAIL, exit 1, and the train step named."""
    rc = plan.main(["--config", TINY, "--devices", "4", "--target", "v5e", "--no_suggest",
                    "--mem_fraction", str(12.3 * 2 ** 20 / tpu_targets.TARGETS["v5e"].memory_bytes),
                    "--reserve_gib", "0"])
    text = capsys.readouterr().out
    assert rc == 1
    verdict = text.strip().splitlines()[-1]
    assert verdict.startswith("FAIL") and "over budget: train step" in verdict
    assert "sampler" not in verdict and "old log-probs" not in verdict  # those fit in 12.3 MiB (measured: train step 13.2, sampler 11.4, old log-probs 7.4)


@needs_libtpu
def test_compiler_hbm_refusal_is_a_fail_not_a_crash():
    """XLA:TPU refuses a program over HBM at compile time; the planner records it as the
    phase's verdict with what the program needed (32 GiB of temporaries on a 15.75 GiB v5e)."""
    target = plan.get_target("v5e:1x1")
    mesh = jax.sharding.Mesh(np.asarray(target.devices(1)), ("x",))
    x = jax.ShapeDtypeStruct((1 << 16, 1 << 16), jnp.float32,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    c = plan_compile.compile_program("big", lambda: jax.jit(lambda a: jnp.sin(a) * 2 + a.T).lower(x), target)
    assert "CompileTimeHbmOom" in c.oom and c.temporaries == 32 * 2 ** 30
    assert c.total > target.memory_bytes


@needs_libtpu
def test_continuous_engine_plan_compiles_the_tpu_decode_kernel(tmp_path):
    """The continuous engine's TPU plan compiles the attention the engine runs there: the
    Mosaic paged-attention kernel (`sampler.paged_impl=auto` on TPU), per device under its
    shard_map on a 4-chip mesh with KV heads over `tensor`; `gather` compiles none of it. The
    kernel needs head_dim % 128 == 0, so a 3-layer HF folder with 128-wide heads (the tiny
    preset's 32-wide heads take the gather path under auto: test_continuous)."""
    from hf_fixtures import save_hf_model
    save_hf_model("qwen3", tmp_path / "m", num_hidden_layers=3, head_dim=128, num_attention_heads=4,
                  num_key_value_heads=2)
    kernels = {}
    for name, extra in (("auto", f"model.hf_path='{tmp_path / 'm'}',sampler.paged_impl=auto"),
                        ("gather", f"model.hf_path='{tmp_path / 'm'}',sampler.paged_impl=gather")):
        cfg = TINY + f",sampler.engine=continuous,sampler.slots=8,mesh.sampler_shape=(1,2,2),{extra}"
        out = tmp_path / f"{name}.json"
        assert plan.main(["--config", cfg, "--devices", "4", "--target", "v5p", "--no_suggest",
                          "--phases", "sampler", "--json", str(out)]) == 0
        rec = json.loads(out.read_text())
        assert rec["ok"], rec["phases"]
        kernels[name] = rec["phases"]["sampler"]["tpu_kernels"]
    assert kernels["auto"] > kernels["gather"], kernels
