"""RL losses vs float64 NumPy references (docs/method.md formulas, verl conventions)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax.rl import losses

RTOL, ATOL = 2e-5, 2e-6

# One compile per helper instead of eager op-by-op dispatch (keeps the file fast).
js_div = jax.jit(losses.js_divergence, static_argnames=("temperature", "beta", "assume_finite"))


@functools.partial(jax.jit, static_argnames=("temperature", "assume_finite"))
def js_grads(zs, zt, temperature=1.0, assume_finite=False):
    f = lambda a, b: jnp.sum(losses.js_divergence(a, b, temperature, assume_finite=assume_finite))  # noqa: E731
    return jax.value_and_grad(f, argnums=(0, 1))(zs, zt)


policy = jax.jit(losses.policy_loss, static_argnames=("clip_low", "clip_high", "dual_clip", "agg"))
attn_grads = jax.jit(jax.value_and_grad(losses.attention_loss, argnums=(0, 1)))


# ---------------------------------------------------------------- NumPy references


def np_softmax(z):
    z = np.asarray(z, np.float64)
    mx = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(z - mx)  # exp(-inf) = 0
    s = e.sum(-1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def np_kl(p, q):
    """sum p log(p/q) with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return t.sum(-1)


def np_js(zs, zt, temp=1.0, beta=0.5):
    ps, pt = np_softmax(np.asarray(zs, np.float64) / temp), np_softmax(np.asarray(zt, np.float64) / temp)
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


def np_policy(logp, old, adv, mask, el=0.2, eh=0.2, c=10.0, clamp=20.0):
    """verl's compute_policy_loss, element by element."""
    logp, old, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, adv, mask))
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
    out = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        a, r = adv[idx], np.exp(np.clip(logp[idx] - old[idx], -clamp, clamp))
        l = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
        if a < 0 and c is not None:
            l = min(l, -a * c)
        out[idx] = l
    return (out * mask).sum() / mask.sum(), out


# ---------------------------------------------------------------- aggregation


def _rand_batch(seed, b=4, t=7):
    rng = np.random.default_rng(seed)
    loss = rng.normal(size=(b, t)).astype(np.float32)
    mask = (rng.random((b, t)) > 0.3).astype(np.float32)
    mask[-1] = 0.0  # a padding row: must not count as a sequence
    return loss, mask


def test_aggregate_modes_vs_numpy():
    loss, mask = _rand_batch(0)
    l64, m64 = loss.astype(np.float64), mask.astype(np.float64)
    rows = m64.sum(-1) > 0
    ref = {
        "token-mean": (l64 * m64).sum() / m64.sum(),
        "seq-mean-token-mean": np.mean([(l64[i] * m64[i]).sum() / m64[i].sum() for i in np.where(rows)[0]]),
        "seq-mean-token-sum": np.mean([(l64[i] * m64[i]).sum() for i in np.where(rows)[0]]),
    }
    for mode, want in ref.items():
        got = jax.jit(functools.partial(losses.aggregate, mode=mode))(loss, mask)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=mode)
    # Dr.GRPO's constant normaliser: each sequence's token sum over the budget, mean over sequences
    np.testing.assert_allclose(
        losses.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=16.0),
        np.mean([(l64[i] * m64[i]).sum() / 16.0 for i in np.where(rows)[0]]), rtol=RTOL)
    with pytest.raises(ValueError):
        losses.aggregate(loss, mask, "token-sum")
    with pytest.raises(ValueError, match="only seq-mean-token-sum-norm"):
        losses.aggregate(loss, mask, "seq-mean-token-sum", norm_len=16.0)


