"""Mean OISD weight of a group against its accuracy, per rl.think_weight_mode (closed form).

    python bench/think_weight_bias.py [--groups 4,8] [--clip 1.0]

Binary rewards, k right answers of G, GRPO advantages (unbiased std, as rl.advantages.grpo):
A = (1 - p) / s for a right rollout and -p / s for a wrong one, p = k / G,
s = sqrt(G / (G - 1) p (1 - p)). The weights are rl.advantages.oisd_weights of those
advantages; the table is their mean over the group's rollouts (per rollout, before the
token-mean of L_think) and the share of the group's total |w| that pushes (w < 0).
Microseconds of NumPy: no timing, just the table (docs/method.md §7) and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oisd_jax.choices import THINK_WEIGHT_MODES  # noqa: E402
from oisd_jax.rl import advantages  # noqa: E402


def group_rewards(g: int) -> np.ndarray:
    """[G - 1, G]: row k - 1 has k right answers (the all-equal groups weigh 0 in every mode)."""
    return np.array([[1.0] * k + [0.0] * (g - k) for k in range(1, g)], np.float32)


def bias_rows(g: int, clip: float) -> list[dict]:
    r = group_rewards(g)
    adv = np.asarray(advantages.grpo(r))
    rows = []
    for mode in THINK_WEIGHT_MODES:
        w = np.asarray(advantages.oisd_weights(adv, mode, clip))
        for k in range(1, g):
            wk = w[k - 1]
            total = np.abs(wk).sum()
            rows.append({"G": g, "right": k, "accuracy": k / g, "mode": mode, "mean_w": float(wk.mean()),
                         "push_share": float(-wk[wk < 0].sum() / total) if total else 0.0,
                         "w_right": float(wk[0]), "w_wrong": float(wk[-1])})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="4,8")
    ap.add_argument("--clip", type=float, default=1.0, help="c = rl.adv_clip")
    ap.add_argument("--out", default="bench/results/think_weight_bias.json")
    args = ap.parse_args()
    rows = [r for g in map(int, args.groups.split(",")) for r in bias_rows(g, args.clip)]
    print("| G | right | accuracy | " + " | ".join(f"mean w ({m})" for m in THINK_WEIGHT_MODES)
          + " | push share (signed) |")
    print("|" + "---|" * (4 + len(THINK_WEIGHT_MODES)))
    for g, k in sorted({(r["G"], r["right"]) for r in rows}):
        cell = {r["mode"]: r for r in rows if (r["G"], r["right"]) == (g, k)}
        print(f"| {g} | {k} | {k / g:.3f} | " + " | ".join(f"{round(cell[m]['mean_w'], 3) + 0.0:+.3f}" for m in THINK_WEIGHT_MODES)
              + f" | {cell['signed']['push_share']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
