"""The loss of one micro-batch, read top to bottom like docs/method.md ("The objective").

    forward (taps only for the terms that are on)
    -> vocabulary head: L_pg (+ KL, - entropy bonus) on the acting policy and
       lambda_think * L_think on the layer-l lens, over token chunks, never [T, V] twice
    -> lambda_attn * L_attn on the probed attention of layers l and L.
    OPSD (opsd_weight): a second forward of the teacher policy over its own rows (teacher
    prompt + the same response), gathered at the positions that pair with the student's
    head positions; its logits are made chunk by chunk beside the student's inside the
    vocabulary head, and the generalised JSD to them is one more per-token term.

Every normaliser is global over the mini-batch: `token_weights` turns the loss mask into
per-token weights (mask / n_tokens for token-mean; per-sequence for the seq-mean modes)
once, before the micro-batch loop, so each micro-batch's loss is a plain weighted sum
and their sum is the mini-batch loss exactly (up to float order).

The vocabulary head has two implementations of the same function:
  head_reference  helper-1's `chunked.token_terms` (chunk remat: logits recomputed in
                  backward) and the aggregation of `losses`; differentiable term by term.
  head_fused      a custom VJP that computes the gradient while each chunk's logits are
                  still live (3 vocabulary matmuls per head instead of 4: forward, dh, dW)
                  and accumulates dW in f32. The step uses this one.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from oisd_jax.model import Taps, final_norm, forward
from oisd_jax.model.params import Params
from oisd_jax.rl import chunked, losses

if TYPE_CHECKING:  # pragma: no cover
    from oisd_jax.model import ModelConfig
    from oisd_jax.rl.batch import TrainBatch
    from oisd_jax.rl.step_config import StepConfig

Array = jax.Array


class Weights(NamedTuple):
    """Global per-token weights of one mini-batch ([M, R, T]) and the probe count."""
    pg: Array         # weight of L_pg / KL / entropy terms (depends on loss_agg)
    tok: Array        # mask / n_tokens: L_think and every token-mean metric
    attn_denom: Array  # number of valid sampled steps (scalar)


class HeadInputs(NamedTuple):
    """What the vocabulary head's objective reads per token ([N, T] each, or [N, Th] at
    the loss positions): a pytree, split into chunks field by field."""
    targets: Array
    old_logp: Array
    adv: Array
    pg_weight: Array               # Weights.pg at these tokens
    tok_weight: Array              # Weights.tok at these tokens
    ref_logp: Array | None = None  # only with kl_coef
    think_w: Array | None = None   # TrainBatch.think_weight; None = clip(adv) (signed)
    steer_group: Array | None = None  # OGLS-SD: TrainBatch.steer_group (-1 = not steered)
    on_policy: Array | None = None    # TrainBatch.on_policy at these tokens (1: old = current)


class TokenTerms(NamedTuple):
    """Per-token terms of the head (float32), as `chunked.token_terms` names them."""
    logp: Array
    entropy: Array
    js: Array | None = None            # OISD's JS(lens || final), when the lens is on
    lens_entropy: Array | None = None
    opsd: Array | None = None          # OPSD's JSD_beta(student || teacher), when a teacher is on


class HeadMetrics(NamedTuple):
    sums: dict[str, Array]   # summed over chunks (and micro-batches)
    maxes: dict[str, Array]  # max over chunks

    def flat(self) -> dict[str, Array]:
        return {**self.sums, **self.maxes}


def token_weights(batch: "TrainBatch", cfg: "StepConfig") -> Weights:
    """Per-token weights such that sum(loss * w) is the configured aggregation."""
    mask = batch.loss_mask.astype(jnp.float32)
    tok = mask / jnp.maximum(jnp.sum(mask), 1.0)
    if cfg.loss_agg == "token-mean":
        pg = tok
    else:
        # A sequence is a (row, segment id) pair; rows never straddle micro-batches.
        T = mask.shape[-1]
        m2 = mask.reshape(-1, T)
        seg = jnp.clip(batch.segment_ids.reshape(-1, T), 0, T)
        key = (jnp.arange(m2.shape[0])[:, None] * (T + 1) + seg).reshape(-1)
        counts = jax.ops.segment_sum(m2.reshape(-1), key, num_segments=m2.shape[0] * (T + 1))
        n_seq = jnp.maximum(jnp.sum(counts > 0), 1).astype(jnp.float32)
        if cfg.loss_agg == "seq-mean-token-mean":
            per = jnp.maximum(counts[key].reshape(mask.shape), 1.0)
        elif cfg.loss_agg == "seq-mean-token-sum":
            per = 1.0
        elif cfg.loss_agg == "seq-mean-token-sum-norm":
            per = float(cfg.loss_norm_len)
        else:
            raise ValueError(f"unknown loss_agg {cfg.loss_agg!r}; choose from {losses.AGG_MODES}")
        pg = mask / (per * n_seq)
    attn_denom = jnp.sum(batch.attn_valid.astype(jnp.float32))
    return Weights(pg=pg, tok=tok, attn_denom=attn_denom)


# ----------------------------------------------------------------------------- the vocabulary head
def _objective(t: TokenTerms, x: HeadInputs, cfg: "StepConfig") -> tuple[Array, HeadMetrics]:
    """Head loss and metric sums from per-token terms. Any slice of tokens: all sums."""
    old_logp = x.old_logp
    if x.on_policy is not None:  # pi_old is the policy itself: ratio 1 with grad log pi (TRL's shortcut)
        old_logp = jnp.where(x.on_policy > 0, jax.lax.stop_gradient(t.logp), old_logp)
    pg, _ = losses.policy_loss(t.logp, old_logp, x.adv, x.pg_weight, cfg.clip_low,
                               cfg.clip_high, cfg.dual_clip, cfg.ratio_log_clamp, "token-mean",
                               denom=1.0)
    _, pm = losses.policy_loss(jax.lax.stop_gradient(t.logp), old_logp, x.adv, x.tok_weight,
                               cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.ratio_log_clamp,
                               "token-mean", denom=1.0)
    n = jnp.sum(x.tok_weight)  # the policy metrics are local means; make them global sums
    sums = {k: pm[k] * n for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl")}
    sums["pg_loss"] = pg
    sums["entropy"] = jnp.sum(jax.lax.stop_gradient(t.entropy) * x.tok_weight)
    loss = cfg.pg_weight * pg
    if cfg.kl_coef:
        kl = losses.aggregate(losses.kl_penalty(t.logp, x.ref_logp, cfg.kl_type), x.pg_weight, denom=1.0)
        sums["kl"] = kl
        loss = loss + cfg.kl_coef * kl
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * losses.aggregate(t.entropy, x.pg_weight, denom=1.0)
    if t.opsd is not None:
        opsd = jnp.sum(t.opsd * x.tok_weight)  # token-mean over the mini-batch's valid tokens
        sums["opsd_loss"] = jax.lax.stop_gradient(opsd)
        loss = loss + cfg.opsd_weight * opsd
    if t.js is not None:
        w = x.adv if x.think_w is None else x.think_w  # already clipped: clip is then a no-op
        think = losses.think_loss(t.js, w, x.tok_weight, cfg.adv_clip, denom=1.0)
        sums["think_loss"] = jax.lax.stop_gradient(think)
        sums["think_js"] = jnp.sum(jax.lax.stop_gradient(t.js) * x.tok_weight)
        sums["lens_entropy"] = jnp.sum(t.lens_entropy * x.tok_weight)
        if cfg.think_weight:
            loss = loss + cfg.think_weight * think
    return loss, HeadMetrics(sums, {"ratio_max": pm["ratio_max"]})


def teacher_target(zt: Array, cfg: "StepConfig", steer: tuple[Array, Array] | None = None) -> Array:
    """The hook between the teacher's logits and OPSD's target: f32 teacher logits of one
    chunk [N, C, V] -> the logits whose softmax (at the sampling temperature) the student
    is pulled to. Plain OPSD: the teacher's own. A steered teacher (e.g. OGLS-SD's
    `losses.steer_teacher_logits`) returns its steered logits here, reading its settings
    from `cfg`; everything around it (chunking, the gradient, no teacher gradient) stays.
    steer: OGLS-SD's (d_GV [G, V] from rl/steer_pass.py, the chunk's groups [N, C]): the
    target is zt + ogls_alpha * d_GV[group], unsteered where group < 0."""
    if steer is None or not cfg.steer_on:
        return zt
    d_GV, g = steer
    d = jnp.take(d_GV, jnp.clip(g, 0), axis=0)  # [N, C, V]: one chunk, like zt
    return zt + jnp.where((g >= 0)[..., None], cfg.ogls_alpha * d, 0.0)


def opsd_terms(z: Array, zt: Array, cfg: "StepConfig", steer: tuple[Array, Array] | None = None) -> Array:
    """OPSD's per-token divergence from student / teacher f32 logits [..., V]."""
    return losses.generalized_jsd(z, teacher_target(zt, cfg, steer), cfg.opsd_beta, temperature=cfg.temperature,
                                  token_clip=cfg.opsd_token_clip, top_k=cfg.opsd_top_k)


