"""How often math-verify (train.reward=math) and verl's math.compute_score (verl_math) disagree.

    python bench/reward_agreement.py --data /path/to/parquet_dir [--max_per_file N] [--strings 400]

a) The data's own ground truths (every *.parquet / *.jsonl under --data, verl fields:
   `reward_model.ground_truth`; nothing is copied into the repo). Each ground truth is
   scored against itself in a box, and against the rewrites of it a model typically
   writes that apply to it (`\\dfrac` for `\\frac`, `a/b`, a decimal, thousands commas,
   `N.0`, `x = ` prefixes, units, degrees, `\\text{}`, `\\left( \\right)`, spacing, a trailing
   period, swapped sums) plus two wrong answers (N + 1, a sign flip) that both should refuse.
b) `--strings` model-like whole responses: a random ground truth, a random rewrite or wrong
   answer, in a random ending (`$\\boxed{..}$.`, a space-form `\\boxed 5`, `\\fbox{..}`, an
   earlier box followed by the final one, a truncated box).
Prints one row per rewrite kind (how many apply, how many each scorer accepts, how many
they disagree on, and why), the totals per data file, and writes JSON. Every math-verify
check is bounded by --timeout_s in this process (a timeout scores 0 and is counted).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import sys
import time
from fractions import Fraction

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oisd_jax.data import read_records  # noqa: E402
from oisd_jax.rewards import score_one  # noqa: E402
from oisd_jax.rewards_verl import verl_math_reward  # noqa: E402

_INT = re.compile(r"-?\d+")
_FRAC = re.compile(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}")


def _frac(g: str) -> Fraction | None:
    m = _FRAC.fullmatch(g.strip())
    return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1) if m and int(m[3]) else None


def _decimal(g: str) -> str | None:
    f = _frac(g)
    if f is None or f.denominator == 1:
        return None
    d = f.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    return None if d != 1 else f"{float(f):.10g}"  # terminating decimals only: exact


def _swap_sum(g: str) -> str | None:
    parts = g.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts) or "{" in g or "(" in g:
        return None
    return f"{parts[1].strip()} + {parts[0].strip()}"


def _respace(g: str) -> str | None:
    """Spaces around commas and operators dropped (or added where there are none); never
    between letters, where dropping one merges macros (`\\pi i` -> `\\pii`)."""
    tight = re.sub(r"\s*([,=+<>]|-(?!\d))\s*", r"\1", g)
    if tight != g:
        return tight
    loose = re.sub(r"([,=+])", r"\1 ", g)
    return loose if loose != g else None


# kind -> (rewrite of a ground truth, or None where it does not apply; why they may disagree)
REWRITES = {
    "self": (lambda g: g, "the ground truth itself: verl always matches; math-verify's parse of both sides"),
    "dfrac_swap": (lambda g: (g.replace("\\dfrac", "\\frac") if "\\dfrac" in g else g.replace("\\frac", "\\dfrac"))
                   if "frac" in g else None, "both map \\dfrac to \\frac"),
    "slash": (lambda g: f"{'-' if _frac(g) < 0 else ''}{abs(_frac(g).numerator)}/{_frac(g).denominator}"
              if _frac(g) is not None and _frac(g).denominator != 1 else None,
              "verl turns a/b into \\frac only for two plain integers (-a/b -> \\frac{-a}{b} != -\\frac{a}{b})"),
    "decimal": (_decimal, "verl has no maths: 0.25 != \\frac{1}{4} (only exactly 0.5 is mapped)"),
    "int_commas": (lambda g: f"{int(g):,}" if _INT.fullmatch(g) and abs(int(g)) >= 1000 else None,
                   "verl keeps thousands commas"),
    "int_point0": (lambda g: g + ".0" if _INT.fullmatch(g) else None, "verl compares strings: 10.0 != 10"),
    "var_prefix": (lambda g: "x = " + g, "both drop a short `x =`"),
    "units_space": (lambda g: g + "\\text{ cm}", "verl cuts units after `\\text{ ` with a space"),
    "units_nospace": (lambda g: g + "\\text{cm}", "verl keeps `\\text{cm}` without the space"),
    "degrees": (lambda g: g + "^\\circ" if _INT.fullmatch(g) else None, "both drop ^\\circ"),
    "text_wrap": (lambda g: "\\text{" + g + "}", "verl does not unwrap \\text{}"),
    "left_right": (lambda g: "\\left" + g[0] + g[1:-1] + "\\right" + g[-1]
                   if g[:1] in "([" and g[-1:] in ")]" and "\\left" not in g else None, "both drop \\left/\\right"),
    "spacing": (_respace, "both ignore spaces; math-verify fails to parse some set/relation answers"),
    "trailing_period": (lambda g: g + ".", "verl keeps the period (inside the box)"),
    "swapped_sum": (_swap_sum, "verl has no maths: a + b != b + a"),
    "wrong_plus1": (lambda g: str(int(g) + 1) if _INT.fullmatch(g) else None, "a wrong answer: both should refuse"),
    "wrong_sign": (lambda g: None if g.strip("-") == "0" else g[1:] if g.startswith("-")
                   else "-" + g if _INT.fullmatch(g) or _frac(g) else None,
                   "a wrong answer: both should refuse"),
}
ENDINGS = {
    "dollar_box": lambda a: f"Thus the answer is $\\boxed{{{a}}}$.",
    "plain_box": lambda a: f"\\boxed{{{a}}}",
    "space_box": lambda a: f"The answer is $\\boxed {a}$.",
    "fbox": lambda a: f"\\fbox{{{a}}}",
    "two_boxes": lambda a: f"First guess \\boxed{{0}}, final: \\boxed{{{a}}}",
    "truncated": lambda a: f"so \\boxed{{{a}",
}


def scores(response: str, gt: str, timeout_s: float) -> tuple[float, float, bool]:
    mv, timed_out = score_one("math", response, gt, timeout_s)
    return mv, verl_math_reward(response, gt), timed_out


def tally(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        t = out.setdefault(r[key], {"n": 0, "math_verify": 0, "verl": 0, "disagree": 0, "mv_only": 0,
                                    "verl_only": 0, "timeouts": 0})
        t["n"] += 1
        t["math_verify"] += r["mv"] == 1
        t["verl"] += r["verl"] == 1
        t["disagree"] += r["mv"] != r["verl"]
        t["mv_only"] += r["mv"] > r["verl"]
        t["verl_only"] += r["verl"] > r["mv"]
        t["timeouts"] += r["timeout"]
    return out


def table(t: dict, label: str, why: dict | None = None) -> str:
    head = f"| {label} | n | math-verify 1 | verl 1 | disagree | only math-verify | only verl |" + (
        " why |" if why else "")
    lines = [head, "|" + "---|" * (7 + bool(why))]
    for k, v in t.items():
        pct = 100 * v["disagree"] / max(v["n"], 1)
        lines.append(f"| {k} | {v['n']} | {v['math_verify']} | {v['verl']} | {v['disagree']} ({pct:.1f}%) | "
                     f"{v['mv_only']} | {v['verl_only']} |" + (f" {why.get(k, '')} |" if why else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of verl-format parquet/jsonl files")
    ap.add_argument("--max_per_file", type=int, default=None, help="first N ground truths of each file")
    ap.add_argument("--strings", type=int, default=400, help="model-like whole responses for b)")
    ap.add_argument("--timeout_s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/reward_agreement.json")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "*.parquet")) + glob.glob(os.path.join(args.data, "*.jsonl")))
    if not files:
        raise SystemExit(f"no .parquet / .jsonl files in {args.data}")
    t0 = time.perf_counter()
    rows, gts = [], []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        answers = [str(r["answer"]).strip() for r in read_records(path)[0]][:args.max_per_file]
        gts += answers
        for g in answers:
            for kind, (rewrite, _) in REWRITES.items():
                try:
                    a = rewrite(g)
                except (ValueError, IndexError):
                    a = None
                if a is None:
                    continue
                mv, verl, to = scores(ENDINGS["dollar_box"](a), g, args.timeout_s)
                rows.append({"file": name, "kind": kind, "gt": g, "answer": a, "mv": mv, "verl": verl, "timeout": to})
    rng = random.Random(args.seed)
    strings = []
    kinds = list(REWRITES)
    while len(strings) < args.strings:
        g, kind, end = rng.choice(gts), rng.choice(kinds), rng.choice(list(ENDINGS))
        a = REWRITES[kind][0](g)
        if a is None:
            continue
        response = ENDINGS[end](a)
        mv, verl, to = scores(response, g, args.timeout_s)
        strings.append({"ending": end, "kind": kind, "gt": g, "response": response, "mv": mv, "verl": verl,
                        "timeout": to})
    seconds = time.perf_counter() - t0
    by_kind, by_file = tally(rows, "kind"), tally(rows, "file")
    by_end, str_kind = tally(strings, "ending"), tally(strings, "kind")
    print("a) rewrites of the ground truths, in `Thus the answer is $\\boxed{..}$.`\n")
    print(table(by_kind, "rewrite", {k: w for k, (_, w) in REWRITES.items()}))
    print("\nper file (all rewrites)\n")
    print(table(by_file, "file"))
    print(f"\nb) {len(strings)} model-like responses, by ending\n")
    print(table(by_end, "ending"))
    n_all, d_all = len(rows) + len(strings), sum(r["mv"] != r["verl"] for r in rows + strings)
    self_rows = by_kind.get("self", {"n": 0, "disagree": 0})
    print(f"\nground truths: {len(gts)}; a) {len(rows)} checks, {sum(v['disagree'] for v in by_kind.values())} "
          f"disagree; self-match disagreements {self_rows['disagree']} of {self_rows['n']}; "
          f"b) {sum(v['disagree'] for v in by_end.values())} of {len(strings)} disagree; "
          f"all: {d_all} of {n_all}; {seconds:.0f} s")
    disagreeing = [r for r in rows if r["mv"] != r["verl"]]
    examples = {k: [r for r in disagreeing if r["kind"] == k][:10] for k in REWRITES}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "seconds": seconds, "files": [os.path.basename(p) for p in files],
                   "num_ground_truths": len(gts), "by_kind": by_kind, "by_file": by_file,
                   "strings_by_ending": by_end, "strings_by_kind": str_kind,
                   "self_disagreements": [r for r in disagreeing if r["kind"] == "self"],
                   "examples": {k: v for k, v in examples.items() if v}}, f, indent=2)
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
