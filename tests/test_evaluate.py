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


# ----------------------------------------------------------------------------- on a tiny run
def _by_hand(dump_path, k_of):
    """Avg@k / Pass@k per benchmark straight from the dump lines, with math.comb."""
    groups = {}
    for line in open(dump_path):
        r = json.loads(line)
        groups.setdefault(r["benchmark"], {}).setdefault(r["index"], {})[r["sample"]] = r["reward"]
    out = {}
    for name, probs in groups.items():
        k = k_of[name]
        assert all(sorted(g) == list(range(k)) for g in probs.values())
        c = [int(sum(g.values())) for g in probs.values()]
        out[name] = {"problems": len(probs), f"avg@{k}": sum(c) / (k * len(c))}
        for kk in (1, 2, 4):
            if kk <= k:
                out[name][f"pass@{kk}"] = float(np.mean([1 - math.comb(k - ci, kk) / math.comb(k, kk) for ci in c]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from oisd_jax import run_files
    from tiny_run import tiny_run
    run_dir = tiny_run(tmp_path_factory)
    run = run_files.load_run(run_dir)
    # a file-based benchmark next to the held-out synthetic one (chat prompts, verl fields)
    path = tmp_path_factory.mktemp("evalset") / "mini.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"what is {a}+{b}?"}], "reward_model": {"ground_truth": str(a + b)}}
            for a, b in [(3, 4), (10, 20), (55, 1)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.config.data.eval_sets["mini"] = {"path": str(path), "k": 2}
    return run_dir, run


def test_evaluate_dump_recomputed_by_hand_and_resume(tiny, tmp_path):
    from oisd_jax.rewards import strict_reward
    _, run = tiny
    benches = E.load_benchmarks(run.config, run.tokenizer, ["synthetic", "mini"], limit=6)
    assert [len(benches["synthetic"][0]), benches["synthetic"][1], len(benches["mini"][0]), benches["mini"][1]] == [6, 4, 3, 2]
    out = tmp_path / "eval"
    res = E.evaluate(run, benches, str(out), seed=3, progress=False)
    dump = out / E.SAMPLES_FILE
    lines = dump.read_text().splitlines()
    assert len(lines) == 6 * 4 + 3 * 2
    for r in map(json.loads, lines):  # every reward is the training reward of that text
        assert r["reward"] == strict_reward(r["response"], r["answer"])
        assert 0 < r["length"] <= run.config.sampler.max_new_tokens
    hand = _by_hand(dump, {"synthetic": 4, "mini": 2})
    for name, want in hand.items():
        got = res["benchmarks"][name]
        for key, v in want.items():
            assert got[key] == pytest.approx(v), (name, key)
    assert res["mean"]["avg"] == pytest.approx((hand["synthetic"]["avg@4"] + hand["mini"]["avg@2"]) / 2)
    assert json.loads((out / E.RESULTS_FILE).read_text()) == res
    assert "mean" in E.format_table(res)

    # A crash mid-way through a line of the last chunk (synthetic problems 4 and 5; problem 4
    # complete): that chunk is redone whole, with the same key, so the same samples come back.
    order = [(r["benchmark"], r["index"]) for r in map(json.loads, lines)]
    cut = order.index(("synthetic", 5)) + 1
    assert order[cut - 5] == ("synthetic", 4)
    dump.write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:25])
    res2 = E.evaluate(run, benches, str(out), seed=3, progress=False)
    assert res2 == res
    assert dump.read_text().splitlines() == lines  # the same samples, nothing duplicated
    with pytest.raises(ValueError, match="another evaluation"):
        E.evaluate(run, benches, str(out), seed=4, progress=False)


def test_evaluate_with_the_continuous_engine_equals_static(tiny, tmp_path):
    """sampler.engine in the run's config is what evaluation samples with: the continuous
    engine (3 slots for 6 x 4 + 3 x 2 requests, pages of 4 tokens) dumps the same samples
    and results as the static one."""
    import copy
    import dataclasses
    _, run = tiny
    benches = E.load_benchmarks(run.config, run.tokenizer, ["synthetic", "mini"], limit=6)
    dumps, results = {}, {}
    for engine in ("static", "continuous"):
        config = copy.deepcopy(run.config)
        with config.unlocked():
            config.sampler.update(engine=engine, slots=3, page_size=4)
        r = dataclasses.replace(run, config=config)
        sampler = E.make_sampler(config, run.model_cfg)[0]  # the (cached) Sampler evaluate uses
        assert sampler.engine == engine
        results[engine] = E.evaluate(r, benches, str(tmp_path / engine), seed=3, progress=False)
        assert (sampler.last_stats is not None) == (engine == "continuous")  # the engine that ran
        dumps[engine] = (tmp_path / engine / E.SAMPLES_FILE).read_text()
    assert dumps["continuous"] == dumps["static"] and results["continuous"] == results["static"]


def test_evaluate_with_the_verl_scorer(tiny, tmp_path):
    """reward='verl_math' scores the dump with verl's math.compute_score convention, and a
    folder holding one scorer's samples refuses another's."""
    from oisd_jax.rewards_verl import verl_math_reward
    _, run = tiny
    benches = E.load_benchmarks(run.config, run.tokenizer, ["mini"], limit=3)
    out = tmp_path / "eval"
    res = E.evaluate(run, benches, str(out), seed=3, progress=False, reward="verl_math")
    rows = [json.loads(x) for x in (out / E.SAMPLES_FILE).read_text().splitlines()]
    assert len(rows) == 3 * 2 and res["benchmarks"]["mini"]["problems"] == 3
    assert all(r["reward"] == verl_math_reward(r["response"], r["answer"]) for r in rows)
    with pytest.raises(ValueError, match="another evaluation"):
        E.evaluate(run, benches, str(out), seed=3, progress=False)  # the run's own scorer: strict


def test_command_lines(tiny, tmp_path):
    """export -> evaluate --hf -> analyze, as a user types them (separate processes)."""
    import subprocess
    import sys
    run_dir, _ = tiny
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    hf, out, pics = tmp_path / "hf", tmp_path / "eval", tmp_path / "pics"

    def sh(*args):
        p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    sh("oisd_jax.export", f"--workdir={run_dir}", f"--out={hf}", "--step=1")
    table = sh("oisd_jax.evaluate", "--config=configs/tiny.py", f"--hf={hf}", "--benchmarks=synthetic",
               "--limit=3", "--k=2", f"--out={out}", "--config.train.reward=strict",
               "--config.train.reward_workers=1", "--config.sampler.max_new_tokens=6",
               "--config.sampler.batch_size=2", "--config.mesh.shape=(1,-1,1)")
    res = json.loads((out / E.RESULTS_FILE).read_text())
    assert res["source"] == f"hf:{hf}" and res["benchmarks"]["synthetic"]["problems"] == 3
    hand = _by_hand(out / E.SAMPLES_FILE, {"synthetic": 2})["synthetic"]
    assert res["benchmarks"]["synthetic"]["avg@2"] == pytest.approx(hand["avg@2"])
    assert "synthetic" in table and "mean" in table and "Pass@2" in table
    sh("oisd_jax.analyze", f"--workdir={run_dir}", f"--out={pics}", "--what=curves")
    assert (pics / "curves.png").stat().st_size > 1000
