"""verl's math.compute_score convention (train.reward=verl_math) beside math-verify.

The table's two verdict columns are math-verify's (rewards.math_reward) and verl's. The
verl column was checked against verl's own reward_score/math_reward.py (volcengine/verl,
Nov 2025) when written: that file and oisd_jax.rewards_verl agreed on these cases and on
300k fuzzed strings (bench/reward_agreement.py explains the disagreements).
"""
import pytest

from oisd_jax.rewards import RewardPool, math_reward, score_one
from oisd_jax.rewards_verl import hendrycks_equiv, hendrycks_normalize, verl_last_boxed, verl_math_reward

# (response, ground truth, math-verify, verl math.compute_score)
CASES = [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{\tfrac12}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{0.25}", r"\frac{1}{4}", 1, 0),  # no maths: 0.25 is not \frac{1}{4}
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1, 0),  # unreduced
    (r"\boxed{-\frac{2}{3}}", r"-2/3", 1, 0),  # a/b -> \frac only for plain integers: -2/3 -> \frac{-2}{3}
    (r"\boxed{\frac{-2}{3}}", r"-2/3", 1, 1),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1, 0),
    (r"\boxed{\frac{\sqrt3}{2}}", r"\frac{\sqrt{3}}{2}", 1, 1),
    (r"\boxed{10.0}", r"10", 1, 0),  # trailing .0 kept
    (r"\boxed{.5}", r"0.5", 1, 1),
    (r"\boxed{1,000}", r"1000", 1, 0),  # thousands comma kept
    (r"\boxed{1000}", r"1,000", 1, 0),
    (r"\boxed{1{,}000}", r"1000", 1, 0),
    (r"\boxed{3.}", r"3", 0, 0),
    (r"\boxed{3}.", r"3", 1, 1),
    (r"\boxed{-3}", r"3", 0, 0),
    (r"\boxed{5\text{ cm}}", r"5", 1, 1),
    (r"\boxed{5\text{cm}}", r"5", 1, 0),  # units cut only after '\text{ ' (with a space)
    (r"\boxed{5 \text{ cm}^2}", r"5\text{ cm}^2", 1, 1),
    (r"\boxed{\text{5}}", r"5", 1, 0),  # \text{} is not unwrapped
    (r"\boxed{\text{(C)}}", r"C", 1, 0),
    (r"\boxed{\textbf{(C)}}", r"\text{(C)}", 1, 0),
    (r"\boxed{\$18.90}", r"18.90", 1, 1),
    (r"\boxed{25\%}", r"25", 1, 1),
    (r"\boxed{90^\circ}", r"90", 1, 1),
    (r"\boxed{90^{\circ}}", r"90", 1, 1),
    (r"\boxed{90^\circ}", r"\frac{\pi}{2}", 0, 0),
    (r"\boxed{(1, 2]}", r"(1,2]", 1, 1),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1, 1),
    (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1, 1),
    (r"\boxed{[-1,2)}", r"[-1, 2)", 1, 1),
    (r"\boxed{(-\infty, 0) \cup (1, \infty)}", r"(-\infty,0)\cup(1,\infty)", 1, 1),
    (r"\boxed{(1,\infty)\cup(-\infty,0)}", r"(-\infty,0)\cup(1,\infty)", 1, 0),  # order
    (r"\boxed{\{2,1\}}", r"\{1,2\}", 1, 0),  # set order
    (r"\boxed{2, 1}", r"1, 2", 1, 0),  # order
    (r"\boxed{x=3}", r"3", 1, 1),
    (r"\boxed{x = 3}", r"3", 1, 1),
    (r"\boxed{xyz=3}", r"3", 1, 0),  # prefix longer than 2 characters
    (r"\boxed{y=2x+1}", r"2x+1", 1, 1),
    (r"\boxed{2x+1}", r"1+2x", 1, 0),  # commuted
    (r"\boxed{\sqrt{2}}", r"\sqrt2", 1, 1),
    (r"\boxed{2\pi}", r"2 \pi", 1, 1),
    (r"\boxed{\pi}", r"3.14159", 0, 0),
    (r"\boxed{\infty}", r"\infty", 1, 1),
    (r"\boxed{e^{i\pi}}", r"-1", 0, 0),
    (r"first \boxed{7} then \boxed{12}", r"12", 1, 1),
    (r"first \boxed{12} then \boxed{7}", r"12", 0, 0),
    (r"\fbox{4}", r"4", 1, 0),  # verl finds \fbox but remove_boxed refuses it
    (r"so \boxed 4$.", r"4", 1, 1),
    (r"\boxed 4 and then \boxed{5}", r"5", 1, 0),  # '\boxed ' anywhere wins over a later \boxed{}
    (r"\boxed{12", r"12", 0, 0),
    (r"no box: 12", r"12", 0, 0),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", 1, 1),
]