def _lean_terms(z: Array, zl: Array | None, tgt: Array, cfg: "StepConfig", zt: Array | None = None,
                steer: tuple[Array, Array] | None = None) -> TokenTerms:
    """Per-token terms from f32 logits [N, C, V], written for few [N, C, V] passes.

    The log-softmaxes are spelled like losses.js_divergence's (x * (1 / temperature)), so
    with tau == T_s XLA computes each of them once for logp, entropy and the JS.
    """
    inv_t = 1.0 / cfg.temperature
    ls = jax.nn.log_softmax(z * inv_t, axis=-1)
    # A compare-and-select, not take_along_axis: its gradient is elementwise instead of
    # a scatter-add into a fresh zero [N, C, V] buffer.
    hit = jax.lax.broadcasted_iota(jnp.int32, ls.shape, ls.ndim - 1) == tgt[..., None]
    logp = jnp.sum(jnp.where(hit, ls, 0.0), axis=-1)
    le = ls if cfg.entropy_coef else jax.lax.stop_gradient(ls)
    entropy = -jnp.sum(jnp.exp(le) * le, axis=-1)
    opsd = None if zt is None else opsd_terms(z, zt, cfg, steer)
    if zl is None:
        return TokenTerms(logp, entropy, opsd=opsd)
    js = losses.js_divergence(zl, z, temperature=cfg.tau, assume_finite=True)
    lsl = jax.nn.log_softmax(jax.lax.stop_gradient(zl) * inv_t, axis=-1)
    return TokenTerms(logp, entropy, js, -jnp.sum(jnp.exp(lsl) * lsl, axis=-1), opsd)


