"""losses.generalized_jsd (OPSD's divergence) against a float64 NumPy reference written from
the formulas of docs/method.md ("OPSD"): TRL's beta convention and its end points, the
per-entry clip, the top-k variant, finite-difference gradients and no teacher gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax.rl import losses


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_gjsd(zs, zt, beta, temp=1.0, clip=None, top_k=None):
    zs, zt = np.asarray(zs, np.float64) / temp, np.asarray(zt, np.float64) / temp
    if top_k is not None:
        idx = np.argsort(-zt, axis=-1, kind="stable")[..., :top_k]
        zs, zt = np.take_along_axis(zs, idx, -1), np.take_along_axis(zt, idx, -1)
    ls, lt = np_log_softmax(zs), np_log_softmax(zt)
    ps, pt = np.exp(ls), np.exp(lt)
    if beta == 0:
        term = pt * (lt - ls)                         # KL(T || S)
    elif beta == 1:
        term = ps * (ls - lt)                         # KL(S || T)
    else:
        m = (1 - beta) * ps + beta * pt
        term = beta * pt * (lt - np.log(m)) + (1 - beta) * ps * (ls - np.log(m))
    if clip is not None:
        term = np.minimum(term, clip)
    return term.sum(-1)


def _logits(seed, shape=(3, 5, 37), scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype(np.float32), (rng.normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("temp", [1.0, 1.1])
def test_generalized_jsd_matches_numpy(beta, clip, temp):
    zs, zt = _logits(1)
    got = np.asarray(losses.generalized_jsd(zs, zt, beta, temperature=temp, token_clip=clip))
    want = np_gjsd(zs, zt, beta, temp, clip)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    if clip is None:
        assert (got > -1e-6).all()  # a divergence
    else:
        full = np_gjsd(zs, zt, beta, temp)
        assert (got <= full + 1e-6).all() and (want < full - 1e-3).all()  # the clip binds on every token


def test_clipped_forward_kl_can_go_below_zero():
    """Forward KL's entries p_T (log p_T - log p_S) are negative where p_S > p_T; with the
    large positive ones clamped at 0.05 the sum of a close pair of distributions is < 0."""
    rng = np.random.default_rng(5)
    zs = (rng.normal(size=(4, 64)) * 3).astype(np.float32)
    zt = (zs + rng.normal(size=zs.shape) * 0.8).astype(np.float32)
    got = np.asarray(losses.generalized_jsd(zs, zt, 0.0, token_clip=0.05))
    np.testing.assert_allclose(got, np_gjsd(zs, zt, 0.0, clip=0.05), rtol=2e-5, atol=2e-6)
    assert got.min() < 0 < np_gjsd(zs, zt, 0.0).min()


def test_end_points_are_the_two_kls_and_the_mixture_is_continuous():
    zs, zt = _logits(2)
    ls, lt = np_log_softmax(zs.astype(np.float64)), np_log_softmax(zt.astype(np.float64))
    fwd = (np.exp(lt) * (lt - ls)).sum(-1)
    rev = (np.exp(ls) * (ls - lt)).sum(-1)
    np.testing.assert_allclose(losses.generalized_jsd(zs, zt, 0.0), fwd, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(losses.generalized_jsd(zs, zt, 1.0), rev, rtol=2e-5, atol=2e-6)
    # near the end points the mixture form tends to beta * KL: JSD_b / b -> KL(T||S) as b -> 0
    b = 1e-7
    np.testing.assert_allclose(np_gjsd(zs, zt, b) / b, fwd, rtol=1e-4)
    np.testing.assert_allclose(np_gjsd(zs, zt, 1 - b) / b, rev, rtol=1e-4)
    # beta = 0.5 is OISD's symmetric JS
    np.testing.assert_allclose(losses.generalized_jsd(zs, zt, 0.5),
                               losses.js_divergence(zs, zt, beta=0.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        losses.generalized_jsd(zs, zt, 1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_renormalises_over_the_teachers_top_k(beta):
    zs, zt = _logits(3)
    got = losses.generalized_jsd(zs, zt, beta, temperature=1.1, token_clip=0.05, top_k=6)
    np.testing.assert_allclose(got, np_gjsd(zs, zt, beta, 1.1, 0.05, top_k=6), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_by_finite_differences_and_none_to_the_teacher(beta, clip):
    zs, zt = _logits(4, shape=(2, 11), scale=1.5)
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(zs, jnp.float64), jnp.asarray(zt, jnp.float64)
        f = lambda s, t: jnp.sum(losses.generalized_jsd(s, t, beta, temperature=1.1, token_clip=clip)  # noqa: E731
                                 .astype(jnp.float64) * jnp.asarray([0.7, 1.3]))
        gs, gt = jax.grad(f, argnums=(0, 1))(s64, t64)
        assert not np.any(np.asarray(gt))  # the teacher is stop-gradiented inside
        w = np.array([0.7, 1.3])
        eps = 1e-6
        num = np.zeros_like(zs, np.float64)
        for i, j in np.ndindex(zs.shape):
            d = np.zeros_like(num)
            d[i, j] = eps
            hi = (np_gjsd(zs + d, zt, beta, 1.1, clip) * w).sum()
            lo = (np_gjsd(zs - d, zt, beta, 1.1, clip) * w).sum()
            num[i, j] = (hi - lo) / (2 * eps)
    # f32 internals: the analytic gradient agrees with central differences of the f64 reference
    np.testing.assert_allclose(np.asarray(gs), num, rtol=1e-4, atol=1e-5)
