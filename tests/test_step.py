"""The compiled RL update: losses and gradients vs a float64 PyTorch reference on the
same checkpoint, term isolation (OISD touches only blocks <= l), GRPO equality, micro-
batching, chunking, memory, sharding, skipped updates."""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import save_hf_model
from oisd_jax import parallel
from oisd_jax.model import ModelConfig, load_hf
from oisd_jax.rl.batch import TrainBatch, build_train_batch, mark_on_policy
from oisd_jax.run_spec import step_config
from oisd_jax.rl.step import StepConfig, compute_grads, make_logprob_fn, make_train_step
from oisd_jax.rl.train_state import abstract_train_state, batch_shardings, init_train_state
from oisd_jax.rl.step_loss import token_weights

L_TAP = 2
# Everything on, with non-default values so each knob is exercised.
FULL = StepConfig(temperature=0.8, clip_low=0.2, clip_high=0.28, dual_clip=1.5, kl_coef=0.05, kl_type="k3",
                  entropy_coef=0.01, tap_layer=L_TAP, think_weight=1.0, attn_weight=0.5, tau=1.3, adv_clip=0.8,
                  logit_chunk=8, lr=1e-3, weight_decay=0.01, grad_clip=1.0)
GRPO = StepConfig(temperature=0.8, clip_low=0.2, clip_high=0.28, dual_clip=1.5, logit_chunk=8, lr=1e-3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_untied")
    model = save_hf_model("qwen3", path, seed=3, tie_word_embeddings=False)
    cfg, params = load_hf(path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    n = 8
    prompts = [rng.integers(2, cfg.vocab_size, rng.integers(2, 7)).tolist() for _ in range(n)]
    responses = [rng.integers(2, cfg.vocab_size, 14).tolist() for _ in range(n)]
    lengths = rng.integers(4, 15, n)
    adv = rng.normal(size=n) * 1.2
    batch = build_train_batch(prompts, responses, lengths, adv, row_len=32, rows_per_micro=4, num_micro=2,
                              attn_steps=4, attn_window=4, attn_stride=4, rng=rng, ref_logp=True)
    lp = np.asarray(make_logprob_fn(cfg, FULL)(params, batch))
    mask = batch.loss_mask
    # old / ref log-probs off the current policy so ratios clip on both sides.
    batch = batch.replace(old_logp=(lp + 0.4 * rng.normal(size=lp.shape) * mask).astype(np.float32),
                          ref_logp=(lp - 0.3 * rng.normal(size=lp.shape) * mask).astype(np.float32))
    return dict(model=model, cfg=cfg, params=params, batch=batch, logp=lp)


@functools.lru_cache(maxsize=None)
def _grads_fn(cfg, variants):
    """One jit computing compute_grads for several (StepConfig, fused) variants (one compile)."""
    return jax.jit(lambda p, b: [compute_grads(p, b, cfg, sc, fused) for sc, fused in variants])


def _layers(tree, i):
    return jax.tree.map(lambda a: a[i], tree.layers)


def _maxabs(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- PyTorch float64 reference
def _torch_loss(model, batch: TrainBatch, sc: StepConfig):
    """The docs/method.md objective computed per unpacked sequence with transformers (float64)."""
    l, temp = sc.tap_layer, sc.temperature
    terms = {k: [] for k in ("pg", "kl", "ent", "think", "js", "lens_ent", "hi", "lo", "dual", "akl")}
    attn_num, attn_js, n_probe = 0.0, 0.0, 0.0
    for m, r in np.ndindex(batch.tokens.shape[:2]):
        seg_row = batch.segment_ids[m, r]
        for s in np.unique(seg_row[seg_row > 0]):
            idx = np.flatnonzero(seg_row == s)
            off = idx[0]
            out = model(torch.tensor(batch.tokens[m, r, idx][None], dtype=torch.long), output_hidden_states=True,
                        output_attentions=True)
            sel = batch.loss_mask[m, r, idx] == 1
            t_idx = np.flatnonzero(sel)
            tgt = torch.tensor(batch.tokens[m, r, idx][t_idx + 1], dtype=torch.long)
            z = out.logits[0, t_idx]
            lp_all = torch.log_softmax(z / temp, -1)
            logp = lp_all.gather(-1, tgt[:, None])[:, 0]
            f64 = lambda x: torch.tensor(np.asarray(x, np.float64)[idx][t_idx])  # noqa: E731
            old, ref, adv = f64(batch.old_logp[m, r]), f64(batch.ref_logp[m, r]), f64(batch.advantages[m, r])
            log_ratio = torch.clamp(logp - old, -20, 20)
            ratio = log_ratio.exp()
            pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - sc.clip_low, 1 + sc.clip_high))
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * sc.dual_clip), pg)
            lr_ref = torch.clamp(ref - logp, -20, 20)
            terms["pg"].append(pg)
            terms["kl"].append(torch.clamp(lr_ref.exp() - lr_ref - 1, -10, 10))
            terms["ent"].append(-(lp_all.exp() * lp_all).sum(-1))
            r_ = ratio.detach()
            terms["hi"].append(((adv > 0) & (r_ > 1 + sc.clip_high)).double())
            terms["lo"].append(((adv < 0) & (r_ < 1 - sc.clip_low)).double())
            terms["dual"].append(((adv < 0) & (r_ > sc.dual_clip)).double())
            terms["akl"].append((r_ - 1) - log_ratio.detach())
            zl = model.lm_head(model.model.norm(out.hidden_states[l]))[0, t_idx]
            ps, pt = torch.softmax(zl / sc.tau, -1), torch.softmax(z.detach() / sc.tau, -1)
            mid = 0.5 * (ps + pt)
            js = 0.5 * (ps * (ps / mid).log()).sum(-1) + 0.5 * (pt * (pt / mid).log()).sum(-1)
            terms["js"].append(js.detach())
            terms["think"].append(adv.clamp(-sc.adv_clip, sc.adv_clip) * js)
            lpl = torch.log_softmax(zl.detach() / temp, -1)
            terms["lens_ent"].append(-(lpl.exp() * lpl).sum(-1))
            # attention probes of this sequence, renormalised over the sampled keys
            a_l, a_L = out.attentions[l - 1][0], out.attentions[-1][0].detach()  # [H, T, T]
            for q in np.flatnonzero(batch.attn_valid[m, r] == 1):
                t_row = batch.attn_queries[m, r, q]
                if seg_row[t_row] != s:
                    continue
                keys = batch.attn_keys[m, r, q]
                keys = torch.tensor(keys[keys >= 0] - off, dtype=torch.long)
                p_s, p_t = a_l[:, t_row - off, keys], a_L[:, t_row - off, keys]
                p_s, p_t = p_s / p_s.sum(-1, keepdim=True), p_t / p_t.sum(-1, keepdim=True)
                mid = 0.5 * (p_s + p_t)
                js_h = 0.5 * (p_s * (p_s / mid).log()).sum(-1) + 0.5 * (p_t * (p_t / mid).log()).sum(-1)
                w = float(np.clip(batch.attn_weight[m, r, q], -sc.adv_clip, sc.adv_clip))
                attn_num = attn_num + w * js_h.mean()
                attn_js += float(js_h.detach().mean())
                n_probe += 1
    cat = {k: torch.cat(v) for k, v in terms.items()}
    n = cat["pg"].numel()
    mean = {k: v.sum() / n for k, v in cat.items()}
    attn = attn_num / n_probe
    loss = (mean["pg"] + sc.kl_coef * mean["kl"] - sc.entropy_coef * mean["ent"] + sc.think_weight * mean["think"]
            + sc.attn_weight * attn)
    metrics = dict(pg_loss=mean["pg"], kl=mean["kl"], entropy=mean["ent"], think_loss=mean["think"],
                   think_js=mean["js"], lens_entropy=mean["lens_ent"], attn_loss=attn, attn_js=attn_js / n_probe,
                   clip_frac_high=mean["hi"], clip_frac_low=mean["lo"], clip_frac_dual=mean["dual"],
                   approx_kl=mean["akl"])
    return loss, {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in metrics.items()}


