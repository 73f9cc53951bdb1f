"""RL update throughput: the compiled GRPO and GRPO+OISD steps vs a PyTorch reference.

    python bench/train_step.py [--quick] [--chunk 64] [--remat none]

One Qwen3-shaped random checkpoint (transformers, saved and loaded with `load_hf`), one
batch (8 rows x 256 tokens, 64 prompt + 192 response each), the same losses in both
frameworks, AdamW with global-norm clipping, float32 (PyTorch bf16 matmuls are ~0.3
GFLOP/s on this CPU). The PyTorch reference is the straightforward implementation:
`output_hidden_states` for the lens, eager attention with `output_attentions` for the
probes, full [B, T, V] log-softmax / JS. The matmul peak of this machine is measured in
the same run; achieved FLOP/s counts model FLOPs (3 x forward, no remat recompute).
Prints a table and writes bench/results/train_step.json.
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
from oisd_jax.rl.batch import build_train_batch  # noqa: E402
from oisd_jax.rl.step import StepConfig, make_logprob_fn, make_train_step  # noqa: E402
from oisd_jax.rl.train_state import init_train_state  # noqa: E402

SPEC = dict(model_type="qwen3", vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
            max_position_embeddings=2048)
ROWS, PROMPT, RESPONSE = 8, 64, 192
TAP, Q, W, S = 4, 32, 64, 64
HP = dict(clip=0.2, dual=10.0, lr=1e-6, wd=0.01, grad_clip=1.0, think=1.0, attn=0.1, adv_clip=1.0)


CPU_TIMES: dict = {}  # id(list of wall times) -> list of process CPU seconds, same order


def timed(fn, reps: int) -> list[float]:
    """Wall seconds per call; process CPU seconds (all threads) go to CPU_TIMES, a steadier
    number when other jobs share the cores."""
    out, cpu = [], []
    for _ in range(reps):
        c, t = time.process_time(), time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU_TIMES.setdefault("last", []).append(cpu)
    return out


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    tj = min(timed(lambda: f(a).block_until_ready(), reps))
    ta = torch.ones(n, n)
    tt = min(timed(lambda: ta @ ta, reps))
    return {"jax_gflops": 2 * n**3 / tj / 1e9, "torch_gflops": 2 * n**3 / tt / 1e9}


def model_flops(cfg, B: int, T: int, oisd: bool) -> float:
    """3 x forward matmul FLOPs (+ the lens unembedding for OISD); causal attention."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * (H + 2 * KV) * Dh + H * Dh * D + 3 * D * F
    fwd = 2 * (L * per_layer + D * V) * B * T + 2 * 2 * L * H * Dh * B * T * T / 2
    if oisd:
        fwd += 2 * D * V * B * T
    return 3 * fwd


# ----------------------------------------------------------------------------- PyTorch reference
def torch_js(zs, zt, tau=1.0):
    ls = torch.log_softmax(zs / tau, -1)
    lt = torch.log_softmax(zt.detach() / tau, -1)
    lm = torch.logsumexp(torch.stack([ls, lt]), 0) - np.log(2.0)
    return 0.5 * (ls.exp() * (ls - lm)).sum(-1) + 0.5 * (lt.exp() * (lt - lm)).sum(-1)


