"""Will it fit? Per-device memory and FLOPs of a config's real programs, before any queue.

    python -m oisd_jax.plan --config=configs/qwen3_4b.py --devices=4 --target=h100

lowers and compiles the project's train step, old-log-prob pass and sampler with
`jax.ShapeDtypeStruct` inputs that carry the real shardings (nothing is allocated), then
prints per device: params, optimizer state, KV cache, XLA's temporaries and peak, the
phase total against the budget, PASS/FAIL (the exit code), and the largest micro-batch
token budget and sampler batch that fit. `--sweep` adds how temporaries move with
micro-batch tokens, remat policy and loss chunking.

Targets: `h100`, `a100`, `h200` (or a GpuTargetConfig .txtpb) compile *deviceless* for
that GPU on a CPU-only machine (requirements-gpu-plan.txt): XLA's real GPU buffer
assignment, cuDNN attention included. `v5e`, `v5p`, `v6e` (or a topology such as
`v5p:2x2x2`) compile deviceless for a TPU slice of `--devices` chips
(requirements-tpu-plan.txt): the TPU compiler's buffer assignment and its own HBM check,
with `attn_impl=cudnn` planned as `splash` (the TPU flash kernel). `cpu` compiles for fake CPU devices; its numbers
are indicative only (XLA:CPU upcasts bf16 matmuls, 1.1-3.8x the GPU temporaries here, and
its peak ignores temporaries).

With `sampler.engine=continuous` (or `--engine=continuous`) the sampler phase is the
continuous engine's program (`plan_continuous`): its KV pool is a temporary of that program
(nothing beside the updates), the search finds the largest `sampler.slots` whose pool, sized
to `--mean_response`, fits, and the sampling time is the engine's at that mean response
(the static engine's runs every call to the budget).

The budget is XLA's pool (`--mem_fraction` of device memory: the launchers set
XLA_PYTHON_CLIENT_MEM_FRACTION to it; JAX's default is 0.75) minus `--reserve_gib` for
what memory_analysis does not see (cuDNN/cuBLAS workspaces, fragmentation). The CUDA
context and NCCL buffers live outside the pool, in the remaining fraction. On TPU the
runtime hands XLA all of the HBM the compiler reports (no pool fraction: defaults 1.0 and
a 0.5 GiB reserve for fragmentation between programs).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Sequence

import jax

from oisd_jax import parallel
from oisd_jax.plan_compile import GiB, Budget, PhaseResult, Target, compile_program, get_target
from oisd_jax.plan_programs import Phase, PlanSetup, build_phases, make_setup, sampler_cache_bytes
from oisd_jax.rl.batch import on_policy_updates


# ----------------------------------------------------------------------------- phases
def run_phases(setup: PlanSetup, target: Target, only: Sequence[str] | None = None) -> list[PhaseResult]:
    out = []
    for ph in build_phases(setup):
        if only and ph.name not in only:
            continue
        out.append(PhaseResult(ph, compile_program(ph.name, ph.lower, target)))
    return out


# ----------------------------------------------------------------------------- FLOPs
def step_flops(setup: PlanSetup, mean_prompt: float, response_frac: float) -> dict[str, float]:
    """Analytic FLOPs of one RL step (cost_analysis counts a scanned body once).

    Training: (3 + remat) x forward (6 N tokens + attention when remat = 0) over every
    rollout token, rl.ppo_epochs times, plus OISD's lens head (2 D V per token forward, x3 with its backward,
    +1 recomputed) and OPSD's teacher forward (no backward); the old-log-prob pass (and
    with rl.kl_coef the reference's): one forward. Sampling: 2 N per token (prefill +
    decode) plus attention over the growing context.
    """
    from oisd_jax.metrics import forward_flops
    m, spec = setup.model, setup.spec
    n = float(setup.matmul_params)
    attn_dim = m.num_heads * m.head_dim
    seq = mean_prompt + response_frac * setup.max_new_tokens
    tokens = spec.train.prompts_per_step * spec.sampler.sampling.n * seq  # the step's rollout tokens
    fwd = forward_flops(n, tokens, num_layers=m.num_layers, attn_dim=attn_dim, context_len=seq)
    remat = {"none": 0.0, "everything_saveable": 0.0}.get(m.remat_policy, 1.0)
    lens = 2.0 * m.hidden_size * m.vocab_size * tokens if setup.step_cfg.think_weight > 0 else 0.0
    # OPSD: the teacher's forward over its own rows (teacher prompt budget + the response) in
    # every update, no backward; its head only at the response tokens (2 D V each).
    teacher = 0.0
    if setup.teacher_row_len is not None:
        t_seq = setup.teacher_row_len - setup.max_new_tokens + response_frac * setup.max_new_tokens
        t_tokens = tokens / seq * t_seq
        resp = tokens / seq * response_frac * setup.max_new_tokens
        teacher = (forward_flops(n, t_tokens, num_layers=m.num_layers, attn_dim=attn_dim, context_len=t_seq)
                   - 2.0 * m.hidden_size * m.vocab_size * (t_tokens - resp))
        if setup.step_cfg.steer_on:  # OGLS-SD: the steering pass runs the same forward and head once more
            teacher *= 2.0
    # rl.ppo_epochs passes of updates; the old log-probs and the samples once per step
    train = spec.train.ppo_epochs * ((3.0 + remat) * fwd + 4.0 * lens + teacher)
    # The old log-probs skip the mini-batches that are on-policy (the first with one pass).
    minis = spec.train.prompts_per_step // spec.train.mini_batch_prompts
    fresh = sum(on_policy_updates(spec.train.ppo_epochs, minis))
    out = {"train": train, "old_logprob": fwd * (minis - fresh) / minis, "sample": fwd, "tokens": tokens}
    if setup.step_cfg.kl_coef:
        out["ref_logprob"] = fwd  # the KL's reference log-probs: one more forward per step
    return out


def sampling_seconds(setup: PlanSetup, sampler: Phase, bandwidth: float, response_frac: float = 1.0) -> float:
    """Lower bound on one RL step's sampling time from HBM bandwidth, static engine (a call
    decodes until its longest row ends: response_frac 1, the budget, for calls of many rows;
    the continuous engine's is `plan_continuous.engine_time`).

    Each decode step reads every weight of the device's decode-layout copy, the whole
    prompt part of its KV cache, and the generated part's chunks up to its segment's
    (`sampler.cache_read_fraction`: (S+1)/2S of that part on average over a full
    response); calls run one after another (prompts_per_step / sampler batch of them),
    all devices in parallel.
    """
    from oisd_jax.sampler import cache_read_fraction
    calls = math.ceil(setup.spec.train.prompts_per_step / setup.sampler_batch)
    steps = response_frac * setup.max_new_tokens
    gen_bytes = sampler.kv_bytes - sampler.kv_prompt_bytes
    gen_frac = cache_read_fraction(max(setup.max_new_tokens - 1, 1), sampler.decode_segments, steps)
    per_step = sampler.decode_params_bytes + sampler.kv_prompt_bytes + gen_frac * gen_bytes
    return calls * steps * per_step / bandwidth


# ----------------------------------------------------------------------------- report
def _si(x: float) -> str:
    for p, u in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.1f} {u}"
    return f"{x:.0f} "


def _fmt(x: float | None, unit: int) -> str:
    return "-" if x is None else f"{x / unit:8.2f}"


def format_table(results: Sequence[PhaseResult], budget: Budget) -> str:
    """Per-device table, one column per phase (GiB, or MiB when every phase is small)."""
    rows = [("params (master)", lambda r: r.phase.params_bytes),
            ("optimizer state", lambda r: r.phase.opt_bytes),
            ("decode params", lambda r: r.phase.decode_params_bytes),
            ("KV cache (sampler)", lambda r: 0 if r.phase.kv_in_temporaries else r.phase.kv_bytes),
            ("KV pool (in temps)", lambda r: r.phase.kv_bytes if r.phase.kv_in_temporaries else 0),
            ("batch / other args", lambda r: r.phase.other_arg_bytes),
            ("temporaries (XLA)", lambda r: r.compiled.temporaries),
            ("XLA peak", lambda r: r.compiled.xla_peak),
            ("program total", lambda r: r.compiled.total),
            ("+ resident outside", lambda r: r.phase.resident_bytes),
            ("phase total", lambda r: r.total)]
    unit, uname = (GiB, "GiB") if max(r.total for r in results) >= GiB / 4 else (2 ** 20, "MiB")
    w = max(14, *(len(r.phase.name) + 2 for r in results))
    head = f"{uname + ' per device':<20}" + "".join(f"{r.phase.name:>{w}}" for r in results)
    lines = [head, "-" * len(head)]
    for label, get in rows:
        vals = [get(r) for r in results]
        if all(not v for v in vals) and label != "phase total":
            continue
        lines.append(f"{label:<20}" + "".join(f"{_fmt(v, unit):>{w}}" for v in vals))
    lines.append(f"{'budget':<20}" + "".join(f"{_fmt(budget.bytes, unit):>{w}}" for _ in results))
    lines.append(f"{'headroom':<20}" + "".join(f"{_fmt(budget.bytes - r.total, unit):>{w}}" for r in results))
    lines.append(f"{'compile s':<20}" + "".join(f"{r.compiled.compile_s:>{w}.1f}" for r in results))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command
def _guess_preset(config, config_path: str, preset: str | None) -> str | None:
    """Paper configs point hf_path at a placeholder: fall back to the preset named like the file."""
    if preset is not None:
        return preset
    hf = config.model.hf_path
    if hf and os.path.isfile(os.path.join(os.path.expanduser(hf), "config.json")):
        return None
    from oisd_jax.model.config import PRESETS
    stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    if stem in PRESETS and config.model.preset in (None, "tiny"):
        return stem
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oisd_jax.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file, optionally 'file.py:arg'")
    p.add_argument("--devices", type=int, required=True, help="devices of the mesh (all hosts)")
    p.add_argument("--target", default="h100",
                   help="h100 | a100 | h200 | path.txtpb | v5e | v5p | v6e | v5p:AxBxC (a TPU topology) | cpu")
    p.add_argument("--preset", default=None, help="model preset when the config's hf_path is not on disk")
    p.add_argument("--micro_batch_tokens", type=int, default=None, help="override rl.micro_batch_tokens")
    p.add_argument("--sampler_batch", type=int, default=None, help="override sampler.batch_size (prompts)")
    p.add_argument("--sampler_cache", choices=("kept", "released"), default=None,
                   help="whether the sampler's KV cache stays allocated through the updates "
                        "(default: the config's sampler.keep_cache)")
    p.add_argument("--mem_fraction", type=float, default=None,
                   help="XLA's pool as a fraction of device memory (GPU: XLA_PYTHON_CLIENT_MEM_FRACTION, "
                        "default 0.92, JAX's own 0.75; TPU: 1.0)")
    p.add_argument("--reserve_gib", type=float, default=None,
                   help="kept free inside the pool for what memory_analysis misses (workspaces, fragmentation; "
                        "default 1.5 GPU, 0.5 TPU)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed MFU for the step-time estimate")
    p.add_argument("--mean_prompt", type=float, default=None, help="mean prompt tokens (default max_prompt_len/4)")
    p.add_argument("--mean_response", type=float, default=None,
                   help="mean response tokens, for the FLOPs and the continuous engine's time (default: the "
                        "paper's 1536 of 8192 for Qwen3, the same fraction of other budgets)")
    p.add_argument("--engine", choices=("static", "continuous"), default=None,
                   help="override sampler.engine")
    p.add_argument("--slots", type=int, default=None, help="override sampler.slots (continuous engine)")
    p.add_argument("--pool_pages", default=None,
                   help="override sampler.pool_pages (continuous engine): an int, or 'mean' for a pool sized to "
                        "--mean_response (plan_continuous.planned_pool_pages)")
    p.add_argument("--phases", default=None,
                   help="compile only these phases, comma-separated ('sampler', 'train step', 'old log-probs'); "
                        "the verdict then covers those only")
    p.add_argument("--no_suggest", action="store_true", help="skip the largest-fit search (fewer compiles)")
    p.add_argument("--sweep", action="store_true", help="also show temporaries vs micro-batch / remat / chunking")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    a = p.parse_args(argv)

    if not jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001
        # Planning compiles only; it never needs a local accelerator. On a machine without
        # CUDA libraries the CUDA plugin fails its version check while jax initialises the
        # "cuda" backend, and then offers no deviceless topology either; with the CPU
        # platform it loads, skips that check and compiles for the GPU target.
        if "JAX_PLATFORMS" not in os.environ:
            jax.config.update("jax_platforms", "cpu")
        if a.target == "cpu":
            jax.config.update("jax_num_cpu_devices", a.devices)
    from oisd_jax.config_files import load_config_file
    config = load_config_file(a.config)
    target = get_target(a.target)
    tpu = target.kind == "tpu"
    a.mem_fraction = a.mem_fraction if a.mem_fraction is not None else 1.0 if tpu else 0.92
    a.reserve_gib = a.reserve_gib if a.reserve_gib is not None else 0.5 if tpu else 1.5
    preset = _guess_preset(config, a.config, a.preset)
    overrides = None
    if tpu and config.model.attn_impl == "cudnn":
        # cuDNN is GPU-only: a TPU run uses the splash kernel (launch/tpu_pod.sh sets it).
        overrides = dict(attn_impl="splash")
        print("NOTE      model.attn_impl=cudnn is GPU-only: planned with splash (TPU flash attention); "
              "run with --config.model.attn_impl=splash")
    setup = make_setup(config, target.devices(a.devices), preset=preset, micro_batch_tokens=a.micro_batch_tokens,
                       sampler_batch=a.sampler_batch, model_overrides=overrides)
    if a.sampler_cache is not None:  # else the config's sampler.keep_cache
        setup = setup.replace(sampler_cache_kept=a.sampler_cache == "kept")
    from oisd_jax import plan_continuous as pc
    mean_response = a.mean_response if a.mean_response is not None else pc.default_mean_response(
        setup.max_new_tokens)
    setup = setup.replace(engine=a.engine or setup.engine, slots=a.slots or setup.slots)
    if setup.engine == "continuous":  # the trainer's Sampler refuses it too; here before any compile
        from oisd_jax.sampler import check_pool_split
        check_pool_split(setup.model, setup.sampler_mesh)
    if a.pool_pages is not None:
        setup = setup.replace(pool_pages=pc.planned_pool_pages(setup, setup.slots, mean_response)
                              if a.pool_pages == "mean" else int(a.pool_pages))
    budget = Budget(target.memory_bytes, a.mem_fraction, int(a.reserve_gib * GiB))
    m = setup.model
    from oisd_jax.plan_programs import planned_model
    src = planned_model(setup.spec.model, preset)[1]
    from oisd_jax.model import abstract
    n_params = parallel.num_params(abstract(m))
    print(f"model     {m.family} {src}: {_si(n_params)} params, "
          f"L={m.num_layers} D={m.hidden_size} V={m.vocab_size}; {m.dtype} compute, {m.param_dtype} master, "
          f"remat={m.remat_policy}, attn={m.attn_impl}")
    topo = ""
    if tpu:
        from oisd_jax import tpu_targets
        t = target.topology
        topo = f" (topology {t if ':' in t else tpu_targets.topology_name(tpu_targets.resolve(t), a.devices)})"
    print(f"target    {a.devices} x {target.name}{topo}; train mesh {dict(setup.mesh.shape)}, "
          f"sampler mesh {dict(setup.sampler_mesh.shape)}")
    print(f"batch     rows of {setup.row_len} tokens; micro-batch {setup.micro_batch_tokens} tokens "
          f"({setup.rows_per_micro} rows, {setup.rows_per_micro // setup.batch_shards}/device) x {setup.num_micro}; "
          f"logit_chunk={setup.step_cfg.logit_chunk}; sampler {setup.sampler_batch} prompts x {setup.spec.sampler.sampling.n}")
    if setup.teacher_row_len is not None:
        sc = setup.step_cfg
        where = (f"a {'float32' if sc.teacher == 'ema' else setup.model.dtype} copy in 'batch / other args' (no "
                 "optimizer state)" if sc.ref_resident else "the params themselves")
        print(f"teacher   rl.teacher={sc.teacher!r}: rows of {setup.teacher_row_len} tokens beside the student's; "
              f"weights {where}; its forward in the train step")
    if setup.engine == "continuous":
        pool = setup.pool_pages or pc.default_pool_pages(setup)
        print(f"engine    continuous: {setup.slots} slots (every device of a (data, fsdp) group decodes all of "
              f"them; KV heads over tensor={pc.kv_shards(setup)}), pool {pool} pages of {setup.page_size} tokens"
              + ("" if setup.pool_pages else " (sampler.pool_pages=None: every slot at the full budget)"))
    print(f"budget    {budget.bytes / GiB:.2f} GiB/device = {a.mem_fraction:.2f} x {target.memory_bytes / GiB:.2f} GiB "
          f"- {a.reserve_gib:.1f} GiB reserve")
    if target.kind == "cpu":
        print("NOTE      --target=cpu: INDICATIVE ONLY. XLA:CPU upcasts bf16 matmuls (temporaries 1.1-3.8x a GPU's) "
              "and its peak ignores temporaries; use a GPU target for decisions.")
    only = [x.strip() for x in a.phases.split(",")] if a.phases else None
    results = run_phases(setup, target, only)
    if not results:
        raise SystemExit(f"--phases={a.phases!r}: no such phase (train step, old log-probs, sampler)")
    print()
    print(format_table(results, budget))
    if tpu:
        print("Mosaic kernel calls per program (splash attention; the sampler's paged attention): "
              + ", ".join(f"{r.phase.name} {r.compiled.tpu_kernels}" for r in results))
    warns = [w for r in results for w in r.compiled.warnings]
    if warns:
        print(f"\nXLA rematerialisation warnings ({len(warns)}):")
        for w in dict.fromkeys(warns):
            print("  " + w[-200:])
    for r in results:
        if r.compiled.oom:
            print(f"\n{r.phase.name}: the TPU compiler refused it: {r.compiled.oom[:300]}")
    ok = all(r.total <= budget.bytes for r in results)
    kv = sampler_cache_bytes(setup)
    tr = next((r for r in results if r.phase.name == "train step"), None)
    if tr is None:
        pass
    elif setup.engine == "continuous":
        print("\nthe continuous engine's KV pool lives inside the sampler program only: nothing of it stays "
              "beside the updates (sampler.keep_cache does not apply)")
    elif setup.sampler_cache_kept:
        print(f"\nthe sampler keeps its KV cache ({kv / GiB:.2f} GiB/device) through the updates (counted above); "
              f"with sampler.keep_cache=False (freed after sampling) the train step needs "
              f"{(tr.total - kv) / GiB:.2f} GiB")
    else:
        print(f"\nassumes the trainer frees the sampler's KV cache ({kv / GiB:.2f} GiB/device) before the updates "
              f"(sampler.keep_cache=False); kept, the train step would need {(tr.total + kv) / GiB:.2f} GiB")

    mean_prompt = a.mean_prompt if a.mean_prompt is not None else setup.max_prompt_len / 4
    fl = step_flops(setup, mean_prompt, mean_response / setup.max_new_tokens)
    print(f"\nFLOPs per RL step (analytic; {fl['tokens'] / 1e6:.2f}M tokens = {setup.spec.train.prompts_per_step} x "
          f"{setup.spec.sampler.sampling.n} x ({mean_prompt:.0f} + {mean_response:.0f} mean response of "
          f"{setup.max_new_tokens})):")
    peak = target.peak_flops * a.devices
    for k in [k for k in ("train", "old_logprob", "ref_logprob", "sample") if k in fl]:
        t = f", {fl[k] / (peak * a.mfu):8.1f} s at {a.mfu:.0%} MFU" if peak else ""
        print(f"  {k:<12}{_si(fl[k]):>10}FLOP{t}")
    sres = next((r for r in results if r.phase.name == "sampler"), None)
    if target.bandwidth and sres is not None and setup.engine == "continuous":
        et = pc.engine_time(setup, sres.phase, target.bandwidth, target.peak_flops, mean_prompt, mean_response)
        fl.update(sample_hbm_s=et.hbm_s, sample_flop_s=et.flop_s, sample_gather_hbm_s=et.gather_hbm_s,
                  sample_steps_per_call=et.steps_per_call, sample_calls=et.calls)
        print(f"  sampling, continuous engine: >= {et.seconds:8.1f} s per step at {mean_response:.0f} mean response "
              f"tokens (HBM {et.hbm_s:.1f} s: {et.calls} call(s) x {et.steps_per_call:.0f} decode steps reading "
              f"{et.weight_bytes / GiB:.2f} GiB of weights + {et.kv_read_bytes / GiB:.0f} GiB of held KV per call; "
              f"FLOP {et.flop_s:.1f} s at peak; at {target.bandwidth / 1e12:.2f} TB/s)")
        print(f"  (the gather attention reads every slot's table up to the longest running slot: up to "
              f"{et.gather_hbm_s:.0f} s; a paged-attention kernel reads the held pages only)")
    elif target.bandwidth and sres is not None:
        t = sampling_seconds(setup, sres.phase, target.bandwidth)
        fl["sample_hbm_s"] = t
        print(f"  sampling is HBM-bound: >= {t:8.1f} s per step (static engine: a call decodes until its longest "
              f"row ends, counted at the budget; every decode step reads the device's decode "
              f"params, its KV cache's prompt part and, in {sres.phase.decode_segments} segment(s), the "
              f"generated part's chunks filled so far, at {target.bandwidth / 1e12:.2f} TB/s)")

    suggestions = {}
    if not a.no_suggest:
        from oisd_jax.plan_search import suggest
        suggestions = suggest(setup, target, budget, results, mean_response)
        found = []  # with --phases, only the phases compiled are searched
        if "rows_per_device" in suggestions:
            found.append(f"micro_batch_tokens={suggestions['micro_batch_tokens']} "
                         f"({suggestions['rows_per_device']} row(s)/device)")
        if "slots" in suggestions:
            found.append(f"slots={suggestions['slots']} with pool_pages={suggestions['pool_pages']} (sized to the "
                         "mean response)")
        if "sampler_batch" in suggestions:
            found.append(f"sampler batch={suggestions['sampler_batch']} prompts")
        if found:
            print("\nlargest that fit: " + ", ".join(found))
    from oisd_jax.plan_search import sweep
    sw = sweep(setup, target) if a.sweep else []
    if sw:
        print("\ntrain step, per device   temporaries   program total   (GiB)")
        for label, c in sw:
            print(f"  {label:<38}{c.temporaries / GiB:10.2f}{c.total / GiB:14.2f}")
    over = [f"{r.phase.name} ({r.total / GiB:.2f} GiB)" for r in results if r.total > budget.bytes]
    print(f"\n{'PASS' if ok else 'FAIL'}: largest phase {max(r.total for r in results) / GiB:.2f} GiB of "
          f"{budget.bytes / GiB:.2f} GiB per device" + (f"; over budget: {', '.join(over)}" if over else ""))
    if a.json:
        import json
        rec = dict(config=a.config, devices=a.devices, target=target.name, budget=budget.bytes, ok=ok,
                   phases={r.phase.name: dict(dataclasses.asdict(r.compiled), **_phase_bytes(r.phase), total=r.total)
                           for r in results},
                   setup=dict(row_len=setup.row_len, micro_batch_tokens=setup.micro_batch_tokens,
                              rows_per_micro=setup.rows_per_micro, num_micro=setup.num_micro,
                              sampler_batch=setup.sampler_batch, mesh=dict(setup.mesh.shape),
                              sampler_mesh=dict(setup.sampler_mesh.shape), engine=setup.engine,
                              slots=setup.slots, page_size=setup.page_size,
                              pool_pages=(setup.pool_pages or pc.default_pool_pages(setup))
                              if setup.engine == "continuous" else None,
                              mean_prompt=mean_prompt, mean_response=mean_response),
                   flops=fl, suggestions=suggestions,
                   sweep={label: dataclasses.asdict(c) for label, c in sw})
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0 if ok else 1


def _phase_bytes(ph: Phase) -> dict[str, int]:
    return {f.name: getattr(ph, f.name) for f in dataclasses.fields(ph) if f.name.endswith("_bytes")}


if __name__ == "__main__":
    from oisd_jax import cli
    cli.run_main(main)
