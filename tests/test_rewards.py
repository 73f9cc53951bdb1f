"""Rewards: last-box extraction, math-verify equivalences, strict matching, time bounds, pool."""
import builtins
import os
import signal

import numpy as np
import pytest

from oisd_jax import rewards
from oisd_jax.rewards import RewardPool, extract_boxed, math_reward, normalize_answer, strict_reward

# (response, ground truth, expected math reward)
MATH_CASES = [
    (r"so \boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\frac12}", "0.5", 1.0),
    (r"\boxed{0.75}", r"\dfrac{3}{4}", 1.0),
    (r"\boxed{10.0}", "10", 1.0),
    (r"\boxed{1000}", "1,000", 1.0),
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{-\frac{2}{3}}", "-2/3", 1.0),
    (r"\boxed{(1, 2]}", "(1,2]", 1.0),
    (r"\boxed{[-1,2)}", "[-1, 2)", 1.0),
    (r"\boxed{(-1,2)}", "[-1, 2)", 0.0),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{5}", r"5\text{ cm}", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{\infty}", r"\infty", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{3}}{2}", 0.0),
    (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{x=3}", "3", 1.0),
    (r"\boxed{\text{(C)}}", "C", 1.0),
    (r"first \boxed{7} then \boxed{12}", "12", 1.0),
    (r"first \boxed{12} then \boxed{7}", "12", 0.0),
    (r"\boxed{2} and \fbox{4}", "4", 1.0),
    (r"The answer is 12.", "12", 0.0),
    ("", "12", 0.0),
    (r"\boxed{}", "12", 0.0),
    (r"\boxed{12", "12", 0.0),
    (r"\boxed{13}", "12", 0.0),
    (r"\boxed 42$ done", "42", 1.0),
    (r"\boxed{42}", r"\boxed{42}", 1.0),
    (r"$x = \boxed{\frac{a+b}{2}}$", r"\frac{b+a}{2}", 1.0),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1.0),
]


@pytest.mark.parametrize("response,gt,expected", MATH_CASES)
def test_math_reward(response, gt, expected):
    assert math_reward(response, gt) == expected


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"a \boxed{1} b \boxed{ {x}^{2} } c", "{x}^{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{a \\ b}", r"a \\ b"),
    (r"\fbox{7}", "7"),
    (r"\boxed 42$", "42"),
    (r"\boxed{12", None),
    (r"\boxed{1} \boxed{2", None),  # the last box is truncated: no fallback to an earlier one
    (r"\boxedx{3}", None),
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("response,gt,expected", [
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{ \left( 3, \frac{\pi}{2} \right) }", r"(3,\frac{\pi}{2})", 1.0),
    (r"\boxed{\text{Yes}.}", "Yes", 1.0),
    (r"\boxed{$5$}", "5", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 0.0),  # strict: no maths
    (r"\boxed{1}\boxed{2}", "1", 0.0),
    ("2", "2", 0.0),
])
def test_strict_reward(response, gt, expected):
    assert strict_reward(response, gt) == expected


def test_normalize_answer():
    assert normalize_answer(r" \text{ 5 } cm. ") == "5cm"
    assert normalize_answer(r"\left[ 1,\! 2 \right)") == "[1,2)"
    assert normalize_answer(r"\tfrac{1}{2}") == r"\frac{1}{2}"


ADVERSARIAL = [
    r"\boxed{__import__('os').system('touch {marker}')}",
    r"\boxed{exec(\"open('{marker}', 'w')\")}",
    r"\boxed{eval(\"__import__('os').system('touch {marker}')\")}",
    "__import__('os').system('touch {marker}') \\boxed{__import__('os')}",
    r"\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    r"\boxed{" * 50000,
    r"\boxed{" + r"\frac{" * 3000 + "1" + "}{2}" * 3000 + "}",
]


def _adversarial(tmp_path):
    marker = str(tmp_path / "pwned")
    return marker, [a.replace("{marker}", marker) for a in ADVERSARIAL]


def test_adversarial_inputs_are_not_executed(tmp_path, monkeypatch):
    marker, texts = _adversarial(tmp_path)
    # sympy itself exec's "from sympy import *" on import; what must never reach eval/exec
    # is the model's text.
    calls = []
    real_eval, real_exec = builtins.eval, builtins.exec
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: calls.append(str(a[0])) or real_eval(*a, **k))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: calls.append(str(a[0])) or real_exec(*a, **k))
    for text in texts:
        assert rewards.score_one("math", text, "0", 2.0) == (0.0, False)
        assert strict_reward(text, "0") == 0.0
    assert not [c for c in calls if "__import__" in c or "pwned" in c or "open(" in c]
    assert not os.path.exists(marker)


