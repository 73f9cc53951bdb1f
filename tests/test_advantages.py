"""Advantage estimators vs float64 NumPy references written from docs/method.md / verl."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax.rl import advantages


def np_grpo(r, eps=1e-6, norm_by_std=True):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        g = r[b]
        if len(g) == 1:  # a group of one sample has mean 0, std 1
            mean, std = 0.0, 1.0
        else:
            mean, std = g.mean(), g.std(ddof=1)
        out[b] = (g - mean) / (std + eps) if norm_by_std else g - mean
    return out


def np_rloo(r):
    r = np.asarray(r, np.float64)
    b, g = r.shape
    if g == 1:
        return r.copy()
    out = np.zeros_like(r)
    for i in range(b):
        for j in range(g):
            out[i, j] = r[i, j] - np.delete(r[i], j).mean()
    return out


def np_reinforce_pp(r, w=None, eps=1e-6):
    r = np.asarray(r, np.float64)
    w = np.ones_like(r) if w is None else np.asarray(w, np.float64)
    # Expand frequency weights into repeated samples: the definition, not the formula.
    samples = np.repeat(r.ravel(), w.ravel().astype(int))
    mean, std = samples.mean(), samples.std(ddof=1)
    return np.where(w > 0, (r - mean) / (std + eps), 0.0)


@pytest.fixture
def rewards():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(5, 8)).astype(np.float32)
    r[0] = 1.0  # all correct
    r[1] = 0.0  # all wrong
    r[2] = rng.normal(size=8)  # continuous rewards too
    return r


def test_grpo_matches_reference(rewards):
    out = np.asarray(jax.jit(advantages.grpo)(rewards))
    np.testing.assert_allclose(out, np_grpo(rewards), rtol=1e-5, atol=1e-6)
    assert np.all(out[:2] == 0.0)  # equal rewards -> exactly 0


def test_grpo_equal_rewards_exact_zero_for_inexact_mean():
    # mean(0.1, 0.1, 0.1) != 0.1 in floating point; the advantage must still be 0.
    r = jnp.full((2, 3), 0.1, jnp.float32)
    for fn in (advantages.grpo, advantages.dr_grpo, advantages.rloo):
        assert np.all(np.asarray(fn(r)) == 0.0)
    assert np.all(np.asarray(advantages.reinforce_pp(r)) == 0.0)


def test_grpo_group_of_one():
    r = np.array([[1.0], [0.0], [0.5]], np.float32)
    np.testing.assert_allclose(advantages.grpo(r), np_grpo(r), rtol=1e-6)
    np.testing.assert_allclose(advantages.dr_grpo(r), r)
    np.testing.assert_allclose(advantages.rloo(r), r)


def test_dr_grpo(rewards):
    np.testing.assert_allclose(advantages.dr_grpo(rewards), np_grpo(rewards, norm_by_std=False),
                               rtol=1e-5, atol=1e-6)


def test_rloo(rewards):
    out = jax.jit(advantages.rloo)(rewards)
    np.testing.assert_allclose(out, np_rloo(rewards), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_batch_whitening(rewards):
    out = np.asarray(jax.jit(advantages.reinforce_pp)(rewards))
    np.testing.assert_allclose(out, np_reinforce_pp(rewards), rtol=1e-5, atol=1e-6)
    # Whitened over the whole batch, not per group: a uniform group is not zeroed.
    assert np.all(out[0] > 0) and np.all(out[1] < 0)


def test_reinforce_pp_mask_and_token_weights(rewards):
    rng = np.random.default_rng(1)
    mask = (rng.random(rewards.shape) > 0.3).astype(np.float32)
    np.testing.assert_allclose(advantages.reinforce_pp(rewards, mask), np_reinforce_pp(rewards, mask),
                               rtol=1e-5, atol=1e-6)
    lengths = rng.integers(0, 20, size=rewards.shape).astype(np.float32)  # verl's token weighting
    np.testing.assert_allclose(advantages.reinforce_pp(rewards, lengths),
                               np_reinforce_pp(rewards, lengths), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_degenerate_batches():
    one = np.zeros((2, 2), np.float32)
    one[0, 0] = 1.0
    m = np.zeros((2, 2), np.float32)
    m[0, 0] = 1.0
    assert np.all(np.asarray(advantages.reinforce_pp(one, m)) == 0.0)  # one rollout
    assert np.all(np.asarray(advantages.reinforce_pp(one, np.zeros_like(m))) == 0.0)


def test_compute_dispatch(rewards):
    np.testing.assert_allclose(advantages.compute("GRPO", rewards, eps=1e-3),
                               np_grpo(rewards, eps=1e-3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(advantages.compute("reinforce++", rewards),
                               np_reinforce_pp(rewards), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(advantages.compute("rloo", rewards), np_rloo(rewards),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        advantages.compute("ppo", rewards)


def np_verl_reinforce_pp(rewards, lengths):
    """verl's compute_reinforce_plus_plus_outcome_advantage (gamma 1) on an outcome reward:
    the reward at each rollout's last response token, returns-to-go over the response,
    then masked_whiten over every response token of the batch (unbiased variance,
    rsqrt(var + 1e-8)). Returns each rollout's (constant) advantage, [N]."""
    r, n = np.asarray(rewards, np.float64).ravel(), np.asarray(lengths, np.int64).ravel()
    T = int(n.max())
    mask = (np.arange(T)[None] < n[:, None]).astype(np.float64)
    scores = np.zeros((len(r), T))
    scores[np.arange(len(r)), n - 1] = r
    returns = np.flip(np.cumsum(np.flip(scores * mask, -1), -1), -1) * mask
    mean = (returns * mask).sum() / mask.sum()
    var = (((returns - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    adv = (returns - mean) / np.sqrt(var + 1e-8) * mask
    return adv[np.arange(len(r)), 0]


def test_reinforce_pp_with_lengths_is_verls_token_whitening():
    """The trainer's call (advantages.compute with lengths) on a toy batch: short correct
    rollouts and long wrong ones. verl weights rollouts by their length: +1.57 / -0.63,
    where per-rollout whitening gives +-0.94."""
    rewards = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]], np.float32)
    lengths = np.where(rewards > 0, 6, 15).astype(np.float32)
    want = np_verl_reinforce_pp(rewards, lengths).reshape(rewards.shape)
    got = np.asarray(advantages.compute("reinforce_pp", rewards, lengths_BG=lengths))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(want[0, :2], [1.572, -0.629], atol=1e-3)
    np.testing.assert_allclose(np.asarray(advantages.compute("reinforce_pp", rewards))[0, :2], [0.935, -0.935],
                               atol=1e-3)
    # the group estimators ignore lengths, as verl's do
    np.testing.assert_array_equal(advantages.compute("grpo", rewards, lengths_BG=lengths),
                                  advantages.compute("grpo", rewards))


