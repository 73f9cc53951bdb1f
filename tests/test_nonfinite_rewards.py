"""NaN/inf rewards (issue 16): a broken reward function or worker result is a counted failure
scored 0, never a NaN in the advantages; a batch with no finite reward stops the run.

Before: one NaN reward made its prompt group's mean and std NaN, so every advantage of the
group was NaN, the update's loss was NaN and the in-jit check skipped it (counted as a
divergence, not as the reward's fault); an inf reward did the same.
"""
import numpy as np
import pytest

from oisd_jax import cli, rewards, rollout
from tiny_run import tiny_config


class _Pool:
    kind = "fake"

    def __init__(self, values):
        self.values, self.num_nonfinite = np.asarray(values, np.float32), 0

    def score(self, responses, answers):
        return self.values[:len(responses)]


def test_score_zeroes_and_counts_nonfinite(caplog):
    pool = _Pool([1.0, np.nan, 0.0, np.inf, -np.inf, 1.0])
    with caplog.at_level("WARNING"):
        r = rollout.score(pool, ["a"] * 6, ["1"] * 6)
        r2 = rollout.score(pool, ["a"] * 6, ["1"] * 6)
    assert r.dtype == np.float32 and r.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0] and r2.tolist() == r.tolist()
    assert pool.num_nonfinite == 6
    assert sum("non-finite" in m for m in caplog.messages) == 1  # warned once, counted always
    assert rollout.score(_Pool([0.5, 1.0]), ["a", "b"], ["1", "1"]).tolist() == [0.5, 1.0]


def test_all_nonfinite_is_one_clear_line():
    with pytest.raises(rollout.RewardNotFinite) as info:
        rollout.score(_Pool([np.nan] * 4), ["x"] * 4, ["1"] * 4)
    assert cli.is_user_error(info.value)
    line = cli.one_line(info.value)
    assert "all 4 rewards of a batch are non-finite" in line and "'fake'" in line and "\n" not in line


def test_trainer_counts_nonfinite_rewards_and_keeps_advantages_finite(monkeypatch, tmp_path):
    """Trainer level: the pool's results for 3 of each step's 8 rollouts are NaN, +inf, -inf."""
    from oisd_jax import train as T
    from oisd_jax.metrics import read_jsonl
    real = rewards.RewardPool.score

    def poisoned(self, responses, answers):
        r = np.array(real(self, responses, answers), np.float32)
        r[:3] = [np.nan, np.inf, -np.inf]
        return r
    monkeypatch.setattr(rewards.RewardPool, "score", poisoned)
    seen = []
    compute = T.advantages.compute
    monkeypatch.setattr(T.advantages, "compute", lambda *a, **k: seen.append(np.asarray(compute(*a, **k))) or seen[-1])
    config = tiny_config(train__sft_warmup_steps=0, train__checkpoint_every=0, train__max_skipped_updates=1)
    T.train(config, str(tmp_path / "run"))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["reward_nonfinite"] for r in rows] == [3, 6]  # cumulative, like reward_timeouts
    assert len(seen) == 2 and all(np.isfinite(a).all() for a in seen)
    assert all(np.isfinite(r["reward"]) and np.isfinite(r["loss"]) and r["update_skipped"] == 0 for r in rows)


def test_trainer_stops_when_no_reward_is_finite(monkeypatch, tmp_path):
    from oisd_jax.train import train
    monkeypatch.setattr(rewards.RewardPool, "score", lambda self, r, a: np.full(len(r), np.nan, np.float32))
    config = tiny_config(train__sft_warmup_steps=0, train__checkpoint_every=0, train__steps=1)
    with pytest.raises(rollout.RewardNotFinite, match="all 8 rewards of a batch are non-finite"):
        train(config, str(tmp_path / "run"))