@pytest.mark.parametrize("response,gt,mv,verl", CASES)
def test_both_scorers_side_by_side(response, gt, mv, verl):
    assert verl_math_reward(response, gt) == verl
    assert math_reward(response, gt, timeout_s=None) == mv


def test_the_table_covers_disagreements_both_ways():
    # Where they differ it is nearly always verl refusing an equivalent form; the table
    # must keep cases of both kinds of verdict.
    assert sum(mv > verl for _, _, mv, verl in CASES) >= 15
    assert sum(mv == verl == 1 for _, _, mv, verl in CASES) >= 15


@pytest.mark.parametrize("s,want", [
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    (r"\frac34", r"\frac{3}{4}"),
    (r"\frac3{4}", r"\frac{3}{4}"),
    ("3/4", r"\frac{3}{4}"),
    ("03/4", "03/4"),  # not plain integers: kept
    ("0.5", r"\frac{1}{2}"),
    (".5", r"\frac{1}{2}"),  # a leading "." gets its 0 first
    (r"\left( 1, 2 \right]", "(1,2]"),
    (r"10\text{ inches}", "10"),
    (r"10\text{inches}", r"10\text{inches}"),
    (r"45^{\circ}", "45"),
    (r"\$5", "5"),
    (r"50\%", "50"),
    ("k = 7", "7"),
    ("a=b=7", "a=b=7"),  # two "=": kept
    (r"2\sqrt3", r"2\sqrt{3}"),
    ("1,000.", "1,000."),  # commas and trailing periods are not Hendrycks' business
    ("", ""),
])
def test_hendrycks_normalize(s, want):
    assert hendrycks_normalize(s) == want


def test_unnormalisable_strings_compare_raw():
    # verl's is_equiv: a normalisation step that raises -> plain string equality
    two_units = r"5\text{ m}\text{ s}"
    for bad in (two_units, "2\\sqrt", "1+\\frac"):
        with pytest.raises(ValueError, match="not normalisable"):
            hendrycks_normalize(bad)
        assert hendrycks_equiv(bad, bad)
    assert not hendrycks_equiv(two_units, "5")


def test_extraction_quirks():
    assert verl_last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert verl_last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert verl_last_boxed(r"\boxed 7$ and $\boxed{8}") == "7"  # '\boxed ' anywhere wins
    assert verl_last_boxed(r"\boxedfoo{3}") is None
    assert verl_last_boxed(r"\fbox{3}") is None
    assert verl_last_boxed(r"\boxed{1} \boxed{2") is None  # an unclosed last box: no fallback
    assert verl_last_boxed("") is None


def test_verl_math_through_the_pool():
    responses = [r for r, *_ in CASES]
    answers = [g for _, g, *_ in CASES]
    assert [score_one("verl_math", r, g, 1.0) for r, g in zip(responses, answers)] == [
        (float(v), False) for *_, v in CASES]
    with RewardPool("verl_math", workers=1, timeout_s=2.0) as pool:
        assert pool.score(responses, answers).tolist() == [float(v) for *_, v in CASES]
