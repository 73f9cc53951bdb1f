"""The planner's model of the continuous rollout engine (oisd_jax.plan_continuous).

The tiny config of tests/test_plan.py with engine='continuous'; pages of 64 tokens and 2
slots keep the compiled program to a few branches (one compile per test that needs one).
Byte counts are closed forms of the tiny model's shapes; times are hand-computed.
"""
import json
import os

import pytest

from oisd_jax import gpu_targets, plan, plan_compile
from oisd_jax import plan_continuous as pc
from oisd_jax import plan_programs as pp
from oisd_jax.config_files import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py") + (
    ":oisd,data.max_prompt_len=64,sampler.max_new_tokens=16,sampler.batch_size=16,sampler.n=4,"
    "sampler.kv_dtype=float32,model.dtype=float32,model.remat_policy=none,rl.micro_batch_tokens=1280,"
    "train.prompts_per_step=16,train.mini_batch_prompts=8,sampler.engine=continuous,sampler.slots=2,"
    "sampler.page_size=64")
L, KV, Dh = 4, 2, 32  # tiny Qwen3


def _setup(arg: str = ""):
    return pp.make_setup(load_config_file(TINY + arg), plan.get_target("cpu").devices(8), micro_batch_tokens=1280)


def test_pool_is_a_temporary_split_over_tensor_and_not_beside_the_updates():
    s = _setup(",mesh.sampler_shape=(1,4,2)")
    assert s.engine == "continuous" and pc.kv_shards(s) == 2
    # Sampler.check_pool's default: 16 prompts x 1 page of 64 + 2 slots x 2 pages (a
    # rollout's 15 fed tokens cross one page boundary from a prompt near 64 tokens).
    assert pc.default_pool_pages(s) == 16 + 2 * 2
    ph = pp.sampler_phase(s)
    pool_dev = L * 2 * (KV // 2) * (20 + 1) * 64 * Dh * 4  # f32 entries, trash page, heads over tensor=2
    assert ph.kv_in_temporaries and ph.kv_bytes == pool_dev
    lowered = ph.lower()
    compiled = lowered.compile()
    # The per-device pool shape in the compiled program: half the KV heads, replicated over fsdp.
    assert f"f32[{KV // 2},21,64,{Dh}]" in compiled.as_text()
    m = compiled.memory_analysis()
    assert m.temp_size_in_bytes >= pool_dev
    assert ph.decode_params_bytes <= m.argument_size_in_bytes < ph.decode_params_bytes + pool_dev
    # Nothing of the engine stays allocated through the updates.
    assert pp.sampler_cache_bytes(s) == 0
    assert pp.train_phase(s).resident_bytes == 0 and pp.logprob_phase(s).kv_bytes == 0


def test_planned_pool_follows_the_mean_response():
    s = _setup(",sampler.page_size=4")
    # 16 prompts x 16 pages of 4 tokens; per slot 1.5 x mean 8 = 12 tokens = 3 pages, + 1 copied.
    assert pc.planned_pool_pages(s, slots=16, mean_response=8) == 256 + 16 * 4
    # Never below one rollout at the full budget: 15 fed tokens from position 64 = 4 pages.
    assert pc.planned_pool_pages(s, slots=1, mean_response=1) == 256 + 4
    assert pc.default_mean_response(8192) == 1536 and pc.default_mean_response(3072) == 576


def test_engine_time_closed_form():
    s = _setup().replace(slots=16)
    ph = pp.Phase("sampler", lambda: None, decode_params_bytes=10 ** 9)
    t = pc.engine_time(s, ph, bandwidth=2e12, peak_flops=1e12, mean_prompt=16, mean_response=4)
    # 16 prompts x 4 = 64 requests in one call over 16 slots: the queue's (64 - 16) x 4 / 16
    # = 12 full steps, then the last wave's longest rollout at the 16-token budget.
    assert (t.calls, t.steps_per_call) == (1, 12 + 16)
    kv_tok = L * 2 * KV * Dh * 4  # f32 K and V of one token, every layer; no tensor split
    # Contexts read: 64 x (4 tokens x 16 prompt + (1 + cv^2) x 4^2 / 2 = 16).
    assert t.kv_read_bytes == pytest.approx(64 * (4 * 16 + 16) * kv_tok)
    assert t.hbm_s == pytest.approx((28 * 1e9 + 64 * 80 * kv_tok) / 2e12)
    n, m = s.matmul_params, s.model
    attn = 4 * L * m.num_heads * Dh * (16 + 2) * 256
    assert t.flop_s == pytest.approx((2 * n * 256 + attn) / 1e12)  # 64 x 4 generated tokens
    # Two calls of 8 prompts: 32 requests each, (32 - 16) x 4 / 16 + 16 steps.
    t2 = pc.engine_time(s.replace(sampler_batch=8), ph, 2e12, 1e12, 16, 4)
    assert (t2.calls, t2.steps_per_call) == (2, 4 + 16)
    assert t2.gather_hbm_s > t2.hbm_s  # the gather path reads every slot's table to the full width


def test_cli_continuous_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan.main(["--config", TINY, "--devices", "8", "--target", "cpu", "--no_suggest", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "PASS" in text and "continuous: 2 slots" in text and "KV pool (in temps)" in text
    rec = json.loads(out.read_text())
    assert rec["setup"]["engine"] == "continuous" and rec["setup"]["pool_pages"] == 20
    # Default mean response: the paper's 1536 / 8192 of the 16-token budget; FLOPs at it.
    assert rec["setup"]["mean_response"] == 3
    assert rec["flops"]["tokens"] == 16 * 4 * (16 + 3)
    sp = rec["phases"]["sampler"]
    assert sp["temporaries"] >= sp["kv_bytes"] and rec["phases"]["train step"]["resident_bytes"] == 0


def test_largest_slots_that_fit(monkeypatch, capsys):
    """The slot search's wiring: multiples of 8 slots, each probe's pool sized to the mean
    response, capped at the call's requests. Compiles are faked by a program whose total is
    its pool plus 1 MiB (the real compile is covered above)."""
    from oisd_jax import plan_search
    seen = []

    def fake_compile(name, lower, target):
        return plan_compile.Compiled(name, 0, 0, 0, 2 ** 20, None, 0.0, [])

    real_phase = plan_search.sampler_phase

    def phase(setup):
        ph = real_phase(setup)
        seen.append((setup.slots, setup.pool_pages))
        ph.resident_bytes = ph.kv_bytes  # stands for the pool in the fake program's total
        return ph

    monkeypatch.setattr(plan_search, "compile_program", fake_compile)
    monkeypatch.setattr(plan_search, "sampler_phase", phase)
    s = _setup(",sampler.page_size=4")
    pool = lambda k: pp.sampler_phase(s.replace(slots=k, pool_pages=pc.planned_pool_pages(s, k, 3))).kv_bytes
    budget = plan_compile.Budget(pool(40) + 2 ** 20, 1.0, 0)
    got = plan_search.suggest_slots(s.replace(slots=8), plan.get_target("cpu"), budget, mean_response=3)
    assert got == dict(slots=40, pool_pages=pc.planned_pool_pages(s, 40, 3))
    probes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("search    sampler at ")]
    assert len(probes) == len(seen) and any(ln.startswith("search    sampler at 40 slots: ") and ", fits" in ln
                                            for ln in probes) and any(", over" in ln for ln in probes), probes
    assert all(k % 8 == 0 and p == pc.planned_pool_pages(s, k, 3) for k, p in seen)
    # The plan's own sampler phase (8 slots, its pool sized to the mean) is not compiled again.
    seen.clear()
    s8 = s.replace(slots=8, pool_pages=pc.planned_pool_pages(s, 8, 3))
    again = plan_search.suggest_slots(s8, plan.get_target("cpu"), budget, mean_response=3, measured=pool(8) + 2 ** 20)
    assert again == got and 8 not in [k for k, _ in seen] and seen, seen
    # More slots than the call's 64 requests never run: the search stops at 64.
    big = plan_compile.Budget(pool(64) * 10, 1.0, 0)
    assert plan_search.suggest_slots(s, plan.get_target("cpu"), big, mean_response=3)["slots"] == 64


def test_a_sampler_only_plan_searches_slots_only(monkeypatch, capsys):
    """`--phases=sampler` with the search on: only slots are probed (a train-step probe of
    Qwen3-4B on TPU is a 4-10 min compile here the user asked to skip), and the plan's own
    sampler phase is the first probe. Compiles are faked as in the test above."""
    from oisd_jax import plan_search
    compiled = []

    def fake_compile(name, lower, target):
        compiled.append(name)
        return plan_compile.Compiled(name, 0, 0, 0, 2 ** 20, None, 0.0, [])

    monkeypatch.setattr(plan_search, "compile_program", fake_compile)
    monkeypatch.setattr(plan_search, "train_phase", lambda s: pytest.fail("train step probed"))
    s = _setup(",sampler.page_size=4")
    s = s.replace(slots=8, pool_pages=pc.planned_pool_pages(s, 8, 3))
    own = plan_compile.PhaseResult(pp.sampler_phase(s), fake_compile("sampler", None, None))
    got = plan_search.suggest(s, plan.get_target("cpu"), plan_compile.Budget(2 ** 40, 1.0, 0), [own], mean_response=3)
    assert set(got) == {"slots", "pool_pages"} and got["slots"] == 64, got  # capped at the 64 requests
    assert "sampler 8 slots" not in compiled and compiled[1:], compiled
    out = capsys.readouterr().out
    assert "train step at" not in out and "sampler at 64 slots" in out


@pytest.mark.skipif(not gpu_targets.plugin_available(), reason="pip install -r requirements-gpu-plan.txt")
def test_gpu_plan_compiles_the_triton_kernel():
    """An H100 plan of the engine compiles what a GPU run takes with paged_impl=auto: jax's
    Pallas (Triton) paged-attention kernel, per device under a 2-way tensor mesh, lowered to
    XLA:GPU's Triton custom call and compiled deviceless."""
    setup = pp.make_setup(load_config_file(TINY + ",model.dtype=bfloat16,sampler.kv_dtype=bfloat16,"
                                           "mesh.sampler_shape=(1,1,2)"),
                          plan.get_target("h100").devices(2), micro_batch_tokens=1280)
    assert pc.planned_paged_impl(setup) == "pallas_gpu"
    phase = pc.continuous_phase(setup)
    lowered = phase.lower()
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text and ("shard_map" in text or "manual" in text.lower())
    mem = lowered.compile().memory_analysis()
    assert mem.temp_size_in_bytes >= phase.kv_bytes  # the pool is one of the program's temporaries


def test_plan_refuses_a_pool_the_tensor_axis_cannot_split():
    """tensor=8 over the tiny model's 2 KV heads: the planner says so before compiling any
    phase (as the trainer's Sampler would), naming the shape that splits the pool."""
    with pytest.raises(ValueError, match=r"does not divide the model's 2 KV heads.*sampler_shape=\(1, 4, 2\)"):
        plan.main(["--config", TINY + ",mesh.sampler_shape=(1,1,8)", "--devices", "8", "--target", "cpu",
                   "--no_suggest"])