def _torch_grads_as_params(model, cfg):
    """Map HF .grad tensors to our Params layout (numpy)."""
    D, H, KV, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = {k: p.grad.numpy() for k, p in model.named_parameters()}
    lay = lambda name, f: np.stack([f(g[f"model.layers.{i}.{name}.weight"]) for i in range(cfg.num_layers)])  # noqa: E731
    return {
        "embed": g["model.embed_tokens.weight"], "lm_head": g["lm_head.weight"].T, "final_norm": g["model.norm.weight"],
        "attn_norm": lay("input_layernorm", lambda w: w), "mlp_norm": lay("post_attention_layernorm", lambda w: w),
        "wq": lay("self_attn.q_proj", lambda w: w.T.reshape(D, H, Dh)),
        "wk": lay("self_attn.k_proj", lambda w: w.T.reshape(D, KV, Dh)),
        "wv": lay("self_attn.v_proj", lambda w: w.T.reshape(D, KV, Dh)),
        "wo": lay("self_attn.o_proj", lambda w: w.T.reshape(H, Dh, D)),
        "q_norm": lay("self_attn.q_norm", lambda w: w), "k_norm": lay("self_attn.k_norm", lambda w: w),
        "w_gate": lay("mlp.gate_proj", lambda w: w.T), "w_up": lay("mlp.up_proj", lambda w: w.T),
        "w_down": lay("mlp.down_proj", lambda w: w.T)}