# ----------------------------------------------------------------------------- OISD weight modes
def np_oisd_weights(adv, mode, c):
    """Loop reference of rl.think_weight_mode, written from the definitions in docs/method.md."""
    adv = np.asarray(adv, np.float64)
    out = np.zeros_like(adv)
    for b in range(adv.shape[0]):
        w = [min(max(a, -c), c) for a in adv[b]]
        if mode == "positive":
            w = [max(x, 0.0) for x in w]
        elif mode == "group_centered":
            pulls = sum(x for x in w if x > 0)
            pushes = -sum(x for x in w if x < 0)
            target = min(pulls, pushes)  # both sides end at the smaller total
            w = [x * target / pulls if x > 0 else (x * target / pushes if x < 0 else 0.0) for x in w]
        out[b] = w
    return out


@pytest.mark.parametrize("mode", ["signed", "positive", "group_centered"])
@pytest.mark.parametrize("c", [1.0, 0.5])
def test_oisd_weights_match_reference(rewards, mode, c):
    adv = np.asarray(advantages.grpo(jnp.asarray(rewards)))
    adv_pp = np.asarray(advantages.reinforce_pp(jnp.asarray(rewards)))  # groups with one sign only
    for a in (adv, adv_pp):
        got = np.asarray(advantages.oisd_weights(jnp.asarray(a), mode, c))
        np.testing.assert_allclose(got, np_oisd_weights(a, mode, c), atol=1e-6)
        assert np.all(np.abs(got) <= c + 1e-7)
        assert np.all(got * a >= 0)  # never flips a rollout's sign


def _grpo_binary(k: int, g: int) -> np.ndarray:
    """Closed-form GRPO advantages of k right answers of g (unbiased std), as a [1, g] row."""
    p = k / g
    std = np.sqrt(g / (g - 1) * p * (1 - p))
    return np.array([[(1 - p) / std] * k + [-p / std] * (g - k)])


@pytest.mark.parametrize("g,k,signed_mean", [(4, 1, -0.125), (8, 1, (1 - 7 / np.sqrt(8)) / 8),
                                             (4, 2, 0.0), (4, 3, 0.125)])
def test_oisd_weight_bias_in_closed_form(g, k, signed_mean):
    # The figures: G=4 at 1/4 accuracy the signed weights are [1, -.5, -.5, -.5]
    # (mean -0.125); G=8 at 1/8 accuracy the mean is about -0.18.
    a = _grpo_binary(k, g)
    signed = np.asarray(advantages.oisd_weights(jnp.asarray(a), "signed", 1.0))
    centered = np.asarray(advantages.oisd_weights(jnp.asarray(a), "group_centered", 1.0))
    positive = np.asarray(advantages.oisd_weights(jnp.asarray(a), "positive", 1.0))
    assert signed.mean() == pytest.approx(signed_mean, abs=1e-6)
    assert centered.mean() == pytest.approx(0.0, abs=1e-6)
    assert positive.min() >= 0 and positive.mean() == pytest.approx(np.clip(a, 0, 1).mean(), abs=1e-6)
    if signed_mean == 0.0:  # nothing clips at half accuracy: centering changes nothing
        np.testing.assert_allclose(centered, signed, atol=1e-6)


def test_oisd_weights_unknown_mode():
    with pytest.raises(ValueError, match="think weight mode"):
        advantages.oisd_weights(jnp.zeros((1, 2)), "absolute")
