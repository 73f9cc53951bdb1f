"""Token-chunked unembedding: log-probs, entropy and lens JS without [tokens, vocab] arrays.

Memory lever 1 of docs/design.md ("Memory levers"). Qwen3's vocabulary is 151,936:
full logits for 8k tokens are 5 GB in f32, and OISD needs them for the final layer AND
the logit lens, forward and backward. Here the sequence axis is cut into chunks; each
chunk's logits are made, reduced to per-token scalars and dropped, under `jax.checkpoint`
inside a `lax.scan`, so the backward pass recomputes them chunk by chunk too. Peak
temporaries are a few [N, chunk, V] f32 arrays regardless of T.

Chunks run along T, not over a flattened token axis, so a batch axis sharded over
("data", "fsdp") stays sharded: per device the live logits are N_local x chunk x V.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from oisd_jax.rl.losses import js_divergence

Array = jax.Array


def _target_logp(z: Array, tgt: Array, temperature: float) -> Array:
    zs = z / temperature
    return (jnp.take_along_axis(zs, tgt[..., None], axis=-1)[..., 0]
            - jax.nn.logsumexp(zs, axis=-1))


def _entropy(z: Array, temperature: float) -> Array:
    zs = z / temperature
    lse = jax.nn.logsumexp(zs, axis=-1, keepdims=True)
    return lse[..., 0] - jnp.sum(jnp.exp(zs - lse) * zs, axis=-1)


def _chunk_terms(
    w_DV: Array,
    h_NCD: Array,
    tgt_NC: Array,
    hl_NCD: Array | None,
    *,
    temperature: float,
    tau: float,
    want_entropy: bool,
    entropy_grad: bool,
    compute_dtype: jnp.dtype,
) -> dict[str, Array]:
    """All per-token terms of one chunk; every [N, C, V] array dies inside.

    Written to keep few [N, C, V] buffers alive: logp = z_t - logsumexp(z) instead of
    gathering from a full log_softmax, entropy = lse - <p, z>, and the lean (finite)
    JS path. Every op here is f32 after the matmul.
    """
    # The cast to the compute dtype happens here, per chunk, not once outside the scan:
    # the scan then accumulates W's gradient over chunks in W's own (f32) dtype. Cast
    # outside, the accumulator is bf16 and 32 chunks gave 3.6x the unchunked gradient
    # error (7e-3 vs 2e-3 relative). XLA may hoist the loop-invariant cast anyway.
    w_DV = w_DV.astype(compute_dtype)
    matmul = functools.partial(jnp.einsum, "ncd,dv->ncv", preferred_element_type=jnp.float32)
    z = matmul(h_NCD.astype(compute_dtype), w_DV)
    out = {"logp": _target_logp(z, tgt_NC, temperature)}
    if want_entropy:
        # A metric by default (no entropy bonus in the paper): no gradient through it.
        out["entropy"] = _entropy(z if entropy_grad else jax.lax.stop_gradient(z), temperature)
    if hl_NCD is not None:
        zl = matmul(hl_NCD.astype(compute_dtype), w_DV)
        # Teacher = the same final-layer matmul at tau; js_divergence stops its gradient.
        out["js"] = js_divergence(zl, z, temperature=tau, assume_finite=True)
        if want_entropy:
            # At the sampling temperature, comparable with "entropy" (layer-wise change).
            out["lens_entropy"] = _entropy(jax.lax.stop_gradient(zl), temperature)
    return out


def token_terms(
    h_final_NTD: Array,
    w_DV: Array,
    targets_NT: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 512,
    h_lens_NTD: Array | None = None,
    tau: float = 1.0,
    want_entropy: bool = True,
    entropy_grad: bool = False,
    compute_dtype: jnp.dtype | None = None,
) -> dict[str, Array]:
    """Per-token terms of the final layer (and optionally a lens) from hidden states.

    h_final_NTD: hidden states whose unembedding gives the acting policy, already normed
        by the caller (for BuPO's raw internal policy pass the raw residual here).
    w_DV: unembedding [D, V] (lm_head, or the tied embedding transposed).
    targets_NT: the sampled next tokens; masked positions may hold any id (clipped).
    h_lens_NTD: the lens residual, already normed when `lens_norm` is on.
    compute_dtype: matmul input dtype (default: w_DV's). Pass the f32 master W with
        compute_dtype=bf16 rather than a pre-cast bf16 W: W's gradient is then summed
        over chunks in f32. Matmul accumulation and everything after it is f32.
    chunk_size: tokens of T per chunk; None = one unchunked pass (the reference path).

    Returns float32 [N, T] arrays:
      logp          log softmax(h W / temperature)[target]          (gradient: h, W)
      entropy       of softmax(h W / temperature)   (if want_entropy; no gradient unless
                    entropy_grad)
      js            JS(softmax(h_l W / tau), sg softmax(h W / tau))  (if h_lens; gradient:
                    h_lens, W via the student only)
      lens_entropy  of softmax(h_l W / temperature) (if h_lens and want_entropy; no grad)
    The final-layer logits for logp and the JS teacher come from one matmul.
    """
    n, t, _ = h_final_NTD.shape
    v = w_DV.shape[-1]
    cdt = compute_dtype if compute_dtype is not None else w_DV.dtype
    tgt = jnp.clip(targets_NT.astype(jnp.int32), 0, v - 1)
    fn = functools.partial(_chunk_terms, temperature=temperature, tau=tau,
                           want_entropy=want_entropy, entropy_grad=entropy_grad,
                           compute_dtype=cdt)
    if chunk_size is None or chunk_size >= t:
        return fn(w_DV, h_final_NTD, tgt, h_lens_NTD)

    c = int(chunk_size)
    n_chunks = -(-t // c)
    pad = n_chunks * c - t

    def split(x: Array) -> Array:  # [N, T, ...] -> [n_chunks, N, c, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((n, n_chunks, c) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    # Remat per chunk: backward saves only the chunk's inputs and recomputes its logits.
    body_fn = jax.checkpoint(fn, prevent_cse=False)

    def body(carry, xs):
        h_c, tgt_c, hl_c = xs
        return carry, body_fn(w_DV, h_c, tgt_c, hl_c)

    xs = (split(h_final_NTD), split(tgt), None if h_lens_NTD is None else split(h_lens_NTD))
    _, out = jax.lax.scan(body, None, xs)
    # [n_chunks, N, c] -> [N, T]; padded tokens (zero hidden states) are cut off here.
    return {k: jnp.moveaxis(a, 0, 1).reshape(n, n_chunks * c)[:, :t] for k, a in out.items()}