def test_logprobs_match_transformers(setup):
    """The old-log-prob pass on packed rows == transformers on each sequence alone (also BuPO's pi_l)."""
    model, cfg, params, batch = setup["model"], setup["cfg"], setup["params"], setup["batch"]
    bupo = StepConfig(temperature=0.8, bupo=True, tap_layer=L_TAP, logit_chunk=8)
    lp_bupo = np.asarray(make_logprob_fn(cfg, bupo)(params, batch))
    for m, r in np.ndindex(batch.tokens.shape[:2]):
        seg = batch.segment_ids[m, r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            with torch.no_grad():
                out = model(torch.tensor(batch.tokens[m, r, idx][None], dtype=torch.long), output_hidden_states=True)
                raw = out.hidden_states[L_TAP] @ model.lm_head.weight.T  # BuPO: no final norm
            tgt = torch.tensor(batch.targets[m, r, idx], dtype=torch.long)[:, None]
            want = torch.log_softmax(out.logits[0] / 0.8, -1).gather(-1, tgt)[:, 0].numpy()
            want_b = torch.log_softmax(raw[0] / 0.8, -1).gather(-1, tgt)[:, 0].numpy()
            mask = batch.loss_mask[m, r, idx]
            np.testing.assert_allclose(setup["logp"][m, r, idx], want * mask, atol=2e-5)
            np.testing.assert_allclose(lp_bupo[m, r, idx], want_b * mask, atol=2e-5)
    assert not setup["logp"][batch.loss_mask == 0].any()


def test_loss_and_grads_match_torch_float64(setup):
    """Every metric and the gradient of the full objective (GRPO + KL + entropy bonus +
    think + attention) vs transformers autograd in float64 on the unpacked sequences."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    [(loss, grads, m)] = _grads_fn(cfg, ((FULL, True),))(params, batch)
    with in_float64(setup["model"]) as (model,):
        model.zero_grad()
        t_loss, t_m = _torch_loss(model, batch, FULL)
        t_loss.backward()
        t_grads = _torch_grads_as_params(model, cfg)
    assert t_m["clip_frac_high"] > 0 and t_m["clip_frac_low"] > 0 and t_m["clip_frac_dual"] > 0
    np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-5, atol=1e-6)
    for k, v in t_m.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert_grads_match_torch(grads, t_grads)


@contextlib.contextmanager
def in_float64(*models):
    """The torch models in float64 for a reference computation, back in float32 after
    (they are module fixtures shared by later tests)."""
    try:
        yield tuple(m.double() for m in models)
    finally:
        for m in models:
            m.float()


def assert_grads_match_torch(grads, t_grads, rel: float = 2e-5):
    """Our Params-shaped grads == _torch_grads_as_params' arrays, relative to each one's max."""
    ours = {"embed": grads.embed, "lm_head": grads.lm_head, "final_norm": grads.final_norm,
            **{k: getattr(grads.layers, k) for k in ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "q_norm",
                                                      "k_norm", "w_gate", "w_up", "w_down")}}
    for k, want in t_grads.items():
        got = np.asarray(ours[k])
        assert np.abs(got - want).max() <= rel * max(1.0, np.abs(want).max()), k


# FULL without the OISD terms (tap layer set, no taps: the GRPO graph) and each term alone.
PG = FULL.replace(think_weight=0.0, attn_weight=0.0)
SOLO = dict(pg_weight=0.0, kl_coef=0.0, entropy_coef=0.0)
ISOLATION = ((PG, True), (PG.replace(think_weight=1.0, **SOLO), True), (PG.replace(attn_weight=1.0, **SOLO), True),
             (PG.replace(bupo=True, kl_coef=0.0), True), (PG.replace(oisd_metrics=True), True))


def test_each_term_touches_only_what_it_should(setup):
    """Gradients of each term alone: think / attention / BuPO never reach blocks above l
    (exact zeros; the teacher is detached); the full objective is their weighted sum."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    (_, g_pg, _), (_, g_th, _), (_, g_at, _), (_, g_bu, _), _ = _grads_fn(cfg, ISOLATION)(params, batch)
    [(_, g_all, m_all)] = _grads_fn(cfg, ((FULL, True),))(params, batch)
    L = cfg.num_layers
    for i in range(L_TAP, L):  # blocks l+1..L are layer indices l..L-1
        for g in (g_th, g_at, g_bu):
            assert _maxabs(_layers(g, i)) == 0.0, i
    for i in range(L_TAP):
        for g in (g_th, g_at, g_bu):
            assert _maxabs(_layers(g, i)) > 0, i
    # think: lens = final norm + lm_head; attention: neither; BuPO's pi_l: lm_head, no norm.
    assert _maxabs(g_th.final_norm) > 0 and _maxabs(g_th.lm_head) > 0
    assert _maxabs(g_at.final_norm) == 0 and _maxabs(g_at.lm_head) == 0
    assert _maxabs(g_bu.final_norm) == 0 and _maxabs(g_bu.lm_head) > 0
    combo = jax.tree.map(lambda a, b, c: a + FULL.think_weight * b + FULL.attn_weight * c, g_pg, g_th, g_at)
    assert _maxabs(jax.tree.map(lambda a, b: a - b, g_all, combo)) <= 1e-5 * _maxabs(g_all)
    for i in range(L_TAP, L):  # adding OISD terms leaves the upper blocks' gradients as GRPO's
        d = jax.tree.map(lambda a, b: a - b, _layers(g_all, i), _layers(g_pg, i))
        assert _maxabs(d) <= 1e-6 * _maxabs(_layers(g_pg, i))
    assert float(m_all["think_js"]) > 0 and float(m_all["attn_js"]) > 0


def test_chunked_unchunked_fused_reference_agree(setup):
    """The head's implementations agree on loss, metrics and gradients: the fused head with
    chunk 12 (T=32: a padded last chunk) and unchunked, and helper-1's chunk-remat
    token_terms path (chunk 8). GRPO + KL + entropy bonus + think (the vocabulary terms)."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    sc = PG.replace(think_weight=1.0, loss_agg="seq-mean-token-mean")
    res = _grads_fn(cfg, ((sc.replace(logit_chunk=12), True), (sc.replace(logit_chunk=None), True),
                          (sc, False)))(params, batch)
    (l0, g0, m0) = res[-1]
    assert float(m0["think_js"]) > 0 and float(m0["kl"]) > 0
    for loss, g, m in res[:-1]:
        np.testing.assert_allclose(float(loss), float(l0), rtol=1e-5, atol=1e-7)
        for k in m0:
            np.testing.assert_allclose(float(m[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
        assert _maxabs(jax.tree.map(lambda a, b: a - b, g, g0)) <= 1e-5 * _maxabs(g0)


def test_compact_head_equals_full_head(setup):
    """The vocabulary head gathered at the loss positions only (head_positions, with
    unused -1 slots) gives the same loss, metrics and gradients as the head over all T,
    and the same old log-probs."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    mask = batch.loss_mask
    th = int(mask.sum(-1).max()) + 3
    hp = np.full(mask.shape[:2] + (th,), -1, np.int32)
    for m, r in np.ndindex(mask.shape[:2]):
        pos = np.flatnonzero(mask[m, r])
        hp[m, r, :len(pos)] = pos
    sc = PG.replace(think_weight=1.0)
    f = jax.jit(lambda p, b1, b2: (compute_grads(p, b1, cfg, sc), compute_grads(p, b2, cfg, sc)))
    (l0, g0, m0), (l1, g1, m1) = f(params, batch, batch.replace(head_positions=hp))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-7)
    for k in m0:
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert _maxabs(jax.tree.map(lambda a, b: a - b, g1, g0)) <= 1e-5 * _maxabs(g0)
    lp = make_logprob_fn(cfg, FULL)(params, batch.replace(head_positions=hp))
    np.testing.assert_allclose(np.asarray(lp), setup["logp"], atol=1e-6)


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
def test_token_weights_reproduce_aggregation(setup, agg):
    """sum(loss * weight) over the [M, R, T] batch == losses.aggregate over all rows."""
    from oisd_jax.rl import losses
    batch = setup["batch"]
    sc = FULL.replace(loss_agg=agg, loss_norm_len=20.0 if agg == "seq-mean-token-sum-norm" else None)
    per_tok = np.random.default_rng(1).normal(size=batch.tokens.shape).astype(np.float32)
    w = token_weights(batch, sc)
    T = batch.tokens.shape[-1]
    want = losses.aggregate(per_tok.reshape(-1, T), batch.loss_mask.reshape(-1, T), agg,
                            segment_ids_BT=batch.segment_ids.reshape(-1, T), norm_len=sc.loss_norm_len)
    np.testing.assert_allclose(float(jnp.sum(per_tok * w.pg)), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(w.tok)), 1.0, rtol=1e-6)
    assert float(w.attn_denom) == batch.attn_valid.sum()