def test_aggregate_packed_segments():
    # Two rows, each packing several sequences (segment 0 = padding).
    rng = np.random.default_rng(1)
    loss = rng.normal(size=(2, 8)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
    mask = (seg > 0).astype(np.float32)
    mask[0, 0] = mask[1, 4] = 0.0  # prompt-like masked tokens inside sequences
    seqs = [(r, s) for r in range(2) for s in range(1, 4) if (seg[r] == s).any()]
    per_mean, per_sum = [], []
    for r, s in seqs:
        sel = seg[r] == s
        per_sum.append((loss[r, sel] * mask[r, sel]).astype(np.float64).sum())
        per_mean.append(per_sum[-1] / mask[r, sel].sum())
    for mode, want in (("seq-mean-token-mean", np.mean(per_mean)), ("seq-mean-token-sum", np.mean(per_sum))):
        got = losses.aggregate(loss, mask, mode, segment_ids_BT=seg)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=mode)
    np.testing.assert_allclose(losses.aggregate_denom(mask, "seq-mean-token-mean", segment_ids_BT=seg), 5)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_global_denominator_sums_exactly_over_micro_batches(mode):
    loss, mask = _rand_batch(2, b=6)
    full = losses.aggregate(loss, mask, mode)
    den = losses.aggregate_denom(mask, mode)
    parts = [losses.aggregate(loss[i:i + 2], mask[i:i + 2], mode, denom=den) for i in range(0, 6, 2)]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-6)
    # and the gradients add up too
    g_full = jax.grad(lambda l: losses.aggregate(l, mask, mode))(loss)
    g_parts = np.concatenate([jax.grad(lambda l, m=mask[i:i + 2]: losses.aggregate(l, m, mode, denom=den))(
        loss[i:i + 2]) for i in range(0, 6, 2)])
    np.testing.assert_allclose(g_parts, g_full, rtol=1e-6)


def test_aggregate_all_masked_is_zero():
    loss, _ = _rand_batch(3)
    for mode in losses.AGG_MODES:
        assert float(losses.aggregate(loss, np.zeros_like(loss), mode)) == 0.0


# ---------------------------------------------------------------- policy loss


def _policy_regions():
    """Ratios and advantages that hit every branch of the clipped objective."""
    log_r = np.log(np.array([
        [1.05, 1.5, 0.5, 1.0, 0.9],   # A > 0: inside, above 1+eps (clip), below 1-eps (no clip), r=1
        [1.05, 0.5, 1.5, 5.0, 20.0],  # A < 0: inside, below 1-eps (clip), above, <c, > c (dual)
        [0.5, 2.0, 30.0, 1.0, 0.1],   # A = 0 / mixed-sign per-token advantages
    ]))
    old = np.random.default_rng(4).normal(size=log_r.shape) - 3.0
    logp = (old + log_r).astype(np.float32)
    adv = np.array([[0.7] * 5, [-1.3] * 5, [0.0, 2.0, -0.4, -1.0, 0.5]], np.float32)
    mask = np.ones_like(logp)
    mask[2, 4] = 0.0
    logp[2, 4] = np.nan  # junk at a masked position must not leak into loss or grads
    return logp, old.astype(np.float32), adv, mask


def test_policy_loss_regions_and_clip_fractions():
    logp, old, adv, mask = _policy_regions()
    loss, metrics = policy(logp, old, adv, mask)
    want, per_tok = np_policy(np.nan_to_num(logp), old, adv, mask)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    n = mask.sum()
    # A>0 & r>1.2: (0,1), (2,1) [r=2], (2,4) masked -> 2. A<0 & r<0.8: (1,1) -> 1.
    # A<0 & r>10: (1,4), (2,2) [r=e^20 after the clamp] -> 2.
    np.testing.assert_allclose(metrics["clip_frac_high"], 2 / n, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"], 1 / n, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_dual"], 2 / n, rtol=1e-6)
    r = np.exp(np.clip(np.nan_to_num(logp).astype(np.float64) - old, -20, 20))
    np.testing.assert_allclose(metrics["ratio_mean"], (r * mask).sum() / n, rtol=1e-5)
    k3 = (r - 1) - np.log(r)
    np.testing.assert_allclose(metrics["approx_kl"], (k3 * mask).sum() / n, rtol=1e-5)
    # Gradient: -A r where the unclipped term is active, 0 where a clip binds.
    g = jax.jit(jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask)[0]))(logp)
    a = adv.astype(np.float64)
    lr = np.nan_to_num(logp).astype(np.float64) - old
    active = np.isclose(per_tok, -a * r) & (np.abs(lr) < 20)
    active &= ~((a > 0) & (r > 1.2)) & ~((a < 0) & (r < 0.8)) & ~((a < 0) & (r > 10))
    want_g = np.where(active & (mask > 0), -a * r, 0.0) / n
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(g))


