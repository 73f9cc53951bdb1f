"""verl's `math.compute_score`, the paper pipeline's reward (`train.reward=verl_math`).

BuPO's public verl fork (whose parquet files are the ones this project trains and evaluates
on) scores deepmath-5k and the four eval sets with verl's `reward_score/math` (renamed
`math_reward.py` in late 2025, same code): the last `\\boxed{...}`, the Hendrycks MATH
string normalisation (lm-evaluation-harness's `hendrycks_math`), then exact string match.
No maths: `0.25` and `\\frac14` differ, `1,000` and `1000` differ.

This is our own code for that convention, written to give verl's verdict on every input,
quirks included (each one named below, and pinned in tests/test_rewards_verl.py):
- Extraction: if the text contains `\\boxed ` (with a space) anywhere, the answer is the
  text after its LAST occurrence up to the next `$`, even when a `\\boxed{..}` follows.
  Otherwise the last `\\boxed`: the next character must be `{` and braces are matched
  without escapes. `\\fbox{..}` is found but always scores 0 (verl's `remove_boxed`
  asserts a `\\boxed{` prefix). An unclosed last box scores 0.
- Normalisation of BOTH answer and ground truth (the ground truth is not unboxed):
  newlines, `\\!`, `\\\\` -> `\\`, `tfrac`/`dfrac` -> `frac`, `\\left`/`\\right`,
  `^{\\circ}`/`^\\circ`, `\\$`, units after the first `\\text{ ` (with a space; `\\text{cm}`
  stays), `\\%`, ` .`/`{.` -> ` 0.`/`{0.`, a leading `.` -> `0.`, a prefix `k=` or `xy=`
  (left side of at most 2 characters, one `=` only), `\\sqrt3` -> `\\sqrt{3}`, all spaces,
  `\\frac12` -> `\\frac{1}{2}`, exactly `0.5` -> `\\frac{1}{2}`, `a/b` of two plain integers
  -> `\\frac{a}{b}`. Not stripped: `\\text{..}` without the space, trailing periods,
  thousands commas, `$`, `\\,`, `\\dfrac` vs `\\frac` only (handled), `x \\in`.
- A normalisation step that fails (two `\\text{ ` units, `\\sqrt` or `\\frac` at the very
  end) makes the comparison the raw strings' equality, as verl's `is_equiv` does.
Pure string work, linear in the text: no sympy, nothing eval'd. In training it still runs
in the RewardPool's worker processes like every reward (rewards.score_one).
"""
from __future__ import annotations

_SPACE_BOX = "\\boxed "


class _NotNormalisable(Exception):
    """A step of the normalisation has no answer for this string (verl: an exception)."""


def verl_last_boxed(text: str) -> str | None:
    """The answer verl's `last_boxed_only_string` + `remove_boxed` extract, or None (score 0)."""
    if _SPACE_BOX in text:
        return text.split(_SPACE_BOX)[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        return None  # no \boxed; a last \fbox is found by verl but never passes remove_boxed
    brace = start + len("\\boxed")
    if brace >= len(text) or text[brace] != "{":
        return None
    depth = 0
    for j in range(brace, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:j]
    return None


def _units_off(s: str) -> str:
    # Hendrycks: "\text{ " only ever starts units in MATH's answers; two of them are an error.
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _NotNormalisable(s)
    return parts[0]


def _braced_sqrt(s: str) -> str:
    parts = s.split("\\sqrt")
    out = [parts[0]]
    for rest in parts[1:]:
        if not rest:
            raise _NotNormalisable(s)
        out.append("\\sqrt" + rest if rest[0] == "{" else "\\sqrt{" + rest[0] + "}" + rest[1:])
    return "".join(out)


def _braced_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for rest in parts[1:]:
        out += "\\frac"
        if not rest:
            raise _NotNormalisable(s)
        if rest[0] == "{":
            out += rest
        elif len(rest) < 2:
            return s  # `\frac1` at the end: the whole fix is dropped
        elif rest[1] == "{":
            out += "{" + rest[0] + "}" + rest[1:]
        else:
            out += "{" + rest[0] + "}{" + rest[1] + "}" + rest[2:]
    return out


def _slash_frac(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def hendrycks_normalize(s: str) -> str:
    """Hendrycks MATH's `strip_string`, step for step (see the module docstring).

    Raises ValueError where verl's raises (the comparison then falls back to raw equality).
    """
    try:
        return _normalize(s)
    except (_NotNormalisable, IndexError) as e:
        raise ValueError(f"not normalisable: {s!r}") from e


def _normalize(s: str) -> str:
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = _units_off(s)
    s = s.replace("\\\\%", "").replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs_rhs = s.split("=")
    if len(lhs_rhs) == 2 and len(lhs_rhs[0]) <= 2:  # "k = 3", "xy=3" -> the right side
        s = lhs_rhs[1]
    if "\\sqrt" in s:
        s = _braced_sqrt(s)
    s = _braced_fracs(s.replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_frac(s)


def hendrycks_equiv(answer: str, ground_truth: str) -> bool:
    """Exact match of the normalised strings; raw equality where either cannot be normalised."""
    try:
        return hendrycks_normalize(answer) == hendrycks_normalize(ground_truth)
    except ValueError:
        return answer == ground_truth


def verl_math_reward(response: str, ground_truth: str) -> float:
    """1.0 iff verl's `math.compute_score(response, ground_truth)` would give 1.0."""
    answer = verl_last_boxed(str(response))
    return float(answer is not None and hendrycks_equiv(answer, str(ground_truth)))