def torch_step(model, opt, b, oisd: bool):
    """One update, straightforward: full [B, T, V] logits for the final layer and the lens."""
    out = model(b["tokens"], output_hidden_states=oisd, output_attentions=oisd)
    logits = out.logits
    mask, adv = b["mask"], b["adv"]
    logp = torch.log_softmax(logits, -1).gather(-1, b["targets"][..., None])[..., 0]
    ratio = torch.exp(torch.clamp(logp - b["old_logp"], -20, 20))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - HP["clip"], 1 + HP["clip"]))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * HP["dual"]), pg)
    n = mask.sum()
    loss = (pg * mask).sum() / n
    w = adv.clamp(-HP["adv_clip"], HP["adv_clip"])
    if oisd:
        lens = model.lm_head(model.model.norm(out.hidden_states[TAP]))
        loss = loss + HP["think"] * (w * torch_js(lens, logits) * mask).sum() / n
        # Attention renormalised over the sampled key set == softmax of the scores over it.
        qi, ki, valid, qw = b["q"], b["k"], b["q_valid"], b["q_w"]
        kc = ki.clamp(min=0)
        rows = torch.arange(qi.shape[0])[:, None, None]

        def probe(a):  # [B, H, T, T] -> [B, Q, H, K] renormalised over valid keys
            p = a.permute(0, 2, 1, 3)[rows[..., 0], qi]                 # [B, Q, H, T]
            p = torch.gather(p, 3, kc[:, :, None, :].expand(-1, -1, p.shape[2], -1))
            p = p * (ki >= 0)[:, :, None, :]
            return p / p.sum(-1, keepdim=True).clamp_min(1e-30)

        ps, pt = probe(out.attentions[TAP - 1]), probe(out.attentions[-1]).detach()
        m = 0.5 * (ps + pt)
        kl = lambda p: torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - torch.log(m.clamp_min(1e-30))), 0.0).sum(-1)  # noqa: E731
        js = (0.5 * kl(ps) + 0.5 * kl(pt)).mean(-1)                      # [B, Q]
        loss = loss + HP["attn"] * (qw.clamp(-1, 1) * js * valid).sum() / valid.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
    if torch.isfinite(norm):
        opt.step()
    return loss.detach()


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunk", type=int, default=64, help="tokens of T per vocabulary chunk")
    ap.add_argument("--remat", default="none", help="decoder remat policy for the JAX step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    args = ap.parse_args()
    reps = 2 if args.quick else 5
    torch.set_num_threads(os.cpu_count())
    peak = matmul_peak(reps=3 if args.quick else 5)
    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    T = PROMPT + RESPONSE
    prompts = [rng.integers(0, SPEC["vocab_size"], PROMPT).tolist() for _ in range(ROWS)]
    responses = [rng.integers(0, SPEC["vocab_size"], RESPONSE).tolist() for _ in range(ROWS)]
    adv = rng.choice([-1.0, 1.0], ROWS) * rng.uniform(0.5, 1.5, ROWS)
    batch = build_train_batch(prompts, responses, [RESPONSE] * ROWS, adv, row_len=T, rows_per_micro=ROWS,
                              num_micro=1, attn_steps=Q, attn_window=W, attn_stride=S, rng=rng)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        hf_cfg = transformers.AutoConfig.for_model(**SPEC)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").float()
        model.save_pretrained(d)
        cfg, params = load_hf(d, dtype=jnp.float32)
        cfg = cfg.replace(remat_policy=args.remat, dtype="float32")
        base = StepConfig(lr=HP["lr"], weight_decay=HP["wd"], grad_clip=HP["grad_clip"], logit_chunk=args.chunk)
        old_logp = np.asarray(make_logprob_fn(cfg, base)(params, batch))
        batch = batch.replace(old_logp=old_logp)
        compact = batch.replace(head_positions=build_train_batch(
            prompts, responses, [RESPONSE] * ROWS, adv, row_len=T, rows_per_micro=ROWS, num_micro=1,
            head_len=0).head_positions)
        tb = {"tokens": torch.tensor(batch.tokens[0], dtype=torch.long),
              "targets": torch.tensor(batch.targets[0], dtype=torch.long),
              "mask": torch.tensor(batch.loss_mask[0]), "adv": torch.tensor(batch.advantages[0]),
              "old_logp": torch.tensor(old_logp[0]), "q": torch.tensor(batch.attn_queries[0], dtype=torch.long),
              "k": torch.tensor(batch.attn_keys[0], dtype=torch.long), "q_valid": torch.tensor(batch.attn_valid[0]),
              "q_w": torch.tensor(batch.attn_weight[0])}
        opt = torch.optim.AdamW(model.parameters(), lr=HP["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=HP["wd"])
        variants = {"full head": jax.device_put(batch), "loss-position head": jax.device_put(compact)}
        for name, oisd in (("grpo", False), ("grpo+oisd", True)):
            sc = base.replace(tap_layer=TAP, think_weight=HP["think"], attn_weight=HP["attn"]) if oisd else base
            step = make_train_step(cfg, sc)
            runs, compile_s = {}, {}
            for v, jb in variants.items():
                state = init_train_state(jax.tree.map(jnp.copy, params), sc)
                t0 = time.perf_counter()
                state, m = step(state, jb)
                jax.block_until_ready(m)
                compile_s[v] = time.perf_counter() - t0
                runs[v] = [state, jb, m]
            model.set_attn_implementation("eager" if oisd else "sdpa")
            torch_step(model, opt, tb, oisd)  # warm-up
            times = {v: [] for v in list(variants) + ["torch"]}
            cpu = {v: [] for v in times}
            for _ in range(reps):  # interleaved, so a busy machine slows all alike
                for v, r in runs.items():
                    c, t = time.process_time(), time.perf_counter()
                    r[0], r[2] = step(r[0], r[1])
                    jax.block_until_ready(r[2]["loss"])
                    times[v].append(time.perf_counter() - t)
                    cpu[v].append(time.process_time() - c)
                times["torch"] += timed(lambda: torch_step(model, opt, tb, oisd), 1)
                cpu["torch"] += CPU_TIMES["last"].pop()
            tt = min(times["torch"])
            for v in variants:
                tj = min(times[v])
                flops = model_flops(cfg, ROWS, T, oisd)
                rows.append(dict(step=name, head=v, jax_s=tj, torch_s=tt, jax_tok_s=ROWS * T / tj,
                                 torch_tok_s=ROWS * T / tt, speedup=tt / tj, jax_gflops=flops / tj / 1e9,
                                 frac_of_peak=flops / tj / 1e9 / peak["jax_gflops"], first_call_s=compile_s[v],
                                 jax_times=times[v], torch_times=times["torch"], jax_cpu_s=min(cpu[v]),
                                 torch_cpu_s=min(cpu["torch"]), load_avg_1m=os.getloadavg()[0],
                                 loss=float(runs[v][2]["loss"]), grad_norm=float(runs[v][2]["grad_norm"])))
    by = {(r["step"], r["head"]): r for r in rows}
    summary = {f"oisd_overhead_jax ({v})": by[("grpo+oisd", v)]["jax_s"] / by[("grpo", v)]["jax_s"] - 1
               for v in ("full head", "loss-position head")}
    summary["oisd_overhead_torch"] = by[("grpo+oisd", "full head")]["torch_s"] / by[("grpo", "full head")]["torch_s"] - 1
    summary["flop_ratio_oisd_over_grpo"] = model_flops(cfg, ROWS, T, True) / model_flops(cfg, ROWS, T, False) - 1
    print(f"matmul peak (2048^2 f32): jax {peak['jax_gflops']:.1f} GFLOP/s, torch {peak['torch_gflops']:.1f} GFLOP/s")
    print(f"batch {ROWS} x {T} tokens ({RESPONSE} response), vocab {SPEC['vocab_size']}, chunk {args.chunk}, "
          f"remat {args.remat}, tap layer {TAP}, probes Q={Q} K={W + -(-T // S)}")
    print(f"{'step':>10} {'jax head':>19} {'jax s':>6} {'torch s':>8} {'jax tok/s':>10} {'torch tok/s':>12} "
          f"{'speedup':>8} {'GFLOP/s':>8} {'%peak':>6} {'cpu-s ratio':>11} {'compile s':>9}")
    for r in rows:
        print(f"{r['step']:>10} {r['head']:>19} {r['jax_s']:>6.2f} {r['torch_s']:>8.2f} {r['jax_tok_s']:>10.0f} "
              f"{r['torch_tok_s']:>12.0f} {r['speedup']:>8.2f} {r['jax_gflops']:>8.1f} {100 * r['frac_of_peak']:>5.0f}% "
              f"{r['torch_cpu_s'] / r['jax_cpu_s']:>11.2f} {r['first_call_s']:>9.1f}")
    print("OISD overhead over GRPO: " + ", ".join(f"{k} {100 * v:+.0f}%" for k, v in summary.items()))
    print("(GFLOP/s and %peak count model FLOPs of the full [B, T] head for both heads)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": SPEC, "peak": peak, "rows": rows, "summary": summary, "args": vars(args),
                   "load_avg_1m": [load0, os.getloadavg()[0]], "jax": jax.__version__, "torch": torch.__version__}, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