def test_policy_loss_asymmetric_clip_no_dual_and_seq_adv():
    rng = np.random.default_rng(5)
    old = rng.normal(size=(3, 6)).astype(np.float32)
    logp = (old + rng.normal(scale=0.8, size=old.shape)).astype(np.float32)
    adv_b = np.array([1.0, -2.0, 0.3], np.float32)
    mask = (rng.random(old.shape) > 0.2).astype(np.float32)
    loss, _ = policy(logp, old, adv_b, mask, clip_low=0.1, clip_high=0.28, dual_clip=None)
    want, _ = np_policy(logp, old, adv_b, mask, el=0.1, eh=0.28, c=None)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    loss_d, _ = policy(logp, old, adv_b, mask, dual_clip=3.0)
    np.testing.assert_allclose(loss_d, np_policy(logp, old, adv_b, mask, c=3.0)[0], rtol=RTOL)


def test_policy_loss_on_policy_is_minus_advantage():
    rng = np.random.default_rng(6)
    logp = rng.normal(size=(2, 5)).astype(np.float32)
    adv = np.array([0.5, -1.5], np.float32)
    mask = np.ones_like(logp)
    loss, m = policy(logp, logp, adv, mask)
    np.testing.assert_allclose(loss, -adv.mean(), rtol=1e-6)
    assert float(m["approx_kl"]) == 0.0 and float(m["ratio_mean"]) == 1.0


def test_bupo_loss_is_the_clipped_surrogate_of_the_internal_policy(tmp_path):
    """BuPO's step loss vs NumPy: log-probs of pi_l = softmax(W_U h_l / T_s) from
    transformers' raw layer-l residual (no final norm, float64), verl's clipped surrogate,
    token-mean. The final layer's policy gives another loss, so the check can fail."""
    from hf_fixtures import save_hf_model
    from oisd_jax.model import load_hf
    from oisd_jax.rl.batch import build_train_batch
    from oisd_jax.rl.step import StepConfig, compute_grads
    import torch
    model = save_hf_model("qwen3", tmp_path, seed=5, tie_word_embeddings=False).double()
    cfg, params = load_hf(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(8)
    n, l, temp = 4, 2, 0.7
    prompts = [rng.integers(2, cfg.vocab_size, 3).tolist() for _ in range(n)]
    responses = [rng.integers(2, cfg.vocab_size, 6).tolist() for _ in range(n)]
    adv = np.array([1.0, -0.5, 0.8, -1.2])
    batch = build_train_batch(prompts, responses, [6, 4, 5, 6], adv, row_len=9, rows_per_micro=4, num_micro=1)
    old = (rng.normal(size=batch.tokens.shape) * 0.3 - 5.0).astype(np.float32)
    batch = batch.replace(old_logp=old)
    w_u = model.lm_head.weight.detach().numpy().T  # [D, V]
    logp = np.zeros(batch.tokens.shape)
    for r in range(n):  # one sequence per row (9 tokens each)
        with torch.no_grad():
            hs = model(torch.tensor(batch.tokens[0, r][None]), output_hidden_states=True).hidden_states
        z = hs[l][0].numpy() @ w_u / temp
        z = z - z.max(-1, keepdims=True)
        lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
        logp[0, r] = lsm[np.arange(9), batch.targets[0, r]]
    mask = batch.loss_mask[0]
    want, _ = np_policy(logp[0], old[0], batch.advantages[0], mask, el=0.2, eh=0.28, c=3.0)
    sc = StepConfig(temperature=temp, clip_high=0.28, dual_clip=3.0, tap_layer=l, logit_chunk=None)
    got = jax.jit(lambda p, b: [compute_grads(p, b, cfg, c)[0] for c in (sc.replace(bupo=True), sc.replace(tap_layer=None))])
    bupo, final = got(params, batch)
    np.testing.assert_allclose(float(bupo), want, rtol=1e-4)
    assert abs(float(final) - want) > 1e-2


def test_kl_penalty_estimators():
    rng = np.random.default_rng(7)
    logp = rng.normal(size=(3, 5)).astype(np.float32)
    ref = (logp + rng.normal(scale=2.0, size=logp.shape)).astype(np.float32)
    ref[0, 0] = logp[0, 0] + 25.0  # exercises the +-20 log-ratio clamp and the +-10 clamp
    d = logp.astype(np.float64) - ref
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k1"), d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k2"), 0.5 * d ** 2, rtol=1e-5, atol=1e-6)
    lr = np.clip(-d, -20, 20)
    k3 = np.clip(np.exp(lr) - lr - 1, -10, 10)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "low_var_kl"), k3, rtol=1e-5, atol=1e-6)
    assert float(losses.kl_penalty(logp, ref, "k3")[0, 0]) == 10.0
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "abs"), np.abs(d), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        losses.kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------- JS divergence