@pytest.mark.parametrize("agg", AGGS)
def test_step_loss_aggregation_vs_numpy(setup, agg):
    """The step's L_pg under each rl.loss_agg, on-policy (ratio 1, so L_pg = -A per token)
    against verl's agg_loss written out per packed sequence (Dr.GRPO's -norm: over 20)."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    # advantages shifted off zero mean, so the modes' different weights show in the loss
    batch = batch.replace(old_logp=setup["logp"], advantages=batch.advantages + 0.5 * batch.loss_mask)
    sc = GRPO.replace(loss_agg=agg, loss_norm_len=20.0 if agg == "seq-mean-token-sum-norm" else None)
    loss = float(jax.jit(lambda p, b: compute_grads(p, b, cfg, sc)[0])(params, batch))
    sums, counts = [], []
    for m, r in np.ndindex(batch.tokens.shape[:2]):
        seg, mask = batch.segment_ids[m, r], batch.loss_mask[m, r].astype(np.float64)
        for s in np.unique(seg[seg > 0]):
            sel = (seg == s) & (mask > 0)
            sums.append(-batch.advantages[m, r][sel].astype(np.float64).sum())
            counts.append(sel.sum())
    sums, counts = np.array(sums), np.array(counts)
    want = {"token-mean": sums.sum() / counts.sum(), "seq-mean-token-mean": np.mean(sums / counts),
            "seq-mean-token-sum": np.mean(sums), "seq-mean-token-sum-norm": np.mean(sums / 20.0)}[agg]
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)


def test_on_policy_rows_equal_old_logprobs_of_the_current_policy(setup):
    """A mini-batch marked on-policy (the step's first update with ppo_epochs = 1) equals the
    same batch with old_logp from make_logprob_fn of these params: loss, metrics (ratio 1: no
    clipping, approx_kl 0) and gradients, fused and reference heads; its old_logp is not read
    (garbage there changes nothing), and rows left unmarked still read theirs."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    lp = setup["logp"]  # make_logprob_fn(cfg, FULL): temperature 0.8, like FULL's step
    recomputed = batch.replace(old_logp=lp)
    rng = np.random.default_rng(7)
    garbage = batch.replace(old_logp=(lp + 3.0 * rng.normal(size=lp.shape)).astype(np.float32))
    marked = mark_on_policy(garbage, True)
    half = marked.replace(on_policy=np.asarray([[1.0] * 4, [0.0] * 4], np.float32))  # micro 0 only
    half_ref = garbage.replace(old_logp=np.concatenate([lp[:1], garbage.old_logp[1:]]))
    for fused in (True, False):
        f = jax.jit(lambda p, *bs: [compute_grads(p, b, cfg, FULL, fused) for b in bs])
        (l0, g0, m0), (l1, g1, m1), (lg, _, _), (lh, gh, mh), (lr, gr, mr) = f(
            params, recomputed, marked, garbage, half, half_ref)
        assert float(m1["approx_kl"]) == 0.0 and float(m1["ratio_max"]) == 1.0
        assert abs(float(lg) - float(l0)) > 1e-3  # the garbage would matter if it were read
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(lh), float(lr), rtol=1e-5, atol=1e-6)
        for k in m0:
            np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-4, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(float(mh[k]), float(mr[k]), rtol=1e-4, atol=1e-6, err_msg=k)
        assert _maxabs(jax.tree.map(lambda a, b: a - b, g1, g0)) <= 1e-5 * _maxabs(g0)
        assert _maxabs(jax.tree.map(lambda a, b: a - b, gh, gr)) <= 1e-5 * _maxabs(gr)


