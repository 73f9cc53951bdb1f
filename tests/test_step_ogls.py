"""The OGLS-SD step: the steered teacher of the two-pass step vs a float64 reference on the
unpacked rollouts (pool means in NumPy, the divergence and the student's gradient in
PyTorch), groups straddling micro-batches; alpha = 0 is OPSD's loss exactly; the batch's
pool fields."""
import jax
import numpy as np
import pytest
import torch

from oisd_jax.rl import losses
from oisd_jax.rl.batch import build_train_batch
from oisd_jax.rl.steer_pass import steer_direction_pass
from oisd_jax.rl.step import StepConfig, compute_grads
from test_step import _torch_grads_as_params, assert_grads_match_torch, in_float64
from test_step_opsd import TEMP
from test_step_opsd import setup as opsd_setup  # noqa: F401  (the module fixture: student, teacher, rollouts)

G = 4
GROUPS = [0, 1, 2, 3, 0, 1, 2, 3]
CORRECT = [1, 0, 1, 1, 0, 1, 1, 0]  # groups 0, 1, 3 have both pools; group 2 is all right: unsteered
OGLS = StepConfig(temperature=TEMP, pg_weight=0.0, opsd_weight=1.0, opsd_beta=1.0, opsd_token_clip=None,
                  ogls_alpha=0.7, ogls_groups=G, logit_chunk=8, lr=1e-3)


def _batch(setup, unit="token"):
    s = setup
    return build_train_batch(s["prompts"], s["responses"], s["lengths"], np.zeros(8), row_len=32, rows_per_micro=2,
                             num_micro=4, rng=0, teacher_prompt_tokens=s["t_prompts"], teacher_row_len=48,
                             steer_groups=GROUPS, steer_correct=CORRECT, steer_unit=unit)


def _micro_of(b, seq):
    for m, r in np.ndindex(b.tokens.shape[:2]):
        seg = b.segment_ids[m, r]
        for sid in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == sid)
            if len(idx) == len(seq) and (b.tokens[m, r, idx] == seq).all():
                return m
    raise AssertionError("rollout not found")


def test_pool_fields_and_groups_straddle_micro_batches(opsd_setup):  # noqa: F811 (the imported fixture)
    setup = opsd_setup
    b = _batch(setup, "sequence")
    on = b.loss_mask > 0
    assert (b.steer_group[~on] == -1).all() and set(np.unique(b.steer_group[on])) == set(range(G))
    # each rollout's sequence votes sum to 1; token votes are the mask
    np.testing.assert_allclose(np.sum(b.steer_weight), 8.0, rtol=1e-6)
    np.testing.assert_array_equal(_batch(setup).steer_weight, b.loss_mask)
    micro = [_micro_of(b, p + r[:n]) for p, r, n in zip(setup["prompts"], setup["responses"], setup["lengths"])]
    assert sum(len({micro[i] for i in range(8) if GROUPS[i] == g}) > 1 for g in range(G)) >= 2, micro


def _reference(setup, sc: StepConfig, unit: str):
    """mean_t KL(p_S || p_steered) over the unpacked rollouts, float64; the steering from
    NumPy pool means of the teacher's logits (and the same via losses.steer_teacher_logits)."""
    student, teacher = setup["student"], setup["teacher"]
    zs, zts = [], []
    for p, tp, resp, n in zip(setup["prompts"], setup["t_prompts"], setup["responses"], setup["lengths"]):
        s_seq, t_seq = p + resp[:n], tp + resp[:n]
        zs.append(student(torch.tensor([s_seq])).logits[0, len(p) - 1:len(s_seq) - 1])
        with torch.no_grad():
            zts.append(teacher(torch.tensor([t_seq])).logits[0, len(tp) - 1:len(t_seq) - 1].numpy())
    V = zts[0].shape[-1]
    sums, counts = np.zeros((G, 2, V)), np.zeros((G, 2))
    for zt, g, c in zip(zts, GROUPS, CORRECT):
        w = 1.0 if unit == "token" else 1.0 / len(zt)
        sums[g, c] += w * zt.sum(0)
        counts[g, c] += w * len(zt)
    d = np.where((counts > 0).all(-1)[:, None], sums[:, 1] / np.maximum(counts[:, 1:], 1e-30)
                 - sums[:, 0] / np.maximum(counts[:, :1], 1e-30), 0.0)
    assert (d[2] == 0).all() and np.abs(d[[0, 1, 3]]).min(-1).max() > 0
    # the library helper on the padded [B, T, V] batch agrees (float32)
    T = max(len(z) for z in zts)
    pad = np.zeros((8, T, V))
    mask = np.zeros((8, T))
    for i, zt in enumerate(zts):
        pad[i, :len(zt)], mask[i, :len(zt)] = zt, 1
    helper = np.asarray(losses.steer_teacher_logits(pad, np.array(CORRECT, bool), np.array(GROUPS), mask, sc.ogls_alpha,
                                                    num_groups=G, unit=unit))
    terms = []
    for i, (z, zt) in enumerate(zip(zs, zts)):
        steered = zt + sc.ogls_alpha * d[GROUPS[i]]
        np.testing.assert_allclose(helper[i, :len(zt)], steered, rtol=1e-5, atol=1e-4)
        ls = torch.log_softmax(z / sc.temperature, -1)
        lt = torch.log_softmax(torch.tensor(steered) / sc.temperature, -1)
        terms.append((ls.exp() * (ls - lt)).sum(-1))
    cat = torch.cat(terms)
    return cat.sum() / cat.numel(), d


@pytest.mark.parametrize("unit", ["token", "sequence"])
def test_steered_loss_and_grads_match_float64(opsd_setup, unit):  # noqa: F811 (the imported fixture)
    setup = opsd_setup
    cfg, params, t_params = setup["cfg"], setup["params"], setup["t_params"]
    sc = OGLS.replace(ogls_unit=unit)
    b = _batch(setup, unit)
    d = np.asarray(jax.jit(lambda t, b: steer_direction_pass(t, b, cfg, sc))(t_params, b))
    both = jax.jit(lambda p, t, b: [compute_grads(p, b, cfg, sc, fused, ref_params=t) for fused in (True, False)])
    (loss, grads, m), (loss_r, _, _) = both(params, t_params, b)
    with in_float64(setup["student"], setup["teacher"]) as (student, _):
        student.zero_grad()
        t_loss, d_ref = _reference(setup, sc, unit)
        t_loss.backward()
        t_grads = _torch_grads_as_params(student, cfg)
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-5, atol=1e-7)  # fused == reference head
    assert float(m["ogls_steered_groups"]) == 3
    assert_grads_match_torch(grads, t_grads)
    # the steering matters: the unsteered teacher gives another loss
    plain = compute_grads(params, b, cfg, sc.replace(ogls_alpha=None, ogls_groups=0), ref_params=t_params)[0]
    assert abs(float(plain) - float(loss)) > 1e-4


def test_alpha_zero_is_opsd_exactly(opsd_setup):  # noqa: F811 (the imported fixture)
    setup = opsd_setup
    cfg, params, t_params = setup["cfg"], setup["params"], setup["t_params"]
    b = _batch(setup)
    run = jax.jit(lambda p, t, b, sc: compute_grads(p, b, cfg, sc, ref_params=t)[:2], static_argnums=3)
    l0, g0 = run(params, t_params, b, OGLS.replace(ogls_alpha=0.0))
    lp, gp = run(params, t_params, b, OGLS.replace(ogls_alpha=None, ogls_groups=0))
    assert float(l0) == float(lp)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(gp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