@pytest.mark.parametrize("assume_finite", [False, True])
def test_js_matches_numpy(assume_finite):
    rng = np.random.default_rng(8)
    zs = rng.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)
    zt = rng.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)
    for temp, beta in ((1.0, 0.5), (0.7, 0.5), (1.3, 0.3)):
        f = jax.jit(functools.partial(losses.js_divergence, temperature=temp, beta=beta,
                                      assume_finite=assume_finite))
        np.testing.assert_allclose(f(zs, zt), np_js(zs, zt, temp, beta), rtol=1e-4, atol=1e-6)
    js = np.asarray(js_div(zs, zt))
    assert np.all(js >= -1e-7) and np.all(js <= np.log(2) + 1e-6)
    np.testing.assert_allclose(js_div(zs, zs), 0.0, atol=1e-6)


def test_js_with_neg_inf_entries_and_empty_rows():
    rng = np.random.default_rng(9)
    zs = rng.normal(size=(5, 6)).astype(np.float32)
    zt = rng.normal(size=(5, 6)).astype(np.float32)
    zs[0, 4:] = zt[0, 4:] = -np.inf  # same masked keys in both
    zs[1, 0] = -np.inf  # student excludes a key the teacher has
    zt[2, 5] = -np.inf  # and the reverse
    zs[3, :] = zt[3, :] = -np.inf  # an empty row
    zs[4, :3], zt[4, 3:] = -np.inf, -np.inf  # disjoint supports: JS = log 2
    want = np_js(zs, zt)
    want[3] = 0.0
    got = js_div(zs, zt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[4], np.log(2), rtol=1e-6)
    # masked keys behave exactly like deleting them
    np.testing.assert_allclose(got[0], js_div(zs[0, :4], zt[0, :4]), rtol=1e-6)
    _, (g, _) = js_grads(zs, zt)
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g)[~np.isfinite(zs)] == 0.0)


def test_js_underflow_is_finite():
    # Probabilities that underflow to 0 in f32 (logit gaps of 1e3) must not give NaN.
    zs = np.array([[0.0, 1000.0, -1000.0, 5.0]], np.float32)
    zt = np.array([[1000.0, 0.0, 3.0, -1000.0]], np.float32)
    for af in (False, True):
        v, (g, _) = js_grads(zs, zt, assume_finite=af)
        np.testing.assert_allclose(v, np.log(2), rtol=1e-6)
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_js_gradient_closed_form(tau):
    """Paper A.3: dJS/dz_s = (1/tau) p_s (g - <p_s, g>), g = 1/2 log(p_s/m); 0 for the teacher."""
    rng = np.random.default_rng(10)
    zs = rng.normal(scale=2.0, size=(4, 30)).astype(np.float32)
    zt = rng.normal(scale=2.0, size=(4, 30)).astype(np.float32)
    _, (gs, gt) = js_grads(zs, zt, temperature=tau)
    ps, pt = np_softmax(zs / tau), np_softmax(zt.astype(np.float64) / tau)
    g = 0.5 * np.log(ps / (0.5 * (ps + pt)))
    want = ps * (g - (ps * g).sum(-1, keepdims=True)) / tau
    np.testing.assert_allclose(gs, want, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(gt) == 0.0)
    _, (gs_f, _) = js_grads(zs, zt, temperature=tau, assume_finite=True)
    np.testing.assert_allclose(gs_f, want, rtol=1e-4, atol=1e-7)


def test_entropy_helper():
    rng = np.random.default_rng(11)
    z = rng.normal(size=(3, 9)).astype(np.float32)
    z[1, :4] = -np.inf
    p = np_softmax(z / 0.8)
    want = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    np.testing.assert_allclose(losses.entropy(z, 0.8), want, rtol=1e-5)


# ---------------------------------------------------------------- OISD losses


