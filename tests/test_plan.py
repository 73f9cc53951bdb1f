"""The memory planner: real programs of the tiny config compiled from abstract inputs.

CPU target always; the deviceless GPU target where jax-cuda12-pjrt/plugin are installed
(requirements-gpu-plan.txt; CI installs them). Byte counts are checked against closed
forms of the tiny model's shapes and shardings, not against the planner's own sums.
"""
import dataclasses
import json
import os

import pytest

from oisd_jax import gpu_targets, plan, plan_compile, plan_search, startup
from oisd_jax import plan_programs as pp
from oisd_jax.config_files import load_config_file
from oisd_jax.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config with this file's own batch shapes pinned (so config tweaks elsewhere
# do not move the closed forms below); apply_arg syntax 'file.py:key=value,...'.
TINY = os.path.join(ROOT, "configs", "tiny.py") + (
    ":oisd,data.max_prompt_len=64,sampler.max_new_tokens=16,sampler.batch_size=16,sampler.n=4,"
    "sampler.kv_dtype=float32,model.dtype=float32,model.remat_policy=none,rl.micro_batch_tokens=1280,"
    "train.prompts_per_step=16,train.mini_batch_prompts=8")
needs_plugin = pytest.mark.skipif(not gpu_targets.plugin_available(),
                                  reason="pip install -r requirements-gpu-plan.txt")