def test_micro_batches_equal_one_batch(setup):
    """M=2 micro-batches of R=4 rows == one micro-batch of the same 8 rows (global
    per-sequence denominators), loss, metrics and gradients."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    sc = GRPO.replace(loss_agg="seq-mean-token-mean", kl_coef=0.05, entropy_coef=0.01)
    one = jax.tree.map(lambda x: x.reshape((1, -1) + x.shape[2:]), batch)
    f = jax.jit(lambda p, b1, b2: (compute_grads(p, b1, cfg, sc), compute_grads(p, b2, cfg, sc)))
    (l2, g2, m2), (l1, g1, m1) = f(params, batch, one)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5, atol=1e-7)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert _maxabs(jax.tree.map(lambda a, b: a - b, g2, g1)) <= 1e-6 * _maxabs(g1)


def test_zero_lambdas_is_grpo_and_nonfinite_skips(setup):
    """lambda_think = lambda_attn = 0 compiles exactly GRPO's program (same HLO as no tap
    layer at all); logging the OISD metrics at lambda = 0 leaves the gradient GRPO's. The
    update matches a hand-written clipped AdamW step; a NaN gradient skips the update."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    abstract = abstract_train_state(cfg, PG)
    hlo = [make_train_step(cfg, sc).lower(abstract, batch).as_text() for sc in (PG, PG.replace(tap_layer=None))]
    assert hlo[0] == hlo[1]
    res = _grads_fn(cfg, ISOLATION)(params, batch)
    (_, g, m_g), (_, g_o, m_o) = res[0], res[-1]
    assert _maxabs(jax.tree.map(lambda a, b: a - b, g, g_o)) <= 1e-5 * _maxabs(g)  # float order only
    assert "think_js" not in m_g and float(m_o["think_js"]) > 0 and float(m_o["attn_js"]) > 0
    np.testing.assert_allclose(float(m_o["pg_loss"]), float(m_g["pg_loss"]), rtol=1e-5)

    step = make_train_step(cfg, PG)
    state, m = step(init_train_state(jax.tree.map(jnp.copy, params), PG), batch)
    # The real optimizer == a hand-written clipped AdamW first step on compute_grads' grads.
    want, norm = _first_adamw(params, g, PG)
    np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-6)
    assert norm > PG.grad_clip
    assert _maxabs(jax.tree.map(lambda a, b: a - b, state.params, want)) <= 1e-6
    assert int(state.step) == 1 and int(state.skipped) == 0
    # A NaN advantage -> NaN gradient norm -> params and moments unchanged, skipped += 1.
    before = jax.tree.map(np.asarray, state)
    bad = batch.replace(advantages=np.where(batch.loss_mask > 0, np.nan, 0.0).astype(np.float32))
    s_bad, m_bad = step(state, bad)
    assert not np.isfinite(float(m_bad["grad_norm"])) and int(m_bad["update_skipped"]) == 1
    assert int(s_bad.skipped) == 1 and int(s_bad.step) == 2
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                     (before.params, before.opt_state), (s_bad.params, s_bad.opt_state)))