def test_think_loss_signed_and_global_denominator():
    rng = np.random.default_rng(12)
    js = rng.random((4, 6)).astype(np.float32) * 0.5
    adv_b = np.array([2.5, -0.4, -3.0, 0.7], np.float32)
    mask = (rng.random((4, 6)) > 0.3).astype(np.float32)
    mask[1] = 0.0  # all-masked row
    w = np.clip(adv_b, -1.0, 1.0)[:, None]
    want = (w * js * mask).sum() / mask.sum()
    np.testing.assert_allclose(jax.jit(losses.think_loss)(js, adv_b, mask), want, rtol=1e-6)
    adv_bt = np.repeat(adv_b[:, None], 6, 1)
    np.testing.assert_allclose(losses.think_loss(js, adv_bt, mask), want, rtol=1e-6)
    np.testing.assert_allclose(losses.think_loss(js, adv_b, mask, adv_clip=2.0),
                               (np.clip(adv_b, -2, 2)[:, None] * js * mask).sum() / mask.sum(), rtol=1e-6)
    assert float(losses.think_loss(js, -np.abs(adv_b), mask)) < 0  # negative advantages push away
    parts = losses.think_loss(js[:2], adv_b[:2], mask[:2], denom=mask.sum()) + \
        losses.think_loss(js[2:], adv_b[2:], mask[2:], denom=mask.sum())
    np.testing.assert_allclose(parts, want, rtol=1e-6)
    assert float(losses.think_loss(js, adv_b, np.zeros_like(mask))) == 0.0


def np_attention_loss(s, t, w, valid, c=1.0):
    total, n = 0.0, 0
    for b, q in np.ndindex(valid.shape):
        if valid[b, q]:
            total += np.clip(w[b, q], -c, c) * np_js(s[b, q], t[b, q]).mean()
            n += 1
    return total / max(n, 1)


def _attention_inputs(seed=13, b=2, q=3, h=4, k=10):
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=2.0, size=(b, q, h, k)).astype(np.float32)
    t = rng.normal(scale=2.0, size=(b, q, h, k)).astype(np.float32)
    n_keys = rng.integers(1, k + 1, size=(b, q))
    unused = np.arange(k)[None, None, :] >= n_keys[..., None]  # padded key slots
    s[np.broadcast_to(unused[:, :, None, :], s.shape)] = -np.inf
    t[np.broadcast_to(unused[:, :, None, :], t.shape)] = -np.inf
    w = np.array([[1.7, 1.7, 1.7], [-0.6, -0.6, -0.6]], np.float32)
    valid = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    s[0, 2] = t[0, 2] = -np.inf  # an invalid step: every key unused
    s[0, 2, 0, 0] = np.nan  # junk in an invalid row must not leak either
    return s, t, w, valid


