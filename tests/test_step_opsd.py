"""The OPSD step: loss and gradient vs a float64 PyTorch reference (the teacher a separate
transformers model fed the teacher sequence), fused == reference head, the teacher rows'
alignment, and the teacher in the train state: frozen bitwise unchanged, the EMA update
exact, 'current' the params themselves, no gradient into any teacher."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import save_hf_model
from oisd_jax.model import load_hf
from oisd_jax.rl.batch import build_train_batch
from oisd_jax.rl.step import StepConfig, compute_grads, make_logprob_fn, make_train_step
from oisd_jax.rl.train_state import init_train_state
from test_step import _maxabs, _torch_grads_as_params, assert_grads_match_torch, in_float64

TEMP = 1.1
OPSD = StepConfig(temperature=TEMP, pg_weight=0.0, opsd_weight=1.0, opsd_beta=0.0, opsd_token_clip=0.05,
                  logit_chunk=8, lr=1e-3)
# GRPO + OPSD (beta 0.5, no clip) + OISD's think term on the same rollouts: one code path.
COMBO = StepConfig(temperature=TEMP, clip_low=0.2, clip_high=0.28, dual_clip=1.5, opsd_weight=0.7, opsd_beta=0.5,
                   tap_layer=2, think_weight=0.5, logit_chunk=8, lr=1e-3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s_path, t_path = tmp_path_factory.mktemp("student"), tmp_path_factory.mktemp("teacher")
    student = save_hf_model("qwen3", s_path, seed=3, tie_word_embeddings=False)
    teacher = save_hf_model("qwen3", t_path, seed=11, tie_word_embeddings=False)
    cfg, params = load_hf(s_path, dtype=jnp.float32)
    _, t_params = load_hf(t_path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    n = 8
    prompts = [rng.integers(2, cfg.vocab_size, rng.integers(2, 7)).tolist() for _ in range(n)]
    # teacher prompts: the student prompt plus a "solution" of a few tokens (longer, varied)
    t_prompts = [p + rng.integers(2, cfg.vocab_size, rng.integers(3, 9)).tolist() for p in prompts]
    responses = [rng.integers(2, cfg.vocab_size, 14).tolist() for _ in range(n)]
    lengths = rng.integers(4, 15, n)
    adv = rng.normal(size=n) * 1.2
    batch = build_train_batch(prompts, responses, lengths, adv, row_len=32, rows_per_micro=4, num_micro=2,
                              rng=rng, teacher_prompt_tokens=t_prompts, teacher_row_len=48)
    lp = np.asarray(make_logprob_fn(cfg, OPSD)(params, batch))
    batch = batch.replace(old_logp=(lp + 0.4 * rng.normal(size=lp.shape) * batch.loss_mask).astype(np.float32))
    return dict(student=student, teacher=teacher, cfg=cfg, params=params, t_params=t_params, batch=batch,
                prompts=prompts, t_prompts=t_prompts, responses=responses, lengths=lengths)


def test_teacher_rows_pair_with_student_rows(setup):
    """Every teacher head position predicts the same response token as its student twin,
    from the teacher prompt: the rows are packed alike, the pairing is exact."""
    b = setup["batch"]
    s_tgt = np.take_along_axis(b.targets, np.clip(b.head_positions, 0, None), -1)
    t_targets = np.concatenate([b.teacher_tokens[..., 1:], np.zeros_like(b.teacher_tokens[..., :1])], -1)
    t_tgt = np.take_along_axis(t_targets, np.clip(b.teacher_head_positions, 0, None), -1)
    valid = b.head_positions >= 0
    assert ((b.teacher_head_positions >= 0) == valid).all() and valid.sum() == b.loss_mask.sum()
    assert (s_tgt[valid] == t_tgt[valid]).all()
    # the same rollouts share a row: a student row's segments and its teacher row's segments count alike
    for m, r in np.ndindex(b.tokens.shape[:2]):
        assert b.segment_ids[m, r].max() == b.teacher_segment_ids[m, r].max()


def _torch_opsd(student, teacher, setup, sc: StepConfig):
    """pg_weight L_pg + opsd_weight mean_t JSD_beta + think_weight L_think from the formulas,
    per unpacked rollout, float64; the teacher is its own model on the teacher sequence."""
    b = setup["batch"]
    terms = {k: [] for k in ("pg", "opsd", "think")}
    for i, (p, tp, resp, n) in enumerate(zip(setup["prompts"], setup["t_prompts"], setup["responses"],
                                             setup["lengths"])):
        s_seq, t_seq = p + resp[:n], tp + resp[:n]
        out = student(torch.tensor([s_seq]), output_hidden_states=True)
        with torch.no_grad():
            zt = teacher(torch.tensor([t_seq])).logits[0, len(tp) - 1:len(t_seq) - 1]
        z = out.logits[0, len(p) - 1:len(s_seq) - 1]
        tgt = torch.tensor(resp[:n])
        ls, lt = torch.log_softmax(z / sc.temperature, -1), torch.log_softmax(zt / sc.temperature, -1)
        ps, pt = ls.exp(), lt.exp()
        if sc.opsd_beta == 0:
            term = pt * (lt - ls)
        else:
            mix = (1 - sc.opsd_beta) * ps + sc.opsd_beta * pt
            term = sc.opsd_beta * pt * (lt - mix.log()) + (1 - sc.opsd_beta) * ps * (ls - mix.log())
        if sc.opsd_token_clip is not None:
            term = term.clamp(max=sc.opsd_token_clip)
        terms["opsd"].append(term.sum(-1))
        # the old log-probs of this rollout, found by its (row, offset) in the packed batch
        logp = ls.gather(-1, tgt[:, None])[:, 0]
        old, adv = _old_and_adv(b, s_seq, len(p))
        ratio = torch.clamp(logp - old, -20, 20).exp()
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - sc.clip_low, 1 + sc.clip_high))
        if sc.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * sc.dual_clip), pg)
        terms["pg"].append(pg)
        if sc.think_on:
            zl = student.lm_head(student.model.norm(out.hidden_states[sc.tap_layer]))[0, len(p) - 1:len(s_seq) - 1]
            pl, pf = torch.softmax(zl / sc.tau, -1), torch.softmax(z.detach() / sc.tau, -1)
            mid = 0.5 * (pl + pf)
            js = 0.5 * (pl * (pl / mid).log()).sum(-1) + 0.5 * (pf * (pf / mid).log()).sum(-1)
            terms["think"].append(adv.clamp(-sc.adv_clip, sc.adv_clip) * js)
    cat = {k: torch.cat(v) if v else torch.zeros(1) for k, v in terms.items()}
    n_tok = cat["pg"].numel()
    mean = {k: v.sum() / n_tok for k, v in cat.items()}
    loss = sc.pg_weight * mean["pg"] + sc.opsd_weight * mean["opsd"] + sc.think_weight * mean["think"]
    return loss, {"opsd_loss": float(mean["opsd"].detach()), "pg_loss": float(mean["pg"].detach())}


def _old_and_adv(b, seq, plen):
    for m, r in np.ndindex(b.tokens.shape[:2]):
        seg = b.segment_ids[m, r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            if len(idx) == len(seq) and (b.tokens[m, r, idx] == seq).all():
                sel = idx[plen - 1:len(seq) - 1]
                f64 = lambda x: torch.tensor(np.asarray(x[m, r, sel], np.float64))  # noqa: E731
                return f64(b.old_logp), f64(b.advantages)
    raise AssertionError("rollout not found in the batch")


@functools.lru_cache(maxsize=None)
def _grads_fn(cfg, variants):
    return jax.jit(lambda p, t, b: [compute_grads(p, b, cfg, sc, fused, ref_params=t) for sc, fused in variants])


@pytest.mark.parametrize("sc", [OPSD, COMBO], ids=["opsd", "grpo+opsd+think"])
def test_opsd_loss_and_grads_match_torch_float64(setup, sc):
    cfg, params, t_params, batch = setup["cfg"], setup["params"], setup["t_params"], setup["batch"]
    (loss, grads, m), (loss_r, grads_r, m_r) = _grads_fn(cfg, ((sc, True), (sc, False)))(params, t_params, batch)
    with in_float64(setup["student"], setup["teacher"]) as (student, teacher):
        student.zero_grad()
        t_loss, t_m = _torch_opsd(student, teacher, setup, sc)
        t_loss.backward()
        t_grads = _torch_grads_as_params(student, cfg)
    assert t_m["opsd_loss"] != 0
    np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-5, atol=1e-7)  # fused == reference head
    for k, v in t_m.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert_grads_match_torch(grads, t_grads)
    assert _maxabs(jax.tree.map(lambda a, b: a - b, grads, grads_r)) <= 1e-5 * _maxabs(grads)


def test_top_k_and_current_teacher(setup):
    """The top-k variant runs in the step (finite, differs from the full vocabulary); the
    'current' teacher is the params themselves and gets no gradient: OPSD with the student
    as its own teacher equals passing a copy of the params as a frozen teacher."""
    cfg, params, t_params, batch = setup["cfg"], setup["params"], setup["t_params"], setup["batch"]
    cur = OPSD.replace(teacher="current")
    res = _grads_fn(cfg, ((OPSD.replace(opsd_top_k=5), True), (OPSD, True)))(params, t_params, batch)
    assert np.isfinite(float(res[0][0])) and abs(float(res[0][0]) - float(res[1][0])) > 1e-6
    (l_cur, g_cur, _), = _grads_fn(cfg, ((cur, True),))(params, None, batch)
    (l_cpy, g_cpy, _), = _grads_fn(cfg, ((OPSD, True),))(params, jax.tree.map(jnp.copy, params), batch)
    np.testing.assert_allclose(float(l_cur), float(l_cpy), rtol=1e-6)
    assert _maxabs(jax.tree.map(lambda a, b: a - b, g_cur, g_cpy)) <= 1e-6 * _maxabs(g_cpy)


def test_frozen_teacher_bitwise_unchanged_and_ema_update_exact(setup):
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    step = make_train_step(cfg, OPSD)
    state = init_train_state(jax.tree.map(jnp.copy, params), OPSD, model_cfg=cfg)
    ref0 = jax.tree.map(np.asarray, state.ref_params)
    for _ in range(3):
        state, m = step(state, batch)
        assert int(m["update_skipped"]) == 0
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ref0, state.ref_params))
    assert _maxabs(jax.tree.map(lambda a, b: a - b, state.params, params)) > 1e-4  # the student moved

    ema = OPSD.replace(teacher="ema", teacher_decay=0.9)
    step_e = make_train_step(cfg, ema)
    s = init_train_state(jax.tree.map(jnp.copy, params), ema, model_cfg=cfg)
    want = jax.tree.map(lambda a: np.asarray(a, np.float32), s.ref_params)
    for _ in range(2):
        s, _ = step_e(s, batch)
        want = jax.tree.map(lambda t, p: np.float32(0.9) * t + np.float32(1 - 0.9) * np.asarray(p), want, s.params)
        # the update itself, to f32 rounding (XLA may fuse d t + (1 - d) p into one FMA: 1 ulp)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s.ref_params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=1e-9), s.ref_params, want)
    # a skipped (non-finite) update leaves the EMA teacher where it was
    before = jax.tree.map(np.asarray, s.ref_params)
    s, m = step_e(s, batch.replace(advantages=np.where(batch.loss_mask > 0, np.nan, 0.0).astype(np.float32)))
    assert int(m["update_skipped"]) == 1
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before, s.ref_params))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_to_the_frozen_reference_vs_numpy(setup, kind):
    """GRPO + KL: ref_logp from the reference weights through the same log-prob pass the
    trainer uses; the step's KL metric and its loss share == NumPy's estimator, token-mean."""
    cfg, params, t_params, batch = setup["cfg"], setup["params"], setup["t_params"], setup["batch"]
    sc = StepConfig(temperature=TEMP, kl_coef=0.3, kl_type=kind, logit_chunk=8)
    ref = np.asarray(make_logprob_fn(cfg, sc)(t_params, batch), np.float64)
    cur = np.asarray(make_logprob_fn(cfg, sc)(params, batch), np.float64)
    b = batch.replace(ref_logp=ref.astype(np.float32))
    (loss, _, m), (loss0, _, _) = _grads_fn(cfg, ((sc, True), (sc.replace(kl_coef=0.0), True)))(params, None, b)
    d, mask = cur - ref, batch.loss_mask == 1
    lr = np.clip(-d, -20, 20)
    est = {"k1": d, "k2": 0.5 * d ** 2, "k3": np.clip(np.exp(lr) - lr - 1, -10, 10)}[kind]
    want = est[mask].mean()
    assert abs(want) > 1e-3
    np.testing.assert_allclose(float(m["kl"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss) - float(loss0), 0.3 * want, rtol=1e-4, atol=1e-6)


def _opsd_temp_bytes(cfg, sc, T, R=2, extra=32):
    """Compiled temporary bytes of the OPSD step on [1, R, T] student rows, teacher rows of
    T + extra tokens and T paired head positions (abstract: nothing allocated)."""
    from oisd_jax.rl.batch import TrainBatch
    from oisd_jax.rl.train_state import abstract_train_state
    sds = jax.ShapeDtypeStruct
    i32, f32 = jnp.int32, jnp.float32
    row = lambda dt, n=T: sds((1, R, n), dt)  # noqa: E731
    z = sds((1, R, 0), f32)
    batch = TrainBatch(tokens=row(i32), positions=row(i32), segment_ids=row(i32), loss_mask=row(f32),
                       advantages=row(f32), old_logp=row(f32), attn_queries=sds((1, R, 0), i32),
                       attn_keys=sds((1, R, 0, 0), i32), attn_weight=z, attn_valid=z, head_positions=row(i32),
                       teacher_tokens=row(i32, T + extra), teacher_positions=row(i32, T + extra),
                       teacher_segment_ids=row(i32, T + extra), teacher_head_positions=row(i32))
    lowered = make_train_step(cfg, sc).lower(abstract_train_state(cfg, sc), batch)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_opsd_temp_memory_scales_with_chunk_not_tokens_times_vocab():
    """The teacher's logits are made chunk by chunk beside the student's: the step's
    temporaries grow with the chunk, barely with T, as for the other terms (test_step)."""
    from oisd_jax.model import ModelConfig
    V, R = 16384, 2
    cfg = ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=1, num_kv_heads=1, head_dim=32, tie_embeddings=True)
    t = {(T, c): _opsd_temp_bytes(cfg, OPSD.replace(logit_chunk=c), T) for T, c in [(256, 32), (512, 32), (256, None)]}
    rtv = lambda n: R * n * V * 4  # noqa: E731  one f32 [R, n, V] array
    assert t[(512, 32)] - t[(256, 32)] < 0.5 * rtv(256), t        # T doubled: < half of one [R, dT, V]
    assert t[(256, None)] - t[(256, 32)] >= 2 * rtv(256 - 32), t  # unchunked: >= 2 [R, T, V] more