def _first_adamw(params, g, sc):
    """A fresh AdamW's first update (m_hat / sqrt(v_hat) = g / |g|) after norm clipping."""
    norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g))))
    gc = jax.tree.map(lambda x: x * min(1.0, sc.grad_clip / norm), g)
    upd = jax.tree.map(lambda p, x: p - sc.lr * (x / (jnp.abs(x) + sc.eps) + sc.weight_decay * p), params, gc)
    return upd, norm


def test_sharded_step_equals_single_device(setup):
    """The full OISD step on a (data 2, fsdp 2, tensor 2) mesh == the single-device
    gradients + AdamW, f32, 1e-5 (metrics, grad norm, updated params). eps = 1e-3 keeps
    Adam's first update (g / (|g| + eps): sign(g) at eps = 1e-8) from amplifying
    float-order noise of near-zero gradient entries into lr-sized differences."""
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    sc = FULL.replace(eps=1e-3)
    [(_, g1, m1)] = _grads_fn(cfg, ((FULL, True),))(params, batch)  # eps does not touch grads
    want, norm = _first_adamw(params, g1, sc)
    mesh = parallel.make_mesh((2, 2, 2))
    ps = jax.device_put(params, jax.tree.map(lambda s: s.sharding, abstract_train_state(cfg, sc, mesh).params))
    sb = jax.device_put(batch, batch_shardings(mesh, with_ref=True))
    lp8 = make_logprob_fn(cfg, sc, mesh)(ps, sb)
    assert lp8.sharding.spec == parallel.P(None, ("data", "fsdp"))
    np.testing.assert_allclose(np.asarray(lp8), setup["logp"], atol=1e-5)
    state = init_train_state(ps, sc, mesh, cfg)
    s8, m8 = make_train_step(cfg, sc, mesh)(state, sb)
    assert s8.params.layers.w_gate.sharding.spec == parallel.P(None, "fsdp", "tensor")
    assert s8.opt_state[1][0].mu.layers.w_gate.sharding.spec == parallel.P(None, "fsdp", "tensor")
    for k in m1:
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(m8["grad_norm"]), norm, rtol=1e-5)
    assert _maxabs(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s8.params, want)) <= 1e-5


