"""Forward throughput: oisd_jax vs transformers (PyTorch, CPU) on the same checkpoint.

    python bench/forward.py [--quick]

Builds a Qwen3-shaped random checkpoint with transformers, loads it with `load_hf`, and
times a full-sequence forward producing logits in both frameworks (float32: PyTorch bf16
matmuls are ~0.3 GFLOP/s on this CPU). The matmul peak of this machine is measured in the
same run so FLOP/s can be read as a fraction of it. Prints a table, writes JSON.
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
from oisd_jax.model import forward, load_hf, logits  # noqa: E402


def best_of(fn, reps: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    tj = best_of(lambda: f(a).block_until_ready(), reps)
    ta = torch.ones(n, n)
    tt = best_of(lambda: ta @ ta, reps)
    return {"jax_gflops": 2 * n**3 / tj / 1e9, "torch_gflops": 2 * n**3 / tt / 1e9}


def forward_flops(cfg, B: int, T: int) -> float:
    """2 x (matmul params) x tokens + attention scores and values (causal: half of T^2)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * (H + 2 * KV) * Dh + H * Dh * D + 3 * D * F
    dense = 2 * (L * per_layer + D * V) * B * T
    attn = 2 * 2 * L * H * Dh * B * T * T / 2
    return dense + attn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "forward.json"))
    args = ap.parse_args()
    shapes = [(4, 256)] if args.quick else [(1, 512), (4, 256), (8, 512)]
    reps = 2 if args.quick else 5
    torch.set_num_threads(os.cpu_count())
    spec = dict(model_type="qwen3", vocab_size=32768, hidden_size=512, intermediate_size=1536,
                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                tie_word_embeddings=True, max_position_embeddings=2048)
    peak = matmul_peak()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**spec)).float().eval()
        model.save_pretrained(d)
        cfg, params = load_hf(d, dtype=jnp.float32)
        fwd = jax.jit(lambda p, t: logits(p, cfg, forward(p, cfg, t).hidden))
        for B, T in shapes:
            tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
            tj_tok = jnp.asarray(tok, jnp.int32)
            t0 = time.perf_counter()
            fwd(params, tj_tok).block_until_ready()
            compile_s = time.perf_counter() - t0
            tj = best_of(lambda: fwd(params, tj_tok).block_until_ready(), reps)
            tt_tok = torch.tensor(tok)
            with torch.inference_mode():
                tt = best_of(lambda: model(tt_tok).logits, reps)
            flops = forward_flops(cfg, B, T)
            rows.append(dict(batch=B, seq=T, jax_tok_s=B * T / tj, torch_tok_s=B * T / tt, ratio=tt / tj,
                             jax_gflops=flops / tj / 1e9, frac_of_peak=flops / tj / 1e9 / peak["jax_gflops"],
                             first_call_s=compile_s))
    print(f"matmul peak (2048^2 f32): jax {peak['jax_gflops']:.1f} GFLOP/s, torch {peak['torch_gflops']:.1f} GFLOP/s")
    print(f"{'B':>3} {'T':>5} {'jax tok/s':>10} {'torch tok/s':>12} {'ratio':>6} {'GFLOP/s':>8} {'%peak':>6} {'compile s':>9}")
    for r in rows:
        print(f"{r['batch']:>3} {r['seq']:>5} {r['jax_tok_s']:>10.0f} {r['torch_tok_s']:>12.0f} {r['ratio']:>6.2f} "
              f"{r['jax_gflops']:>8.1f} {100 * r['frac_of_peak']:>5.0f}% {r['first_call_s']:>9.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": spec, "peak": peak, "rows": rows, "jax": jax.__version__, "torch": torch.__version__}, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