def head_reference(h: Array, hl: Array | None, w_DV: Array, x: HeadInputs, cfg: "StepConfig",
                   compute_dtype, chunk: int | None, ht: Array | None = None,
                   wt_DV: Array | None = None, d_GV: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The head via `chunked.token_terms` (chunk remat); differentiable term by term.
    The OPSD term (ht: teacher hidden states, wt_DV: its unembedding; d_GV: OGLS-SD's
    steering direction) is unchunked here."""
    t = chunked.token_terms(h, w_DV, x.targets, temperature=cfg.temperature, chunk_size=chunk,
                            h_lens_NTD=hl, tau=cfg.tau, want_entropy=True,
                            entropy_grad=bool(cfg.entropy_coef), compute_dtype=compute_dtype)
    if ht is not None:
        mm = functools.partial(jnp.einsum, "ntd,dv->ntv", preferred_element_type=jnp.float32)
        z = mm(h.astype(compute_dtype), w_DV.astype(compute_dtype))
        steer = None if d_GV is None else (d_GV, x.steer_group)
        t["opsd"] = opsd_terms(z, mm(ht.astype(compute_dtype), wt_DV.astype(compute_dtype)), cfg, steer)
    loss, metrics = _objective(TokenTerms(**t), x, cfg)
    return loss, metrics.flat()


def _split(x: Array, c: int) -> Array:
    """[N, T, ...] -> [T/c, N, c, ...] (T padded to a multiple of c with zeros)."""
    n, t = x.shape[:2]
    k = -(-t // c)
    x = jnp.pad(x, [(0, 0), (0, k * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((n, k, c) + x.shape[2:]), 1, 0)


def _unsplit(x: Array, t: int) -> Array:
    k, n, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((n, k * c) + x.shape[3:])[:, :t]


def make_fused_head(cfg: "StepConfig", compute_dtype, chunk: int | None):
    """head(h [N,T,D], hl [N,T,D] | None, w_DV [D,V] (master dtype), x: HeadInputs,
    ht [N,T,D] | None, wt_DV [D,V] | None, d_GV [G,V] | None) -> (loss, metrics): the same
    function as head_reference, with a custom VJP. ht / wt_DV are OPSD's teacher hidden
    states and unembedding: the teacher's chunk logits live beside the student's and get no
    gradient; d_GV is OGLS-SD's steering direction (rl/steer_pass.py), added to them."""
    mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def run(h, hl, w_DV, x, ht, wt_DV, d_GV, with_grad: bool):
        t_len = h.shape[1]
        c = t_len if chunk is None or chunk >= t_len else int(chunk)
        wc_DV = w_DV.astype(compute_dtype)  # cast once; chunks share it
        wtc_DV = None if wt_DV is None else wt_DV.astype(compute_dtype)
        lens_grad = hl is not None and bool(cfg.think_on)
        xs = (_split(h, c), None if hl is None else _split(hl, c), jax.tree.map(lambda v: _split(v, c), x),
              None if ht is None else _split(ht, c))

        def chunk_fn(carry, chunk_xs):
            loss_acc, dw_acc, sums_acc, max_acc = carry
            hc, hlc, xc, htc = chunk_xs
            zt = None if htc is None else mm("ncd,dv->ncv", htc.astype(compute_dtype), wtc_DV)

            def from_logits(z, zl):
                tgt = jnp.clip(xc.targets, 0, w_DV.shape[1] - 1)
                steer = None if d_GV is None else (d_GV, xc.steer_group)
                return _objective(_lean_terms(z, zl, tgt, cfg, zt, steer), xc, cfg)

            z = mm("ncd,dv->ncv", hc.astype(compute_dtype), wc_DV)
            zl = None if hlc is None else mm("ncd,dv->ncv", hlc.astype(compute_dtype), wc_DV)
            if with_grad:
                if lens_grad:
                    (loss, aux), (dz, dzl) = jax.value_and_grad(from_logits, (0, 1), has_aux=True)(z, zl)
                else:  # no lens, or a metric-only lens: no lens gradient to pay for
                    (loss, aux), dz = jax.value_and_grad(from_logits, 0, has_aux=True)(z, zl)
                dz = dz.astype(compute_dtype)
                dh = mm("ncv,dv->ncd", dz, wc_DV).astype(h.dtype)
                dw = mm("ncd,ncv->dv", hc.astype(compute_dtype), dz)
                dhl = None
                if lens_grad:
                    dzl = dzl.astype(compute_dtype)
                    dhl = mm("ncv,dv->ncd", dzl, wc_DV).astype(hl.dtype)
                    dw = dw + mm("ncd,ncv->dv", hlc.astype(compute_dtype), dzl)
                dw_acc = dw_acc + dw
            else:
                loss, aux = from_logits(z, zl)
                dh = dhl = None
            sums = {k: sums_acc[k] + v for k, v in aux.sums.items()}
            maxes = {k: jnp.maximum(max_acc[k], v) for k, v in aux.maxes.items()}
            return (loss_acc + loss, dw_acc, sums, maxes), (dh, dhl)

        zero = jnp.zeros((), jnp.float32)
        sums0, maxes0 = _metric_zeros(cfg, hl is not None, ht is not None)
        dw0 = jnp.zeros(w_DV.shape, jnp.float32) if with_grad else None
        (loss, dw, sums, maxes), (dh, dhl) = jax.lax.scan(chunk_fn, (zero, dw0, sums0, maxes0), xs)
        grads = None
        if with_grad:
            grads = (_unsplit(dh, t_len), _unsplit(dhl, t_len) if lens_grad else None, dw.astype(w_DV.dtype))
        return (loss, HeadMetrics(sums, maxes).flat()), grads

    @jax.custom_vjp
    def head(h, hl, w_DV, x, ht=None, wt_DV=None, d_GV=None):
        return run(h, hl, w_DV, x, ht, wt_DV, d_GV, with_grad=False)[0]

    def fwd(h, hl, w_DV, x, ht=None, wt_DV=None, d_GV=None):
        out, grads = run(h, hl, w_DV, x, ht, wt_DV, d_GV, with_grad=True)
        return out, grads

    def bwd(grads, ct):
        g = ct[0]  # metrics carry no gradient
        dh, dhl, dw = grads
        scale = lambda x: None if x is None else (g * x).astype(x.dtype)  # noqa: E731
        return scale(dh), scale(dhl), scale(dw), None, None, None, None  # the teacher gets none

    head.defvjp(fwd, bwd)
    return head


def _metric_zeros(cfg: "StepConfig", lens: bool, teacher: bool = False) -> tuple[dict, dict]:
    names = ["clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "pg_loss", "entropy"]
    if cfg.kl_coef:
        names.append("kl")
    if teacher:
        names.append("opsd_loss")
    if lens:
        names += ["think_loss", "think_js", "lens_entropy"]
    z = jnp.zeros((), jnp.float32)
    return {k: z for k in names}, {"ratio_max": z}


def _compact(pos_RH: Array, h, hl, x: HeadInputs):
    """Gather the head's inputs at the loss positions [R, Th] (-1 = unused slot, weight 0).

    Rows stay rows (a gather along T), so a batch sharded over rows stays local; the
    gather's gradient scatters dh back into [R, T, D].
    """
    valid = pos_RH >= 0
    idx = jnp.clip(pos_RH, 0)
    take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    x = jax.tree.map(take, x)
    x = x._replace(pg_weight=jnp.where(valid, x.pg_weight, 0.0), tok_weight=jnp.where(valid, x.tok_weight, 0.0))
    return take(h), None if hl is None else take(hl), x


# ----------------------------------------------------------------------------- the micro-batch loss
def teacher_hidden(teacher: Params, mb: "TrainBatch", model_cfg: "ModelConfig") -> tuple[Array, Array]:
    """OPSD's teacher forward: final hidden states at the teacher head positions [R, Th, D]
    (paired with the student's head positions) and the teacher's unembedding [D, V], both
    without gradient. Only the [R, Th, D] gather outlives the forward; the teacher's logits
    are made chunk by chunk inside the vocabulary head."""
    teacher = jax.lax.stop_gradient(teacher)
    out = forward(teacher, model_cfg, mb.teacher_tokens, mb.teacher_positions, mb.teacher_segment_ids, Taps())
    idx = jnp.clip(mb.teacher_head_positions, 0)
    ht = jnp.take_along_axis(out.hidden, idx[..., None], axis=1)
    wt_DV = teacher.embed.T if model_cfg.tie_embeddings else teacher.lm_head
    return jax.lax.stop_gradient(ht), wt_DV


def micro_loss(params: Params, mb: "TrainBatch", weights: Weights, model_cfg: "ModelConfig",
               cfg: "StepConfig", fused: bool = True, teacher: Params | None = None,
               d_GV: Array | None = None) -> tuple[Array, dict]:
    """Loss of one micro-batch (fields [R, T], weights [R, T]) and its metric sums.
    teacher: OPSD's teacher weights (cfg.opsd_on; the frozen / EMA copy, or the params).
    d_GV: OGLS-SD's steering direction of the mini-batch (cfg.steer_on; rl/steer_pass.py)."""
    L, l = model_cfg.num_layers, cfg.tap_layer
    think, attn = cfg.think_on or cfg.think_metrics, cfg.attn_on or cfg.attn_metrics
    taps = Taps(
        residual_layers=(l,) if (think or cfg.bupo) else (),
        attn_layers=(l, L) if attn else (),
        attn_queries=mb.attn_queries if attn else None,
        attn_keys=mb.attn_keys if attn else None)
    out = forward(params, model_cfg, mb.tokens, mb.positions, mb.segment_ids, taps)

    # Acting policy: the final layer, or BuPO's internal policy pi_l (no final norm by default).
    if cfg.bupo:
        h = out.residuals[l]
        h = final_norm(params, model_cfg, h) if cfg.bupo_lens_norm else h
    else:
        h = out.hidden
    # OISD student: the logit lens of layer l (final norm when lens_norm).
    hl = None
    if think:
        hl = final_norm(params, model_cfg, out.residuals[l]) if cfg.lens_norm else out.residuals[l]
        if not cfg.think_on:  # metric only: the step's gradient stays GRPO's
            hl = jax.lax.stop_gradient(hl)
    unembed_DV = params.embed.T if model_cfg.tie_embeddings else params.lm_head
    x = HeadInputs(targets=mb.targets, old_logp=mb.old_logp, adv=mb.advantages, pg_weight=weights.pg,
                   tok_weight=weights.tok, ref_logp=mb.ref_logp if cfg.kl_coef else None,
                   think_w=mb.think_weight if think else None,
                   steer_group=mb.steer_group if d_GV is not None else None,
                   on_policy=None if mb.on_policy is None else jnp.broadcast_to(mb.on_policy[:, None],
                                                                                mb.old_logp.shape))
    ht = wt_DV = None
    if cfg.opsd_on:
        if mb.teacher_tokens is None or mb.head_positions is None or teacher is None:
            raise ValueError("StepConfig.opsd_weight != 0 needs teacher weights and a batch with teacher rows "
                             "(build_train_batch(teacher_prompt_tokens=...))")
        ht, wt_DV = teacher_hidden(teacher, mb, model_cfg)
    if mb.head_positions is not None:
        h, hl, x = _compact(mb.head_positions, h, hl, x)
    cdt = jnp.dtype(model_cfg.dtype)
    if fused:
        loss, metrics = make_fused_head(cfg, cdt, cfg.logit_chunk)(h, hl, unembed_DV, x, ht, wt_DV, d_GV)
    else:
        loss, metrics = head_reference(h, hl, unembed_DV, x, cfg, cdt, cfg.logit_chunk, ht, wt_DV, d_GV)

    if attn:
        s_l, s_L = out.attn_logits[l], out.attn_logits[L]
        if not cfg.attn_on:
            s_l = jax.lax.stop_gradient(s_l)
        l_attn = losses.attention_loss(s_l, s_L, mb.attn_weight, mb.attn_valid, cfg.adv_clip,
                                       denom=weights.attn_denom)
        # Unweighted JS (weight 1, never clipped) for the metric; shares the JS with l_attn.
        ones = jnp.ones_like(mb.attn_weight)
        metrics["attn_js"] = jax.lax.stop_gradient(losses.attention_loss(
            s_l, s_L, ones, mb.attn_valid, 1.0, denom=weights.attn_denom))
        metrics["attn_loss"] = jax.lax.stop_gradient(l_attn)
        if cfg.attn_on:
            loss = loss + cfg.attn_weight * l_attn
    return loss, metrics