def _temp_bytes(cfg, sc, T, R=2, Q=8, K=12):
    """Compiled temporary bytes of the real step for [1, R, T] rows (abstract: no memory)."""
    sds = jax.ShapeDtypeStruct
    i32, f32 = jnp.int32, jnp.float32
    row = lambda dt: sds((1, R, T), dt)  # noqa: E731
    batch = TrainBatch(tokens=row(i32), positions=row(i32), segment_ids=row(i32), loss_mask=row(f32),
                       advantages=row(f32), old_logp=row(f32), attn_queries=sds((1, R, Q), i32),
                       attn_keys=sds((1, R, Q, K), i32), attn_weight=sds((1, R, Q), f32),
                       attn_valid=sds((1, R, Q), f32))
    lowered = make_train_step(cfg, sc).lower(abstract_train_state(cfg, sc), batch)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_scales_with_chunk_not_tokens_times_vocab():
    """A big-vocabulary model, GRPO + think (final layer and lens through one head): the
    compiled step's temporaries grow with the chunk size, barely with T (what grows is
    attention's T x T), while an unchunked head holds several [R, T, V] arrays."""
    V, R = 16384, 2
    cfg = ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=1, num_kv_heads=1, head_dim=32, tie_embeddings=True)
    sc = StepConfig(tap_layer=1, think_weight=1.0)
    t = {(T, c): _temp_bytes(cfg, sc.replace(logit_chunk=c), T, Q=0, K=0)
         for T, c in [(256, 32), (512, 32), (256, 128), (256, None)]}
    rtv = lambda n: R * n * V * 4  # noqa: E731  one f32 [R, n, V] array
    assert t[(512, 32)] - t[(256, 32)] < 0.5 * rtv(256), t       # T doubled: < half of one [R, dT, V]
    assert t[(256, 128)] - t[(256, 32)] >= 2 * rtv(128 - 32), t  # chunk x4: several [R, dc, V] more
    assert t[(256, None)] - t[(256, 32)] >= 2 * rtv(256 - 32), t  # unchunked: >= 2 [R, T, V] more


