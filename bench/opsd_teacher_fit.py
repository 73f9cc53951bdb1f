"""Does OPSD's teacher context help the embedded model? The teacher is the warm start itself,
reading the teacher prompt (problem + worked solution, `data.teacher_template`); OPSD can only
teach what that context makes the model predict better than the student's own prompt.

    python bench/opsd_teacher_fit.py --warm runs/ablation/warmup300_heldout128_seed2

For n seeded problems, the reference response (worked steps, boxed answer, EOS) is scored
token by token by one model under the student prompt and under the teacher prompt: mean NLL
per token, the share of tokens each context predicts greedily, and the mean KL(p_T || p_S)
per token (what OPSD's forward-KL loss starts from). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oisd_jax.config_files import load_config_file  # noqa: E402
from oisd_jax.data.synthetic import make_problems, reference_response, synthetic_tokenizer  # noqa: E402
from oisd_jax.model import forward, load_hf, logits  # noqa: E402
from oisd_jax.run_spec import resolve  # noqa: E402


ROW = 128  # every sequence padded to one length (one compile); causal, so the padding is never read


@jax.jit
def _logprobs(params, ids):
    cfg = _logprobs.cfg
    return jax.nn.log_softmax(logits(params, cfg, forward(params, cfg, ids).hidden)[0], axis=-1)


def response_logprobs(params, cfg, context: list[int], response: list[int]) -> np.ndarray:
    """[len(response), V] log-probs of each response position given context + response so far."""
    seq = context + response
    if len(seq) > ROW:
        raise ValueError(f"a sequence of {len(seq)} tokens is over ROW={ROW}")
    lp = _logprobs(params, jnp.asarray([seq + [0] * (ROW - len(seq))], jnp.int32))
    return np.asarray(lp[len(context) - 1:len(seq) - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", required=True, help="a warm start's HF folder (bench/ablation.py writes them)")
    ap.add_argument("--n", type=int, default=128, help="problems")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--out", default=None, help="JSON path (default: <warm>/teacher_fit.json)")
    args = ap.parse_args()
    c = load_config_file("configs/tiny.py:opsd")
    data = resolve(c, num_devices=1).data  # tiny's task and teacher prompt, as the trainer reads them
    cfg, params = load_hf(args.warm, dtype=jnp.float32)
    _logprobs.cfg = cfg
    tok = synthetic_tokenizer()
    tp = data.teacher
    enc = lambda msgs: list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,  # noqa: E731
                                                    return_dict=False))
    stats = {k: [] for k in ("nll_student", "nll_teacher", "top1_student", "top1_teacher", "kl_t_s")}
    for rec in make_problems(args.n, seed=args.seed, task=data.task):
        response = tok(reference_response(rec["expression"], reasoning=True),
                       add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lp_s = response_logprobs(params, cfg, enc(rec["prompt"]), response)
        lp_t = response_logprobs(params, cfg, enc(tp.messages(rec)), response)
        idx = np.arange(len(response))
        stats["nll_student"].append(-lp_s[idx, response].mean())
        stats["nll_teacher"].append(-lp_t[idx, response].mean())
        stats["top1_student"].append((lp_s.argmax(-1) == response).mean())
        stats["top1_teacher"].append((lp_t.argmax(-1) == response).mean())
        stats["kl_t_s"].append((np.exp(lp_t) * (lp_t - lp_s)).sum(-1).mean())
    res = {k: float(np.mean(v)) for k, v in stats.items()}
    res.update(warm=args.warm, n=args.n, seed=args.seed, template=c.data.teacher_template)
    print("| context | NLL per reference token | greedy top-1 on the reference |\n|---|---|---|")
    print(f"| student prompt | {res['nll_student']:.3f} | {100 * res['top1_student']:.1f}% |")
    print(f"| teacher prompt | {res['nll_teacher']:.3f} | {100 * res['top1_teacher']:.1f}% |")
    print(f"mean KL(p_T || p_S) per reference token: {res['kl_t_s']:.3f}")
    out = args.out or os.path.join(args.warm, "teacher_fit.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"json: {out}")


if __name__ == "__main__":
    main()
