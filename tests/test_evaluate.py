"""Evaluation: the unbiased Pass@k against brute force, and the CLI's numbers recomputed
by hand from its per-sample dump (plus resume after a crash)."""
import itertools
import json
import math
import os

import numpy as np
import pytest

from oisd_jax import evaluate as E


def _pass_brute(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c of them correct) with a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert E.pass_at_k(n, c, k) == pytest.approx(_pass_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_large_n():
    # n=32 (AIME's k): 1 - C(n-c, k) / C(n, k) with exact integers
    for c in range(33):
        for k in (1, 2, 4, 8, 16, 32):
            want = 1 - math.comb(32 - c, k) / math.comb(32, k)
            assert E.pass_at_k(32, c, k) == pytest.approx(want, abs=1e-12)
    assert E.pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 is the mean accuracy


@pytest.mark.parametrize("bad", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects(bad):
    with pytest.raises(ValueError):
        E.pass_at_k(*bad)


def test_avg_and_summarize():
    rng = np.random.default_rng(0)
    a = (rng.random((7, 8)) < 0.4).astype(np.float32)
    s = E.summarize(a)
    assert set(s) == {"avg@8", "pass@1", "pass@2", "pass@4", "pass@8"}
    assert s["avg@8"] == pytest.approx(a.mean())
    assert s["pass@1"] == pytest.approx(a.mean())  # unbiased pass@1 == avg@k
    assert s["pass@8"] == pytest.approx((a.max(1) > 0).mean())
    c = a.sum(1).astype(int)
    assert s["pass@2"] == pytest.approx(np.mean([_pass_brute(8, int(ci), 2) for ci in c]))
    with pytest.raises(ValueError):
        E.avg_at_k(np.zeros((0, 4)))


def test_format_table():
    res = {"benchmarks": {"a": {"problems": 2, "k": 4, "avg@4": 0.5, "pass@1": 0.5, "pass@4": 1.0},
                          "bb": {"problems": 3, "k": 2, "avg@2": 0.25, "pass@1": 0.25, "pass@2": 0.5}},
           "mean": {"avg": 0.375, "pass@1": 0.375}}
    lines = E.format_table(res).splitlines()
    assert lines[0].split() == ["benchmark", "n", "k", "Avg@k", "Pass@1", "Pass@2", "Pass@4"]
    assert lines[2].split() == ["a", "2", "4", "50.00", "50.00", "-", "100.00"]
    assert lines[-1].split() == ["mean", "37.50", "37.50", "-", "-"]