def test_attention_loss_vs_numpy_and_finite_grads():
    s, t, w, valid = _attention_inputs()
    got, (gs, gt) = attn_grads(s, t, w, valid)
    np.testing.assert_allclose(got, np_attention_loss(s, t, w, valid), rtol=1e-5)
    assert np.all(np.isfinite(gs)) and np.all(np.asarray(gt) == 0.0)
    gs = np.asarray(gs)
    assert np.all(gs[0, 2] == 0.0) and np.all(gs[~np.isfinite(s)] == 0.0)
    # per-step closed form: d/ds = clip(w) / (n_valid * H) * dJS/dz_s
    ps, pt = np_softmax(s[1, 0]), np_softmax(t[1, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(ps > 0, 0.5 * np.log(ps / (0.5 * (ps + pt))), 0.0)
    want = ps * (g - (ps * g).sum(-1, keepdims=True)) * (-0.6) / (valid.sum() * s.shape[2])
    np.testing.assert_allclose(gs[1, 0], want, rtol=1e-4, atol=1e-8)


def test_attention_loss_all_invalid_and_denominator():
    s, t, w, valid = _attention_inputs(seed=14)
    zero = np.zeros_like(valid)
    v, (g, _) = attn_grads(s, t, w, zero)
    assert float(v) == 0.0 and np.all(np.asarray(g) == 0.0)
    loss = jax.jit(losses.attention_loss)
    full = loss(s, t, w, valid)
    den = valid.sum()
    parts = sum(loss(s[i:i + 1], t[i:i + 1], w[i:i + 1], valid[i:i + 1], denom=den) for i in range(2))
    np.testing.assert_allclose(parts, full, rtol=1e-6)


# ----------------------------------------------------------------------------- OGLS-SD steering
def np_steer(z, correct, group, mask, alpha, unit):
    """Loop reference: per group, the two pools' mean logits, their difference added at the
    response tokens of every rollout of the group (none where a pool is empty)."""
    z = np.asarray(z, np.float64)
    out = z.copy()
    for g in np.unique(group):
        votes = {True: [], False: []}
        for b in np.flatnonzero(group == g):
            toks = [z[b, t] for t in range(z.shape[1]) if mask[b, t]]
            if not toks:
                continue
            if unit == "token":
                votes[bool(correct[b])] += toks
            else:
                votes[bool(correct[b])].append(np.mean(toks, axis=0))
        if not votes[True] or not votes[False]:
            continue
        d = np.mean(votes[True], axis=0) - np.mean(votes[False], axis=0)
        for b in np.flatnonzero(group == g):
            for t in range(z.shape[1]):
                if mask[b, t]:
                    out[b, t] += alpha * d
    return out


def _steer_case(seed=0):
    rng = np.random.default_rng(seed)
    B, T, V, G = 12, 5, 7, 4  # 4 groups of 3 rollouts
    z = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    group = np.repeat(np.arange(G), 3)
    correct = np.array([1, 0, 1,  1, 1, 1,  0, 0, 0,  0, 1, 0], bool)  # mixed, all right, all wrong, mixed
    lengths = rng.integers(1, T + 1, size=B)
    mask = np.arange(T)[None] < lengths[:, None]
    return z, correct, group, mask, G


@pytest.mark.parametrize("unit", ["token", "sequence"])
def test_steer_teacher_logits_vs_numpy(unit):
    z, correct, group, mask, G = _steer_case()
    got = np.asarray(losses.steer_teacher_logits(jnp.asarray(z), jnp.asarray(correct), jnp.asarray(group),
                                                 jnp.asarray(mask), 0.7, num_groups=G, unit=unit))
    want = np_steer(z, correct, group, mask, 0.7, unit)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
    uniform = (group == 1) | (group == 2)  # all right / all wrong: untouched
    np.testing.assert_array_equal(got[uniform], z[uniform])
    np.testing.assert_array_equal(got[~mask], z[~mask])  # off the response: untouched
    assert np.abs(got - z).max(-1)[~uniform[:, None] & mask].min() > 0  # the mixed groups do move


def test_steer_units_differ_and_bad_unit():
    z, correct, group, mask, G = _steer_case(1)
    args = (jnp.asarray(z), jnp.asarray(correct), jnp.asarray(group), jnp.asarray(mask), 1.0)
    tok = losses.steer_teacher_logits(*args, num_groups=G, unit="token")
    seq = losses.steer_teacher_logits(*args, num_groups=G, unit="sequence")
    assert float(jnp.abs(tok - seq).max()) > 1e-3  # unequal lengths: the units weigh tokens differently
    with pytest.raises(ValueError, match="steering unit"):
        losses.steer_teacher_logits(*args, num_groups=G, unit="position")


def test_steer_direction_ignores_token_offsets():
    # log_softmax(z) = z - lse(z) per token: the direction moves by a constant over V, so
    # the steered distribution is the same from logits or from log-probs.
    z, correct, group, mask, G = _steer_case(2)
    args = (jnp.asarray(correct), jnp.asarray(group), jnp.asarray(mask), 1.3)
    a = losses.steer_teacher_logits(jnp.asarray(z), *args, num_groups=G)
    b = losses.steer_teacher_logits(jax.nn.log_softmax(jnp.asarray(z), -1), *args, num_groups=G)
    np.testing.assert_allclose(jax.nn.softmax(a, -1), jax.nn.softmax(b, -1), atol=1e-6)


def test_steer_pool_sums_add_over_micro_batches():
    # A group split over two micro-batches (rows 0-5 and 6-11): summed pool sums give the
    # whole batch's direction, as a two-pass teacher step would accumulate them.
    z, correct, group, mask, G = _steer_case(3)
    group = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])  # every group in both halves
    g_BT = np.broadcast_to(group[:, None], mask.shape)
    c_BT = np.broadcast_to(correct[:, None], mask.shape)
    parts = [losses.steer_pool_sums(jnp.asarray(z[s]), jnp.asarray(g_BT[s]), jnp.asarray(c_BT[s]),
                                    jnp.asarray(mask[s]), G) for s in (slice(0, 6), slice(6, 12))]
    d_split = losses.steer_direction(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1])
    whole = np.asarray(losses.steer_teacher_logits(jnp.asarray(z), jnp.asarray(correct), jnp.asarray(group),
                                                   jnp.asarray(mask), 1.0, num_groups=G))
    np.testing.assert_allclose(whole[mask], (z + np.asarray(d_split)[group][:, None, :])[mask], atol=1e-5)