def tiny_param_bytes_per_device(fsdp: int) -> int:
    """Tiny Qwen3 (V=64, D=128, F=384, L=4, H=4, KV=2, Dh=32, tied) in f32, every matrix
    split over fsdp on its D axis, norms replicated."""
    V, D, F, L, H, KV, Dh = 64, 128, 384, 4, 4, 2, 32
    split = V * D + L * (D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 3 * D * F)
    replicated = L * (2 * D + 2 * Dh) + D
    return 4 * (split // fsdp + replicated)


def test_gpu_target_files():
    assert set(gpu_targets.names()) == {"a100_80gb", "h100_80gb", "h200"}
    mib = {"a100": 81920, "h100": 81559, "h200": 143771}  # what nvidia-smi reports
    for alias, cc in (("a100", (8, 0)), ("h100", (9, 0)), ("h200", (9, 0))):
        t = gpu_targets.load(alias)
        assert t.memory_bytes == mib[alias] * 2 ** 20
        assert t.compute_capability == cc and t.peak_bf16_flops > 0 and "platform_name: \"CUDA\"" in t.text
    with pytest.raises(ValueError, match="unknown GPU target"):
        gpu_targets.load("v100")


def test_suggest_linear_finds_largest_fit():
    calls = []

    def measure(k):  # slightly convex, like temporaries that grow with fragmentation
        calls.append(k)
        return 1000 + 300 * k + 2 * k * k

    for limit in (1200, 1302, 5000, 40000):
        calls.clear()
        k, seen = plan_search.suggest_linear(measure, limit, 1)
        want = max([j for j in range(1, 500) if 1000 + 300 * j + 2 * j * j <= limit] or [0])
        assert k == want, (limit, k, want)
        assert len(calls) <= 7  # each call is a compile
        # A start the plan already compiled is reused: the same answer, that probe not remade.
        calls.clear()
        k2, _ = plan_search.suggest_linear(measure, limit, 4, known={4: measure(4)})
        assert k2 == want and calls.count(4) == 1, (limit, k2, calls)


def test_capture_stderr_reads_native_writes():
    with startup.CaptureFd2() as cap:
        os.write(2, b"W xla: Can't reduce memory use below 12.5GiB (13421772800 bytes) by rematerialization\n")
    assert plan_compile.REMAT_WARNING in cap.text


def test_budget_and_verdict():
    b = plan.Budget(device_bytes=80 * plan.GiB, mem_fraction=0.9, reserve_bytes=2 * plan.GiB)
    assert b.bytes == int(72 * plan.GiB) - 2 * plan.GiB
    c = plan_compile.Compiled("x", arguments=10, outputs=4, aliased=3, temporaries=20, xla_peak=None, compile_s=0, warnings=[])
    assert c.total == 31
    assert plan_compile.Compiled("x", 10, 4, 3, 20, 40, 0, []).total == 40  # XLA's GPU peak wins when larger


def _setup(target, **kw):
    c = load_config_file(TINY)
    return pp.make_setup(c, target.devices(8), micro_batch_tokens=2 * 8 * 80, **kw)


def _check_phases(phases: dict, setup):
    """phases: name -> {params_bytes, opt_bytes, other_arg_bytes, resident_bytes, arguments, ...}."""
    tr, lp = phases["train step"], phases["old log-probs"]
    params = tiny_param_bytes_per_device(8)
    assert tr["params_bytes"] == params and lp["params_bytes"] == params
    # AdamW's mu and nu shaped like the params, plus its step counter(s).
    assert 0 <= tr["opt_bytes"] - 2 * params <= 16
    M, R, T = setup.num_micro, setup.rows_per_micro, setup.row_len
    assert R == 16 and T == 80
    # XLA's own argument size == state + batch as we shard them, exactly.
    assert tr["arguments"] == tr["params_bytes"] + tr["opt_bytes"] + tr["other_arg_bytes"]
    assert tr["aliased"] >= 3 * params  # the donated state is updated in place
    assert tr["temporaries"] > 0
    # The log-prob pass reads params + 4 [M, R, T] 4-byte arrays (rows over 8 devices);
    # the moments stay resident beside it.
    assert lp["arguments"] == params + 4 * 4 * M * (R // 8) * T
    assert lp["resident_bytes"] >= 2 * params
    if "sampler" in phases:
        sp = phases["sampler"]
        # Decode layout: no FSDP, tensor=1 -> every device holds all params (tiny computes in f32).
        assert sp["decode_params_bytes"] == tiny_param_bytes_per_device(1)
        # Shared-prompt cache, f32: L x {k, v} x ([B, KV, P, Dh] + [B*n, KV, N-1, Dh]), rows over 8.
        B, n, P, N, L, KV, Dh = 16, 4, 64, 16, 4, 2, 32
        assert sp["kv_bytes"] == L * 2 * 4 * (B // 8 * KV * P * Dh + B * n // 8 * KV * (N - 1) * Dh)
        assert sp["arguments"] >= sp["decode_params_bytes"] + sp["kv_bytes"]
        assert sp["resident_bytes"] == tr["params_bytes"] + tr["opt_bytes"] + 8  # + step, skipped


def test_step_flops_closed_form():
    setup = _setup(plan.get_target("cpu"))
    fl = plan.step_flops(setup, mean_prompt=16, response_frac=1.0)
    n, m = setup.matmul_params, setup.model
    assert n == tiny_param_bytes_per_device(1) // 4  # tied: the embedding counts once, as W_U
    tokens = 16 * 4 * (16 + 16)  # prompts x rollouts x (prompt + response)
    assert fl["tokens"] == tokens
    # remat none; OISD's lens head 2 D V per token, x4 (forward, backward, recompute).
    fwd = 2 * n * tokens + 4 * m.num_layers * m.num_heads * m.head_dim * (32 + 1) / 2 * tokens
    assert fl["train"] == pytest.approx(3 * fwd + 4 * 2 * m.hidden_size * m.vocab_size * tokens)
    # 16 prompts / 8 per mini-batch, one pass: the first mini-batch is on-policy, no pass
    assert fl["old_logprob"] == pytest.approx(fwd / 2)


def test_step_flops_and_schedule_count_every_ppo_epoch():
    """rl.ppo_epochs=3: three passes of updates (FLOPs, cosine length), one old-log-prob
    pass (of every mini-batch: the first too, seen again after updates) and one sampling
    per step."""
    devices = plan.get_target("cpu").devices(8)
    one, three = (pp.make_setup(load_config_file(TINY + f",rl.ppo_epochs={e}"), devices, micro_batch_tokens=1280)
                  for e in (1, 3))
    f1, f3 = (plan.step_flops(s, mean_prompt=16, response_frac=1.0) for s in (one, three))
    assert f3["train"] == pytest.approx(3 * f1["train"])
    assert (f3["sample"], f3["tokens"]) == (f1["sample"], f1["tokens"])
    assert f3["old_logprob"] == pytest.approx(2 * f1["old_logprob"])  # 2 mini-batches, 1 on-policy at E=1
    assert three.step_cfg.decay_steps == 3 * one.step_cfg.decay_steps


@pytest.mark.parametrize("name,gpus", [("qwen3_4b", 4), ("qwen3_8b", 8), ("octothinker_3b", 4),
                                       ("octothinker_8b", 8), ("qwen3_8b:rl.micro_batch_tokens=221184", 8)])
def test_planner_packs_like_the_trainer(name, gpus):
    """Each paper config on the GPUs it is sized for: the planner's micro-batch shape
    [M, R, T] and probe slots are those of the batch the trainer packs from a mini-batch
    of full-length rollouts (the planner's worst case). 24 rows per micro-batch: the
    trainer runs 16 (a power of two) micro-batches, which the planner once counted as 11."""
    import jax
    import numpy as np
    from oisd_jax import parallel
    from oisd_jax.config import algorithm_settings
    from oisd_jax.run_spec import step_config
    from oisd_jax.rollout import Rollouts
    from oisd_jax.train_setup import Setup, make_minibatches
    file, _, arg = name.partition(":")
    c = load_config_file(os.path.join(ROOT, "configs", f"{file}.py") + (f":{arg}" if arg else ""))
    setup = pp.make_setup(c, plan.get_target("cpu").devices(gpus))
    s = Setup(config=c, algo=algorithm_settings(c), tokenizer=None, model_cfg=None,
              mesh=parallel.make_mesh(tuple(c.mesh.shape), jax.devices()[:gpus]), step_cfg=step_config(c), step_fns={},
              logprob_fns={}, sampler=None, sampling=None, records=[], eval_sets={}, peak_flops=float("nan"))
    P, N, n = int(c.data.max_prompt_len), int(c.sampler.max_new_tokens), int(c.sampler.n)
    prompts = int(c.train.mini_batch_prompts)
    responses = [np.ones(N, np.int32)] * (prompts * n)
    ro = Rollouts([np.ones(P, np.int32)] * prompts, responses, responses, [""] * len(responses), n=n)
    (batch,) = make_minibatches(s, ro, np.ones(len(responses), np.float32), 0)
    assert batch.tokens.shape == (setup.num_micro, setup.rows_per_micro, setup.row_len)
    assert batch.attn_queries.shape[-1] == setup.probes_per_row
    if arg:
        assert batch.tokens.shape[:2] == (16, 24)


def test_cli_cpu_target(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan.main(["--config", TINY, "--devices", "8", "--target", "cpu", "--no_suggest",
                    "--micro_batch_tokens", "1280", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "PASS" in text and "INDICATIVE ONLY" in text and "MiB per device" in text
    rec = json.loads(out.read_text())
    assert rec["ok"] and all(p["total"] <= rec["budget"] for p in rec["phases"].values())
    assert set(rec["phases"]) == {"train step", "old log-probs", "sampler"}
    _check_phases(rec["phases"], _setup(plan.get_target("cpu")))


@needs_plugin
def test_plan_tiny_gpu_target_deviceless():
    target = plan.get_target("h100")
    assert target.kind == "gpu" and "H100" in target.name
    setup = _setup(target, model_overrides=dict(dtype="bfloat16", attn_impl="cudnn"))
    assert all(d.platform == "gpu" for d in setup.mesh.devices.flat)
    results = plan.run_phases(setup, target, only=("train step", "old log-probs"))
    _check_phases({r.phase.name: {**plan._phase_bytes(r.phase), **vars(r.compiled)} for r in results}, setup)
    for r in results:
        assert r.compiled.xla_peak is not None and r.compiled.xla_peak >= r.compiled.arguments
        assert r.compiled.cudnn_attention > 0  # cuDNN flash attention compiled without a GPU


@needs_plugin
def test_cli_gpu_target_without_jax_platforms(tmp_path):
    """The user's command on a CPU-only machine, where nothing sets JAX_PLATFORMS: the CUDA
    plugin must not be initialised as a backend (it would fail without CUDA libraries)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cfg = TINY.replace("model.dtype=float32", "model.dtype=bfloat16") + ",model.attn_impl=cudnn"
    proc = subprocess.run([sys.executable, "-m", "oisd_jax.plan", "--config", cfg, "--devices", "8", "--target",
                           "h100", "--no_suggest", "--json", str(tmp_path / "plan.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "plan.json").read_text())
    assert rec["ok"] and "H100" in proc.stdout


def test_sampling_seconds_closed_form():
    setup = _setup(plan.get_target("cpu"))  # 16 new tokens: T = 15 generated slots
    ph = pp.Phase("sampler", lambda: None, decode_params_bytes=3 * 10 ** 9, kv_bytes=8 * 10 ** 9,
                  kv_prompt_bytes=2 * 10 ** 9)
    # 16 prompts per step / 16 per call = 1 call; one segment: 16 decode steps each read
    # 3 GB weights + the 2 GB prompt part + the whole 6 GB generated part.
    assert plan.sampling_seconds(setup, ph, bandwidth=2e12) == pytest.approx(16 * 11e9 / 2e12)
    assert plan.sampling_seconds(setup.replace(sampler_batch=8), ph, 2e12) == pytest.approx(2 * 16 * 11e9 / 2e12)
    # S = 3 segments of 5 slots read 5, 10, 15 of 15: (S+1)/2S = 2/3 of the generated part.
    ph3 = dataclasses.replace(ph, decode_segments=3)
    assert plan.sampling_seconds(setup, ph3, 2e12) == pytest.approx(16 * (5e9 + 2 / 3 * 6e9) / 2e12)
    # Responses of half the budget: 8 steps, 5 in the first segment and 3 in the second.
    frac = (5 * 5 + 3 * 10) / (8 * 15)
    assert plan.sampling_seconds(setup, ph3, 2e12, response_frac=0.5) == pytest.approx(8 * (5e9 + frac * 6e9) / 2e12)
    # The planner's sampler phase carries the Sampler's S and the prompt part's bytes.
    sph = pp.sampler_phase(setup)
    assert sph.decode_segments == Sampler(setup.model, 64, 16).decode_segments == 1
    assert 0 < sph.kv_prompt_bytes < sph.kv_bytes
    # ... and sampler.decode_segments from the config, in the cache it lowers with.
    s3 = pp.make_setup(load_config_file(TINY + ",sampler.decode_segments=3"), plan.get_target("cpu").devices(8),
                       micro_batch_tokens=2 * 8 * 80)
    assert pp.sampler_phase(s3).decode_segments == pp.abstract_sampler_inputs(s3)["cache"].segments == 3