def test_step_config_from_config():
    """rl.algorithm decides the terms (oisd_jax.config.algorithm_settings); BuPO's first
    phase is a separate StepConfig; Dr.GRPO's seq-mean-token-sum uses the max response."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "base_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    g = step_config(base.get_config("grpo"))
    assert (g.think_on, g.attn_on, g.bupo, g.tap_layer) == (False, False, False, None)
    assert g.lr == 1e-6 and g.dual_clip == 10.0 and g.grad_clip == 1.0 and g.weight_decay == 0.01
    o = step_config(base.get_config("oisd,rl.tap_layer=2,rl.think_weight=0.5"))
    assert (o.tap_layer, o.think_weight, o.attn_weight, o.lens_norm) == (2, 0.5, 0.1, True)
    c = base.get_config("bupo,rl.tap_layer=3")
    b1, b2 = step_config(c, bupo=True), step_config(c)
    assert b1.bupo and not b1.bupo_lens_norm and not b2.bupo and not (b2.think_on or b2.attn_on)
    with pytest.raises(ValueError, match="not bupo"):
        step_config(base.get_config("grpo"), bupo=True)
    d = step_config(base.get_config("dr_grpo"))  # Dr.GRPO's own aggregation
    assert (d.loss_agg, d.loss_norm_len) == ("seq-mean-token-sum-norm", float(c.sampler.max_new_tokens))
    d = step_config(base.get_config("dr_grpo,rl.loss_agg=seq-mean-token-sum"))
    assert (d.loss_agg, d.loss_norm_len) == ("seq-mean-token-sum", None)
    with pytest.raises(ValueError, match="loss_norm_len"):
        StepConfig(loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="tap_layer is required"):
        StepConfig(think_weight=1.0)