def test_pathological_answer_times_out_in_main_thread():
    # 9^(9^(9^9)) is short, parses fine, and sympy would evaluate it for hours.
    reward, timed_out = rewards.score_one("math", r"\boxed{9^{9^{9^{9}}}}", "1", 0.3)
    assert (reward, timed_out) == (0.0, True)
    # our alarm is gone again: a later slow-ish call is not interrupted by a stale timer
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    assert math_reward(r"\boxed{(1,2]}", "(1, 2]") == 1.0


@pytest.fixture(scope="module")
def pool():
    # generous: the machine may be busy, and only the pathological case should time out
    with RewardPool("math", workers=2, timeout_s=3.0) as p:
        yield p


def test_pool_matches_direct_calls(pool, tmp_path):
    marker, texts = _adversarial(tmp_path)
    responses = [c[0] for c in MATH_CASES] + texts + [r"\boxed{9^{9^{9^{9}}}}"]
    answers = [c[1] for c in MATH_CASES] + ["0"] * len(texts) + ["1"]
    before = pool.num_timeouts
    got = pool.score(responses, answers)
    assert got.dtype == np.float32 and got.shape == (len(responses),)
    expected = np.array([c[2] for c in MATH_CASES] + [0.0] * (len(texts) + 1), np.float32)
    np.testing.assert_array_equal(got, expected)
    assert pool.num_timeouts >= before + 1  # at least the power tower
    assert not os.path.exists(marker)


def test_pool_submit_is_async_and_ordered(pool):
    f1 = pool.submit([r"\boxed{2}", r"\boxed{3}"], ["2", "2"])
    f2 = pool.submit([r"\boxed{1/2}"], ["0.5"])
    f3 = pool.submit([], [])
    np.testing.assert_array_equal(f2.result(timeout=60), [1.0])
    np.testing.assert_array_equal(f1.result(timeout=60), [1.0, 0.0])
    assert f3.result(timeout=60).shape == (0,)
    with pytest.raises(ValueError):
        pool.submit(["a"], [])


def test_pool_replaces_dead_and_hung_workers(monkeypatch):
    monkeypatch.setattr(rewards, "_KILL_GRACE_S", 0.2)
    with RewardPool("math", workers=1, timeout_s=1.0) as p:
        np.testing.assert_array_equal(p.score([r"\boxed{4}"], ["4"]), [1.0])
        p._workers[0].proc.kill()  # a crash between jobs: replaced, nothing lost
        np.testing.assert_array_equal(p.score([r"\boxed{4}", r"\boxed{5}"], ["4", "4"]), [1.0, 0.0])
        # A worker that ignores its own alarm (stopped here, stuck in C code in real life)
        # is killed at the deadline; its item scores 0 and counts as a timeout.
        os.kill(p._workers[0].proc.pid, signal.SIGSTOP)
        np.testing.assert_array_equal(p.score([r"\boxed{4}"], ["4"]), [0.0])
        assert p.num_timeouts == 1 and p.num_worker_restarts == 2
        np.testing.assert_array_equal(p.score([r"\boxed{4}"], ["4"]), [1.0])


def test_strict_pool_and_thread_fallback():
    import threading

    with RewardPool("strict", workers=1, timeout_s=1.0) as p:
        np.testing.assert_array_equal(
            p.score([r"\boxed{\dfrac{1}{2}}", r"\boxed{0.5}"], [r"\frac12", r"\frac12"]),
            [strict_reward(r"\boxed{\dfrac{1}{2}}", r"\frac12"), 0.0])
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward(r"\boxed{0.5}", "1/2")))
    t.start()
    t.join(60)
    assert out == [1.0]  # off the main thread, the check runs in the shared worker process


def test_bad_arguments():
    with pytest.raises(ValueError):
        RewardPool("fuzzy")
    with pytest.raises(ValueError):
        rewards.score_one("fuzzy", "", "", None)
